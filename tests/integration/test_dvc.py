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
