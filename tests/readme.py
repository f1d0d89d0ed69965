"""README.md's own text, for the tests that run its commands verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def fenced_blocks() -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", (REPO / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE)


def readme_block(needle: str) -> str:
    """The one fenced block of README.md that contains `needle`."""
    found = [b for b in fenced_blocks() if needle in b]
    assert len(found) == 1, f"README.md has {len(found)} fenced blocks with {needle!r}"
    return found[0]


def new_user_env() -> dict[str, str]:
    """A shell after the quick start: the project's venv exists but is not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "RAY_AUTH_MODE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": path}


def bash(script: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=new_user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip
