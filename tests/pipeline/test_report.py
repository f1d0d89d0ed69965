"""The report stage: the Claims section and table of results.md, what DVC compares (trials.json,
curves/), and the pictures (Figure 6's layout; bars readable from 0.3% to 70%). No Ray, no
training: records as pipeline.tune writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import claims, report
from pipeline import params as params_module
from pipeline.artifacts import Evaluation, Registration, Scores
from pipeline.records import Curve
from tests.conftest import REPO
from tests.helpers import failed_trial, finished_trial, sweep_of
from tests.pipeline.test_claims import sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def params():
    return params_module.load(REPO / "params.yaml", ["data.source=digits"])


def test_results_md_lists_every_claim_with_its_verdict(tmp_path, params):
    # a not held (plain-56 trains better), b and c held, d and e not tested (no B, C); a failure.
    trials = [t for t in sweep(plain_56=(0.04, 0.33)) if t.shortcut in ("none", "A")] + [failed_trial(56, "B")]
    results = report.write_report(tmp_path, params, sweep_of(trials), None, None, 0.0111)
    assert json.loads((tmp_path / "claims.json").read_text()) == [c.model_dump(mode="json") for c in results]
    text = (tmp_path / "results.md").read_text()
    section = text[text.index("## The paper's claims") :]
    verdicts = {"degradation": "**not held**", "residual_fixes_degradation": "held"}
    verdicts |= {
        "residual_gains_from_depth": "held",
        "shortcut_options": "not tested",
        "parameter_counts": "not tested",
    }
    for c in results:
        row = next(line for line in section.splitlines() if line.startswith(f"| {c.claim} |"))
        assert row.split(" | ")[1] == verdicts[c.id]
    assert "plain deep final train error: 4.00%" in section  # the numbers, in %
    assert "ratio: 0.250" in section
    assert "2 held, 1 not held, 2 not tested." in section
    assert "Failed trials, left out of every claim: ResNet-56 B." in section
    assert "| ResNet-56 B | failed |" in text
    assert "SVC baseline" in text and "1.11%" in text


# --- results.md's table, and how the evidence reads ------------------------------------------

# eval.json as pipeline.evaluate writes it, and registry.json as pipeline.register does.
EVALUATION = Evaluation(
    mlflow_run_id="run-56-A", checkpoint_name="checkpoint_000003", depth=56, shortcut="A", split="test",
    crop="single", top1_error=0.0111, top5_error=0.0, loss=0.05, num_samples=360,
)  # fmt: skip
REGISTRY = Registration(
    registered_model="resnet-digits", version=3, alias="champion", alias_moved=True, champion_version=3,
    val_top1_error=0.04, val_loss=0.1, test_top1_error=0.0111, test_top5_error=0.0,
    model_uri="models:/resnet-digits/3", message="alias 'champion' -> version 3 (no version held it)",
)  # fmt: skip


def table_lines(text: str) -> list[str]:
    """The rows of results.md's first table, its header and rule included."""
    start = text.index("| trial |")
    return text[start : text.index("\n\n", start)].splitlines()


def test_results_table_has_a_headline_a_row_a_trial_and_the_papers_number_beside_option_a(params):
    trials = [finished_trial(20, "none", 0.05, 0.08), finished_trial(20, "A", 0.02, 0.05), failed_trial(56, "B")]
    text = report.results_table(params, trials, None, None, None)
    assert text.splitlines()[0] == "# Sweep results: digits, cifar-style nets"
    header, rule, *rows = table_lines(text)
    assert header == (
        "| trial | params | best val top-1 | final train top-1 | final val top-1 | epochs | wall | overhead | goodput | redone steps | paper |"
    )
    assert rule == "|---|---|---|---|---|---|---|---|---|---|---|"
    assert rows == [
        "| plain-20 | 20,000 | 8.00% | 5.00% | 8.00% | 4 | 12 s | 3 s | 50% | 0 |  |",  # Table 6 has ResNets (A) only
        "| ResNet-20 A | 20,000 | 5.00% | 2.00% | 5.00% | 4 | 12 s | 3 s | 50% | 0 | 8.75% (CIFAR-10, Table 6) |",
        "| ResNet-56 B | failed |  |  |  |  |  |  |  |  |  |",
    ]
    # Nothing was evaluated, registered or fitted: no line pretends it was.
    assert "Best trial" not in text and "Registry:" not in text and "SVC baseline" not in text
    assert text.endswith(".\n") and not text.endswith("\n\n")


def test_results_table_ends_with_the_claims_section_of_the_same_trials(params):
    trials = sweep()
    text = report.results_table(params, trials, None, None, None)
    section = text[text.index("## The paper's claims, checked on this sweep") :]
    assert text.index("| trial |") < text.index("## The paper's claims")
    assert section == report.claims_section(claims.claims(trials))
    assert "5 held, 0 not held, 0 not tested." in section
    assert len(table_lines(text)) == 2 + len(trials)


def test_results_table_gives_the_test_figures_the_ten_crop_ones_the_baseline_and_the_registry(params):
    evaluation = EVALUATION.model_copy(update={"ten_crop": Scores(top1_error=0.0083, top5_error=0.0, loss=0.04, num_samples=360)})
    text = report.results_table(params, sweep(), evaluation, REGISTRY, 0.0111)
    lines = text.splitlines()
    assert (
        "Best trial (ResNet-56 A) on 360 test images, single crop: top-1 error 1.11%, top-5 error 0.00%."
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
    metrics = report.trial_metrics(sweep_of(trials).finished)
    assert list(metrics) == ["resnet-56-C", "plain-20"]
    assert metrics["resnet-56-C"] == {"best_val_error": 0.03, "final_train_error": 0.008}
    assert report.trial_metrics(sweep_of([failed_trial(20, "A")]).finished) == {}


def with_curve(epoch: list[int], train: list[float], val: list[float]):
    return finished_trial(20, "A", 0.1, 0.1).model_copy(
        update={"curve": Curve(epoch=epoch, train_top1_error=train, val_top1_error=val)}
    )


def test_a_curve_csv_counts_epochs_from_1_and_keeps_every_digit_of_the_errors():
    text = report.curve_csv(with_curve([0, 1, 2], [1.0, 1 / 3, 0.0], [0.9, 2 / 3, 0.1]))
    header, *rows = text.splitlines()
    assert header == "epoch,train_error,val_error" and text.endswith("\n")
    assert rows[0] == "1,1.0,0.9"
    parsed = [tuple(map(float, row.split(","))) for row in rows]
    assert parsed == [(1, 1.0, 0.9), (2, 1 / 3, 2 / 3), (3, 0.0, 0.1)]  # read back exactly
    assert report.curve_csv(with_curve([], [], [])) == "epoch,train_error,val_error\n"


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
    trials = [failed_trial(56, "B") if (t.depth, t.shortcut) == (56, "B") else t for t in sweep()]
    report.write_report(tmp_path, params, sweep_of(trials), None, None, None)
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
    trials = [t for t in sweep() if t.depth == 20] + [failed_trial(56, "none")]
    report.write_report(tmp_path, params, sweep_of(trials), None, None, None)
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
    report.write_report(tmp_path, params, sweep_of([t for t in sweep() if t.depth == 20]), None, None, None)
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
    report.write_report(tmp_path, params, sweep_of(sweep() + [failed_trial(110, "A")]), None, None, None)
    for path in [tmp_path / "trials.json", *(tmp_path / "curves").iterdir()]:
        text = path.read_text()
        assert "ckpt" not in text and "run-" not in text and str(tmp_path) not in text and "/" not in text


def test_no_trial_finished_gives_empty_trials_and_curves(tmp_path, params):
    report.write_report(tmp_path, params, sweep_of([failed_trial(20, "none"), failed_trial(20, "A")]), None, None, None)
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
    header = report.curve_csv(with_curve([], [], []))
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
    report.write_report(tmp_path, params, sweep_of(trials + [failed_trial(56, "C")]), None, None, 0.0111)
    for name in ("curves.png", "final_errors.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000


def test_curves_are_figure_6_plain_beside_resnet_on_a_linear_axis_from_0(tmp_path):
    trials = sweep(EXTREMES)
    fig = report.plot_curves(trials, tmp_path / "curves.png")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["plain", "ResNet (option A)", "ResNet (option B)"]
    top = max(100 * v for t in trials for k in ("train_top1_error", "val_top1_error") for v in getattr(t.curve, k))
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
    assert [t.get_text() for t in axes[1].get_legend().get_texts()][:2] == ["ResNet-20 A", "ResNet-56 A"]


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
    assert sorted(legend) == ["ResNet A", "ResNet B", "SVC baseline, test (1.11%)", "plain"]


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
    results = report.write_report(tmp_path, params, sweep_of(sweep()), None, None, None)
    written = json.loads(Path(tmp_path / "claims.json").read_text())
    assert isinstance(written, list) and [c["held"] for c in written] == [True] * 5 == [c.held for c in results]
