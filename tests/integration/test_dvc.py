"""Real `dvc repro` in a fresh clone of the repository."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.files import disk_bytes
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


def cache_is_whole(clone: Path) -> bool:
    """Every object in DVC's local cache still holds what its name (its md5) says: an output
    edited through a link would have changed the cache's copy too."""
    objects = [p for p in (clone / ".dvc" / "cache" / "files" / "md5").glob("*/*")]
    assert objects
    return all(hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name.removesuffix(".dir") for p in objects)


def test_the_shards_are_on_disk_once_and_reruns_and_checkouts_keep_the_cache_whole(clone):
    def stored_once() -> bool:
        shards = clone / "data" / "shards"
        ratio = disk_bytes(shards, clone / ".dvc" / "cache") / disk_bytes(shards)
        assert ratio <= 1.05, f"shards and cache take {ratio:.2f}x the shards' own disk space"
        return all(p.stat().st_nlink == 2 for p in shards.rglob("*") if p.is_file())  # in the workspace, in the cache

    run(["dvc", "repro", "shard"], clone)
    assert stored_once()  # with DVC's default cache.type, a copy, it is about 2.06x
    assert cache_is_whole(clone)

    # The stage replaces its output: the links go, new files take their place, and DVC links those.
    rerun = run(["dvc", "repro", "--force", "shard"], clone)
    assert "Running stage 'shard'" in rerun
    assert "up to date" in run(["dvc", "status", "shard"], clone)
    assert stored_once() and cache_is_whole(clone)

    # So does the stage run by hand, outside DVC: its output is then a copy until `dvc checkout`.
    run(["python", "-m", "pipeline.shard"], clone)
    assert "up to date" in run(["dvc", "status", "shard"], clone)
    assert cache_is_whole(clone)

    shutil.rmtree(clone / "data" / "shards")
    run(["dvc", "checkout", "--relink", "shard"], clone)
    assert "up to date" in run(["dvc", "status", "shard"], clone)
    assert stored_once() and cache_is_whole(clone)


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
