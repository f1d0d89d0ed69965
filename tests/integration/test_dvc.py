"""Real `dvc repro` in a fresh clone of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def clone(tmp_path) -> Path:
    """The committed pipeline plus this checkout's working copy of its code."""
    target = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    for path in ("pipeline", "resnet", "dvc.yaml", "params.yaml"):
        source = REPO / path
        if source.is_dir():
            shutil.rmtree(target / path)
            shutil.copytree(source, target / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / path)
    (target / "dvc.lock").unlink(missing_ok=True)
    return target


def test_repro_shards_verifies_and_reruns_only_what_changed(clone):
    out = run(["dvc", "repro"], clone)
    assert "Running stage 'shard'" in out and "Running stage 'verify'" in out
    metrics = json.loads((clone / "metrics" / "shards.json").read_text())
    assert metrics["train"]["num_samples"] == 1437 and metrics["val"]["num_samples"] == 360
    assert "up to date" in run(["dvc", "status"], clone)

    again = run(["dvc", "repro"], clone)
    assert "Running stage" not in again

    # A param of the shard stage changes: both stages rerun; the shards stay a DVC output.
    params = (clone / "params.yaml").read_text().replace("maxcount: 200", "maxcount: 300")
    (clone / "params.yaml").write_text(params)
    changed = run(["dvc", "repro"], clone)
    assert "Running stage 'shard'" in changed
    assert len(list((clone / "data" / "shards" / "train").glob("*.tar"))) == 5
    assert "up to date" in run(["dvc", "status"], clone)
    assert "1437" in run(["dvc", "metrics", "show"], clone)
