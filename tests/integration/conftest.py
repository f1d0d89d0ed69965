"""Fixtures for tests that run the pipeline's commands in a fresh clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def run(cmd: list[str], cwd: Path) -> str:
    # The clone's own params decide where MLflow and Ray are: nothing inherited from this process.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def make_clone(target: Path) -> Path:
    """A git clone of the committed pipeline plus this checkout's working copy of its code."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    # `dvc exp run` commits experiments: give the clone an identity of its own.
    for key, value in (("user.name", "pipeline tests"), ("user.email", "tests@localhost")):
        subprocess.run(["git", "-C", str(target), "config", key, value], check=True)
    for path in ("pipeline", "resnet", "dvc.yaml", "params.yaml", "README.md"):
        source = REPO / path
        if source.is_dir():
            shutil.rmtree(target / path)
            shutil.copytree(source, target / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / path)
    (target / "dvc.lock").unlink(missing_ok=True)
    return target


@pytest.fixture
def clone(tmp_path) -> Path:
    return make_clone(tmp_path / "repo")
