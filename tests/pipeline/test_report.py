"""The report: the paper's claims checked on hand-made sweep records, the Claims section of
results.md, and the pictures (Figure 6's layout; bars readable from 0.3% to 70%). No Ray, no
training: records as pipeline.tune writes them, numbers chosen so each verdict is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import params as params_module
from pipeline import report
from tests.conftest import REPO
from tests.helpers import failed_trial, finished_trial

PNG = b"\x89PNG\r\n\x1a\n"


# (depth, shortcut): (final train error, best val error), a sweep where every claim holds:
# plain-56 trains worse than plain-20 (a); ResNet-56 (A) trains to under a third of plain-56 (b)
# and no worse than ResNet-20 (A) (c); A, B, C beat plain and lie within 1 point (d).
HELD = {
    (20, "none"): (0.05, 0.08),
    (20, "A"): (0.02, 0.05),
    (20, "B"): (0.02, 0.045),
    (20, "C"): (0.015, 0.04),
    (56, "none"): (0.30, 0.33),
    (56, "A"): (0.01, 0.04),
    (56, "B"): (0.01, 0.035),
    (56, "C"): (0.008, 0.03),
}


def sweep(errors: dict = HELD, **changes: tuple[float, float]) -> list[dict]:
    """Records of `errors`, with changes such as plain_56=(train, val), in tune's order."""
    errors = dict(errors)
    for key, value in changes.items():
        shortcut, depth = key.split("_")
        errors[(int(depth), "none" if shortcut == "plain" else shortcut)] = value
    return [finished_trial(d, s, *errors[(d, s)]) for d, s in sorted(errors, key=lambda k: (k[0], "none ABC".index(k[1])))]


def by_id(results: list[dict]) -> dict[str, dict]:
    return {c["id"]: c for c in results}


IDS = ["degradation", "residual_fixes_degradation", "residual_gains_from_depth", "shortcut_options", "parameter_counts"]


def test_every_claim_holds_on_a_sweep_that_shows_the_papers_picture():
    results = report.claims(sweep())
    assert [c["id"] for c in results] == IDS
    assert [c["held"] for c in results] == [True] * 5
    assert all(set(c) == {"id", "claim", "held", "evidence"} for c in results)
    json.dumps(results)  # claims.json: plain JSON
    c = by_id(results)
    assert c["degradation"]["evidence"] == {
        "shallow_depth": 20,
        "deep_depth": 56,
        "plain_shallow_final_train_error": 0.05,
        "plain_deep_final_train_error": 0.30,
        "gap": pytest.approx(0.25),
        "min_gap": report.DEGRADATION_MIN_GAP,
    }
    assert c["residual_fixes_degradation"]["evidence"]["ratio"] == pytest.approx(0.01 / 0.30)
    rows = c["shortcut_options"]["evidence"]["depths"]
    assert [(r["depth"], r["spread"], r["all_beat_plain"]) for r in rows] == [
        (20, pytest.approx(0.01), True),
        (56, pytest.approx(0.01), True),
    ]
    assert c["parameter_counts"]["evidence"]["depths"][0] == {
        "depth": 20,
        "plain_num_params": 20000,
        "A_num_params": 20000,
        "B_num_params": 20500,
        "C_num_params": 24000,
        "held": True,
    }


def test_thresholds_are_the_issues():
    assert report.DEGRADATION_MIN_GAP == 0.0
    assert report.RESIDUAL_MAX_RATIO == pytest.approx(1 / 3)
    assert report.DEPTH_TOLERANCE == 0.02
    assert report.SHORTCUT_MAX_SPREAD == 0.02


def test_a_not_held_when_the_deeper_plain_net_trains_better():
    c = by_id(report.claims(sweep(plain_56=(0.04, 0.33))))
    assert c["degradation"]["held"] is False
    evidence = c["degradation"]["evidence"]
    assert (evidence["plain_shallow_final_train_error"], evidence["plain_deep_final_train_error"]) == (0.05, 0.04)
    assert evidence["gap"] == pytest.approx(-0.01)
    assert c["residual_fixes_degradation"]["held"] is True  # 1% < 4% / 3: the others still hold


def test_a_not_held_on_a_tie():
    # "Deeper trains worse" needs a gap above DEGRADATION_MIN_GAP (0): equal errors do not show it.
    c = by_id(report.claims(sweep(plain_56=(0.05, 0.33))))
    assert c["degradation"]["held"] is False


def test_b_not_held_when_the_deep_resnet_trains_no_better_than_a_third_of_plain():
    c = by_id(report.claims(sweep(A_20=(0.14, 0.05), A_56=(0.15, 0.04))))
    assert c["residual_fixes_degradation"]["held"] is False
    evidence = c["residual_fixes_degradation"]["evidence"]
    assert evidence["depth"] == 56
    assert (evidence["plain_final_train_error"], evidence["resnet_A_final_train_error"]) == (0.30, 0.15)
    assert evidence["ratio"] == pytest.approx(0.5)
    assert evidence["max_ratio"] == pytest.approx(1 / 3)
    assert c["residual_gains_from_depth"]["held"] is True  # 15% vs 14%: within 2 points


def test_b_when_plain_reaches_zero():
    # Nothing is under a third of 0: no degradation to fix, and the claim cannot be seen.
    c = by_id(report.claims(sweep(plain_20=(0.0, 0.08), plain_56=(0.0, 0.33), A_56=(0.0, 0.04))))
    assert c["residual_fixes_degradation"]["held"] is False
    assert c["residual_fixes_degradation"]["evidence"]["ratio"] is None


def test_c_not_held_when_the_deeper_resnet_trains_more_than_2_points_worse():
    c = by_id(report.claims(sweep(A_20=(0.02, 0.05), A_56=(0.05, 0.04))))
    assert c["residual_gains_from_depth"]["held"] is False
    evidence = c["residual_gains_from_depth"]["evidence"]
    assert (evidence["resnet_A_shallow_final_train_error"], evidence["resnet_A_deep_final_train_error"]) == (0.02, 0.05)
    assert evidence["difference"] == pytest.approx(0.03)
    assert evidence["tolerance"] == 0.02
    assert c["residual_fixes_degradation"]["held"] is True  # 5% < 30% / 3


def test_c_holds_at_exactly_2_points_despite_float_rounding():
    # 0.05 - 0.03 is 0.020000000000000004 in floats: still "within 2 points".
    c = by_id(report.claims(sweep(A_20=(0.03, 0.05), A_56=(0.05, 0.04))))
    assert c["residual_gains_from_depth"]["held"] is True


def test_d_not_held_when_an_option_does_not_beat_plain():
    c = by_id(report.claims(sweep(B_56=(0.01, 0.40))))
    assert c["shortcut_options"]["held"] is False
    rows = {r["depth"]: r for r in c["shortcut_options"]["evidence"]["depths"]}
    assert rows[20]["held"] is True
    assert rows[56]["plain_best_val_error"] == 0.33 and rows[56]["B_best_val_error"] == 0.40
    assert rows[56]["all_beat_plain"] is False and rows[56]["held"] is False


def test_d_lets_a_shallow_plain_net_match_the_resnets():
    """At a depth where plain nets do not degrade, a plain net as good as the ResNets (1 digit of
    360 better) is the paper's "comparably accurate" (Table 2, 18 layers), not a failed claim."""
    shallow = {"A_20": (0.002, 0.0083), "B_20": (0.003, 0.0083), "C_20": (0.001, 0.0111)}
    c = by_id(report.claims(sweep(plain_20=(0.005, 0.0028), **shallow)))
    rows = {r["depth"]: r for r in c["shortcut_options"]["evidence"]["depths"]}
    assert rows[20]["all_beat_plain"] is False and rows[20]["held"] is True
    assert c["shortcut_options"]["held"] is True


def test_d_not_held_when_the_options_differ_by_more_than_2_points():
    c = by_id(report.claims(sweep(C_20=(0.015, 0.01))))
    assert c["shortcut_options"]["held"] is False
    row = c["shortcut_options"]["evidence"]["depths"][0]
    assert row["depth"] == 20 and row["all_beat_plain"] is True
    assert (row["A_best_val_error"], row["C_best_val_error"]) == (0.05, 0.01)
    assert row["spread"] == pytest.approx(0.04)
    assert c["shortcut_options"]["evidence"]["max_spread"] == 0.02


@pytest.mark.parametrize(
    ("shortcut", "num_params"),
    [("A", 20010), ("B", 20000), ("C", 20400)],  # A adds some; B adds none; C fewer than B
)
def test_e_not_held_when_the_parameter_counts_break_the_order(shortcut, num_params):
    trials = sweep()
    trial = next(t for t in trials if (t["depth"], t["shortcut"]) == (20, shortcut))
    trial["num_params"] = num_params
    if shortcut == "C":
        next(t for t in trials if (t["depth"], t["shortcut"]) == (20, "B"))["num_params"] = 20500
    c = by_id(report.claims(trials))
    assert c["parameter_counts"]["held"] is False
    rows = {r["depth"]: r for r in c["parameter_counts"]["evidence"]["depths"]}
    assert rows[20][f"{shortcut}_num_params"] == num_params and rows[20]["held"] is False
    assert rows[56]["held"] is True


def test_not_tested_on_one_depth():
    results = by_id(report.claims([t for t in sweep() if t["depth"] == 20]))
    assert results["degradation"]["held"] is None
    assert "two depths" in results["degradation"]["evidence"]["reason"]
    assert results["degradation"]["evidence"]["plain_depths"] == [20]
    assert results["residual_gains_from_depth"]["held"] is None
    # One depth still compares plain with A, and the options with each other.
    assert results["residual_fixes_degradation"]["evidence"]["depth"] == 20
    assert results["shortcut_options"]["held"] is True
    assert results["parameter_counts"]["held"] is True


def test_not_tested_without_plain_nets():
    results = by_id(report.claims([t for t in sweep() if t["shortcut"] != "none"]))
    for claim in ("degradation", "residual_fixes_degradation", "shortcut_options", "parameter_counts"):
        assert results[claim]["held"] is None and results[claim]["evidence"]["reason"]
    assert results["residual_gains_from_depth"]["held"] is True


def test_not_tested_without_option_a_or_without_b_and_c():
    no_a = by_id(report.claims([t for t in sweep() if t["shortcut"] != "A"]))
    assert [no_a[i]["held"] for i in IDS] == [True, None, None, None, None]
    plain_and_a = by_id(report.claims([t for t in sweep() if t["shortcut"] in ("none", "A")]))
    assert [plain_and_a[i]["held"] for i in IDS] == [True, True, True, None, None]
    assert "A, B and C" in plain_and_a["shortcut_options"]["evidence"]["reason"]


def test_not_tested_on_an_empty_sweep():
    assert [c["held"] for c in report.claims([])] == [None] * 5


def test_failed_trials_are_skipped_and_named():
    # B failed at 56 (its record has "error" in place of the numbers), and a 110-layer plain net.
    trials = [failed_trial(56, "B") if (t["depth"], t["shortcut"]) == (56, "B") else t for t in sweep()]
    trials.append(failed_trial(110, "none"))
    results = by_id(report.claims(trials))
    for c in results.values():
        assert c["evidence"]["skipped_failed_trials"] == ["ResNet-56 (B)", "plain-110"]
    assert results["degradation"]["held"] is True
    assert results["degradation"]["evidence"]["deep_depth"] == 56  # not the failed 110
    # Depth 56 lost its B: the options are compared at 20 only, and 56 is named as untested.
    assert [r["depth"] for r in results["shortcut_options"]["evidence"]["depths"]] == [20]
    assert results["shortcut_options"]["evidence"]["untested_depths"] == [56]
    assert "skipped_failed_trials" not in report.claims(sweep())[0]["evidence"]


@pytest.fixture
def params():
    return params_module.load(REPO / "params.yaml", ["data.source=digits"])


def test_results_md_lists_every_claim_with_its_verdict(tmp_path, params):
    # a not held (plain-56 trains better), b and c held, d and e not tested (no B, C); a failure.
    trials = [t for t in sweep(plain_56=(0.04, 0.33)) if t["shortcut"] in ("none", "A")] + [failed_trial(56, "B")]
    results = report.write_report(tmp_path, params, trials, None, None, 0.0111)
    assert json.loads((tmp_path / "claims.json").read_text()) == results
    text = (tmp_path / "results.md").read_text()
    section = text[text.index("## The paper's claims") :]
    verdicts = {"degradation": "**not held**", "residual_fixes_degradation": "held"}
    verdicts |= {
        "residual_gains_from_depth": "held",
        "shortcut_options": "not tested",
        "parameter_counts": "not tested",
    }
    for c in results:
        row = next(line for line in section.splitlines() if line.startswith(f"| {c['claim']} |"))
        assert row.split(" | ")[1] == verdicts[c["id"]]
    assert "plain deep final train error: 4.00%" in section  # the numbers, in %
    assert "ratio: 0.250" in section
    assert "2 held, 1 not held, 2 not tested." in section
    assert "Failed trials, left out of every claim: ResNet-56 (B)." in section
    assert "| 56 | ResNet (B) | failed |" in text
    assert "SVC baseline" in text and "1.11%" in text


# --- results.md's table, and how the evidence reads ------------------------------------------

# eval.json as pipeline.evaluate writes it, and registry.json as pipeline.register does.
EVALUATION = {
    "mlflow_run_id": "run-56-A", "checkpoint_name": "checkpoint_000003", "depth": 56, "shortcut": "A",
    "split": "test", "crop": "single", "top1_error": 0.0111, "top5_error": 0.0, "loss": 0.05, "num_samples": 360,
}  # fmt: skip
REGISTRY = {
    "registered_model": "resnet-digits", "version": 3, "alias": "champion", "alias_moved": True,
    "message": "alias 'champion' -> version 3 (no version held it)",
}  # fmt: skip


def table_lines(text: str) -> list[str]:
    """The rows of results.md's first table, its header and rule included."""
    start = text.index("| depth |")
    return text[start : text.index("\n\n", start)].splitlines()


def test_results_table_has_a_headline_a_row_a_trial_and_the_papers_number_beside_option_a(params):
    trials = [finished_trial(20, "none", 0.05, 0.08), finished_trial(20, "A", 0.02, 0.05), failed_trial(56, "B")]
    text = report.results_table(params, trials, None, None, None)
    assert text.splitlines()[0] == "# Sweep results: digits, cifar-style nets"
    header, rule, *rows = table_lines(text)
    assert header == (
        "| depth | shortcut | params | best val top-1 | final train top-1 | final val top-1 | epochs | wall | overhead "
        "| paper |"
    )
    assert rule == "|---|---|---|---|---|---|---|---|---|---|"
    assert rows == [
        "| 20 | plain | 20,000 | 8.00% | 5.00% | 8.00% | 4 | 12 s | 3 s |  |",  # Table 6 has ResNets (A) only
        "| 20 | ResNet (A) | 20,000 | 5.00% | 2.00% | 5.00% | 4 | 12 s | 3 s | 8.75% (CIFAR-10, Table 6) |",
        "| 56 | ResNet (B) | failed |  |  |  |  |  |  |  |",
    ]
    # Nothing was evaluated, registered or fitted: no line pretends it was.
    assert "Best trial" not in text and "Registry:" not in text and "SVC baseline" not in text
    assert text.endswith(".\n") and not text.endswith("\n\n")


def test_results_table_ends_with_the_claims_section_of_the_same_trials(params):
    trials = sweep()
    text = report.results_table(params, trials, None, None, None)
    section = text[text.index("## The paper's claims, checked on this sweep") :]
    assert text.index("| depth |") < text.index("## The paper's claims")
    assert section == report.claims_section(report.claims(trials))
    assert "5 held, 0 not held, 0 not tested." in section
    assert len(table_lines(text)) == 2 + len(trials)


def test_results_table_gives_the_test_figures_the_ten_crop_ones_the_baseline_and_the_registry(params):
    evaluation = {**EVALUATION, "ten_crop": {"top1_error": 0.0083, "top5_error": 0.0, "loss": 0.04, "num_samples": 360}}
    text = report.results_table(params, sweep(), evaluation, REGISTRY, 0.0111)
    lines = text.splitlines()
    assert (
        "Best trial (56-layer, shortcut A) on 360 test images, single crop: top-1 error 1.11%, top-5 error 0.00%."
    ) in lines
    assert "10-crop: top-1 error 0.83%, top-5 error 0.00%." in lines
    assert (
        "SVC baseline (scikit-learn, gamma=0.001), fitted on the same train split, on the test split: top-1 error 1.11%."
    ) in lines
    assert "Registry: resnet-digits version 3; alias 'champion' -> version 3 (no version held it)." in lines
    assert "10-crop" not in report.results_table(params, sweep(), EVALUATION, None, None)


def test_results_table_of_imagenet_size_nets_cites_tables_2_and_3():
    params = params_module.load(REPO / "params.yaml", ["model.arch=imagenet", "model.depth=18"])
    trials = [finished_trial(34, "none", 0.3, 0.3), finished_trial(34, "B", 0.2, 0.25), finished_trial(50, "A", 0.2, 0.2)]
    text = report.results_table(params, trials, None, None, None)
    assert text.splitlines()[0] == "# Sweep results: digits, imagenet-style nets"
    papers = [row.strip("|").split("|")[-1].strip() for row in table_lines(text)[2:]]
    assert papers == ["28.54% (ImageNet 10-crop, Tables 2-3)", "24.52% (ImageNet 10-crop, Tables 2-3)", ""]


def test_trial_metrics_name_each_finished_trial_in_the_sweeps_order_and_leave_out_failures():
    trials = [finished_trial(56, "C", 0.008, 0.03), failed_trial(20, "A"), finished_trial(20, "none", 0.05, 0.08)]
    metrics = report.trial_metrics(trials)
    assert list(metrics) == ["resnet-56-C", "plain-20"]
    assert metrics["resnet-56-C"] == {"best_val_error": 0.03, "final_train_error": 0.008}
    assert report.trial_metrics([failed_trial(20, "A")]) == {}


def test_a_curve_csv_counts_epochs_from_1_and_keeps_every_digit_of_the_errors():
    curve = {"epoch": [0, 1, 2], "train_top1_error": [1, 1 / 3, 0.0], "val_top1_error": [0.9, 2 / 3, 0.1]}
    text = report.curve_csv({"curve": curve})
    header, *rows = text.splitlines()
    assert header == "epoch,train_error,val_error" and text.endswith("\n")
    assert rows[0] == "1,1.0,0.9"
    parsed = [tuple(map(float, row.split(","))) for row in rows]
    assert parsed == [(1, 1.0, 0.9), (2, 1 / 3, 2 / 3), (3, 0.0, 0.1)]  # read back exactly
    empty = {"epoch": [], "train_top1_error": [], "val_top1_error": []}
    assert report.curve_csv({"curve": empty}) == "epoch,train_error,val_error\n"


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("ratio", None, "n/a"),
        ("all_beat_plain", True, "yes"),
        ("held", False, "no"),  # a bool, not the int 0
        ("B_num_params", 1_734_000, "1,734,000"),
        ("deep_depth", 1202, "1202"),
        ("ratio", 0.25, "0.250"),
        ("max_ratio", 1 / 3, "0.333"),
        ("gap", 0.25, "25.00%"),
        ("difference", -0.01, "-1.00%"),
        ("plain_deep_final_train_error", 0.0028, "0.28%"),
        ("untested_depths", [56, 110], "56, 110"),
        ("untested_depths", [], "none"),
        ("reason", "needs two depths", "needs two depths"),
        ("evidence", {"plain_num_params": 20000, "spread": 0.01}, "plain num params: 20,000, spread: 1.00%"),
    ],
)
def test_format_value_shows_errors_in_percent_ratios_as_decimals_and_counts_with_commas(key, value, shown):
    assert report.format_value(key, value) == shown


def test_per_depth_rows_read_as_layers_with_their_numbers():
    row = {"depth": 20, "plain_best_val_error": 0.0333, "spread": 0.01, "all_beat_plain": False, "held": True}
    assert report.format_row(row) == "20 layers (plain best val error: 3.33%, spread: 1.00%, all beat plain: no, held: yes)"
    assert report.format_row({"spread": 0.01}) == "spread: 1.00%"  # no depth: the plain evidence
    rows = [{"depth": 20, "held": True}, {"depth": 56, "A_num_params": 56000, "held": False}]
    assert report.format_value("depths", rows) == "20 layers (held: yes); 56 layers (A num params: 56,000, held: no)"


def test_dvc_declares_claims_json_a_metric_of_the_report_stage():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    assert {"${paths.reports}/claims.json": {"cache": False}} in stage["metrics"]


# --- What DVC compares across experiments: trials.json and curves/ ---------------------------


def test_trials_json_holds_each_finished_trials_errors_under_its_name(tmp_path, params):
    trials = [failed_trial(56, "B") if (t["depth"], t["shortcut"]) == (56, "B") else t for t in sweep()]
    report.write_report(tmp_path, params, trials, None, None, None)
    written = json.loads((tmp_path / "trials.json").read_text())
    # In the sweep's order; the failed ResNet-56 (B) has no numbers, so no entry.
    assert list(written) == [
        "plain-20", "resnet-20-A", "resnet-20-B", "resnet-20-C", "plain-56", "resnet-56-A", "resnet-56-C",
    ]  # fmt: skip
    assert written["plain-56"] == {"best_val_error": 0.33, "final_train_error": 0.30}
    assert written["resnet-56-C"] == {"best_val_error": 0.03, "final_train_error": 0.008}
    # One level of nesting, numbers only: DVC's metrics are numbers under dotted key paths.
    assert all(set(errors) == {"best_val_error", "final_train_error"} for errors in written.values())
    assert all(isinstance(v, float) for errors in written.values() for v in errors.values())


def test_curves_are_one_csv_per_finished_trial_epochs_from_1(tmp_path, params):
    trials = [t for t in sweep() if t["depth"] == 20] + [failed_trial(56, "none")]
    report.write_report(tmp_path, params, trials, None, None, None)
    curves = tmp_path / "curves"
    assert sorted(p.name for p in curves.iterdir()) == [
        "plain-20.csv", "resnet-20-A.csv", "resnet-20-B.csv", "resnet-20-C.csv",
    ]  # fmt: skip
    # finished_trial(): train 0.9, 0.5, then halfway to 0.05, then 0.05; val 0.9, 0.6, halfway, 0.08.
    assert (curves / "plain-20.csv").read_text() == (
        "epoch,train_error,val_error\n"
        "1,0.9,0.9\n"
        "2,0.5,0.6\n"
        f"3,{(0.5 + 0.05) / 2!r},{(0.6 + 0.08) / 2!r}\n"
        "4,0.05,0.08\n"
    )


def test_a_new_sweep_replaces_the_curves_folder_whole(tmp_path, params):
    report.write_curves(tmp_path, sweep())
    assert len(list((tmp_path / "curves").iterdir())) == 8
    # The next sweep has depth 20 only: no curve of a 56-layer net may stay behind.
    report.write_report(tmp_path, params, [t for t in sweep() if t["depth"] == 20], None, None, None)
    assert sorted(p.stem for p in (tmp_path / "curves").iterdir()) == [
        "plain-20", "resnet-20-A", "resnet-20-B", "resnet-20-C",
    ]  # fmt: skip
    assert set(json.loads((tmp_path / "trials.json").read_text())) == {
        "plain-20", "resnet-20-A", "resnet-20-B", "resnet-20-C",
    }  # fmt: skip
    # Nothing left under a temporary name.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "claims.json", "curves", "curves.png", "final_errors.png", "results.md", "trials.json",
    ]  # fmt: skip


def test_what_dvc_compares_holds_no_path_of_this_machine(tmp_path, params):
    # The records name checkpoints (file:///ckpt/...) and MLflow runs; Git keeps trials.json and
    # curves/, so none of that may reach them.
    report.write_report(tmp_path, params, sweep() + [failed_trial(110, "A")], None, None, None)
    for path in [tmp_path / "trials.json", *(tmp_path / "curves").iterdir()]:
        text = path.read_text()
        assert "ckpt" not in text and "run-" not in text and str(tmp_path) not in text and "/" not in text


def test_no_trial_finished_gives_empty_trials_and_curves(tmp_path, params):
    report.write_report(tmp_path, params, [failed_trial(20, "none"), failed_trial(20, "A")], None, None, None)
    assert json.loads((tmp_path / "trials.json").read_text()) == {}
    assert list((tmp_path / "curves").iterdir()) == []


def test_dvc_declares_trials_json_a_metric_and_the_curves_a_plot():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = dvc_yaml["stages"]["report"]
    assert {"${paths.reports}/trials.json": {"cache": False}} in stage["metrics"]
    assert {"${paths.reports}/curves": {"cache": False}} in stage["outs"]
    # The top-level plot draws the columns curve_csv writes, epoch along x.
    (plot,) = [p for p in dvc_yaml["plots"] if "${paths.reports}/curves" in p]
    definition = plot["${paths.reports}/curves"]
    header = report.curve_csv({"curve": {"epoch": [], "train_top1_error": [], "val_top1_error": []}})
    assert header.strip().split(",") == [definition["x"], *definition["y"]]


# Zeros and 70% side by side: what the default digits sweep produces after 20 epochs.
EXTREMES = {
    (20, "none"): (0.0, 0.0333),
    (20, "A"): (0.0, 0.0028),
    (20, "B"): (0.0, 0.0083),
    (56, "none"): (0.70, 0.69),
    (56, "A"): (0.0, 0.003),
    (56, "B"): (0.004, 0.053),
}


def test_the_pictures_are_written(tmp_path, params):
    trials = sweep(EXTREMES)
    report.write_report(tmp_path, params, trials + [failed_trial(56, "C")], None, None, 0.0111)
    for name in ("curves.png", "final_errors.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000


def test_curves_are_figure_6_plain_beside_resnet_on_a_linear_axis_from_0(tmp_path):
    trials = sweep(EXTREMES)
    fig = report.plot_curves(trials, tmp_path / "curves.png")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["plain", "ResNet (option A)", "ResNet (option B)"]
    top = max(100 * v for t in trials for k in ("train_top1_error", "val_top1_error") for v in t["curve"][k])
    for ax in axes:
        assert ax.get_yscale() == "linear"
        bottom, ceiling = ax.get_ylim()
        assert bottom == 0 and top <= ceiling <= 1.2 * top  # 0% drawn, no line above the plot
    plain = axes[0]
    styles = {line.get_label(): line.get_linestyle() for line in plain.get_lines()}
    assert styles["plain-20"] == "-" and styles["plain-56"] == "-"  # val: bold, named
    dashed = [line for line in plain.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2 and all(line.get_linewidth() < 2 for line in dashed)  # train: dashed, thin
    assert [t.get_text() for t in plain.get_legend().get_texts()][:2] == ["plain-20", "plain-56"]
    assert [t.get_text() for t in axes[1].get_legend().get_texts()][:2] == ["ResNet-20", "ResNet-56"]


def bar_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_text()]


def test_final_errors_read_from_70_percent_down_to_0(tmp_path):
    fig = report.plot_final_errors(sweep(EXTREMES), 0.0111, tmp_path / "final_errors.png")
    (train_all, train_zoom, val_all, val_zoom) = fig.axes[:4]
    assert "plain and ResNets" in train_all.get_title() and "ResNets only" in train_zoom.get_title()
    for ax in fig.axes[:4]:
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    # Every bar with its value; 70% on the full axis, and the zoomed axis scaled to the ResNets.
    assert bar_labels(train_all) == ["0.00%", "70.00%", "0.00%", "0.00%", "0.00%", "0.40%"]
    assert bar_labels(train_zoom) == ["0.00%", "0.00%", "0.00%", "0.40%"]
    assert train_all.get_ylim()[1] > 70
    assert 0.4 < train_zoom.get_ylim()[1] < 5
    assert bar_labels(val_zoom) == ["0.28%", "0.30%", "0.83%", "5.30%"]
    assert 5.3 < val_zoom.get_ylim()[1] < 10
    # The SVC baseline on the val panels, named with its value in the one legend.
    for ax in (val_all, val_zoom):
        assert [line.get_ydata()[0] for line in ax.get_lines()] == [pytest.approx(1.11)]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(legend) == ["ResNet (A)", "ResNet (B)", "SVC baseline, test (1.11%)", "plain"]


def test_svc_baseline_is_fitted_on_train_and_scored_on_test(monkeypatch):
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from pipeline import sources

    split = sources.digits_split
    calls = []

    def recording(*args):
        calls.append(split(*args))
        return calls[-1]

    monkeypatch.setattr(sources, "digits_split", recording)
    # data.seed 1: a split whose val and test errors differ, so the test can tell them apart.
    params = params_module.load(REPO / "params.yaml", ["data.source=digits", "data.seed=1"])
    error = report.svc_baseline(params)
    (train, val, test) = calls[0]
    assert len(test) == pytest.approx(params.data.test_fraction * 1797, abs=1)
    bunch = load_digits()
    svc = SVC(gamma=0.001).fit(bunch.data[train], bunch.target[train])
    on = {
        name: (svc.predict(bunch.data[idx]) != bunch.target[idx]).mean() for name, idx in (("val", val), ("test", test))
    }
    assert on["val"] != on["test"]
    assert error == on["test"] and 0 <= error < 0.05

    other = params_module.load(REPO / "params.yaml", ["data.source=cifar10", "data.root=/nowhere"])
    assert report.svc_baseline(other) is None


def test_claims_json_is_a_list_a_benchmark_can_read(tmp_path, params):
    results = report.write_report(tmp_path, params, sweep(), None, None, None)
    written = json.loads(Path(tmp_path / "claims.json").read_text())
    assert isinstance(written, list) and [c["held"] for c in written] == [True] * 5 == [c["held"] for c in results]
