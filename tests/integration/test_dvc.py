"""Real `dvc repro` in a fresh clone of the repository."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import run

pytestmark = pytest.mark.slow


def test_repro_shards_verifies_and_reruns_only_what_changed(clone):
    # The data half of the DAG (test_pipeline.py runs all of it).
    out = run(["dvc", "repro", "verify"], clone)
    assert "Running stage 'shard'" in out and "Running stage 'verify'" in out
    metrics = json.loads((clone / "metrics" / "shards.json").read_text())
    assert [metrics[split]["num_samples"] for split in ("train", "val", "test")] == [1077, 360, 360]
    assert "up to date" in run(["dvc", "status", "verify"], clone)

    again = run(["dvc", "repro", "verify"], clone)
    assert "Running stage" not in again

    # A param of the shard stage changes: both stages rerun; the shards stay a DVC output.
    params = (clone / "params.yaml").read_text().replace("maxcount: 200", "maxcount: 300")
    (clone / "params.yaml").write_text(params)
    changed = run(["dvc", "repro", "verify"], clone)
    assert "Running stage 'shard'" in changed
    assert len(list((clone / "data" / "shards" / "train").glob("*.tar"))) == 4
    assert "up to date" in run(["dvc", "status", "verify"], clone)
    assert "1077" in run(["dvc", "metrics", "show"], clone)

    # So does a data param the stage did not have before: the test split's size.
    params = (clone / "params.yaml").read_text().replace("test_fraction: 0.2", "test_fraction: 0.25")
    (clone / "params.yaml").write_text(params)
    changed = run(["dvc", "repro", "verify"], clone)
    assert "Running stage 'shard'" in changed
    metrics = json.loads((clone / "metrics" / "shards.json").read_text())
    assert [metrics[split]["num_samples"] for split in ("train", "val", "test")] == [987, 360, 450]


def test_a_code_change_reruns_exactly_the_stages_that_run_that_code(clone):
    """DVC's own view of dvc.yaml's code deps: edit a file, and `dvc status` names the stages
    whose import closure holds it (tests/test_layout.py checks the lists against the code)."""
    # Every output present (placeholders: this is about what DVC compares, not the stages' work),
    # then `dvc commit` records the current files as what each stage last ran on.
    for path in ("data/shards/train/shard-000000.tar", "metrics/shards.json", "reports/sweep.json",
                 "metrics/eval.json", "metrics/registry.json", "reports/results.md", "reports/curves/a.csv",
                 "reports/claims.json", "reports/trials.json", "reports/curves.png", "reports/final_errors.png"):  # fmt: skip
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        (clone / path).write_text("{}\n")
    run(["dvc", "commit", "--force"], clone)
    assert "up to date" in run(["dvc", "status"], clone)

    def rerun_after_editing(file: str) -> set[str]:
        original = (clone / file).read_text()
        (clone / file).write_text(original + "\n")
        try:
            status = json.loads(run(["dvc", "status", "--json"], clone))
        finally:
            (clone / file).write_text(original)
        return set(status)

    assert rerun_after_editing("pipeline/jpegcrop.c") == {"verify", "tune", "evaluate", "register"}
    assert rerun_after_editing("pipeline/manifest.py") == {"shard", "verify", "tune", "evaluate", "register", "report"}
    assert rerun_after_editing("pipeline/records.py") == {"tune", "evaluate", "register", "report"}
    assert rerun_after_editing("pipeline/report.py") == {"report"}
    assert rerun_after_editing("pipeline/outputs.py") == {"shard"}
