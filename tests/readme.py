"""README.md's and docs/*.md's own text, for the tests that run their commands verbatim.

Each command block is found by a needle, a string only that block holds, wherever it lives
(README.md or a page of docs/): moving a block between pages breaks no test. `NEEDLES` names every
needle the tests use and the test file that uses it; tests/test_docs.py fails on a fenced block
that no needle finds and `NOT_RUN` does not excuse, so a new command cannot go untested.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# needle -> the test file that runs (or checks) the one block holding it
NEEDLES = {
    "--set model.shortcut=D": "tests/integration/test_readme.py",
    "# CIFAR ResNet-20, option A": "tests/integration/test_readme.py",
    "ray job submit --address http://127.0.0.1:8265": "tests/integration/test_readme.py",
    "mlflow ui": "tests/integration/test_readme.py",
    'resnet.build("resnet50")': "tests/integration/test_readme.py",
    "ray job submit --address http://<head>:8265": "tests/integration/test_readme.py",
    "kubectl apply": "tests/integration/test_readme.py",
    "mlflow.pyfunc.load_model": "tests/integration/test_serving.py",
    "mlflow models serve": "tests/integration/test_serving.py",
    "dvc exp show": "tests/integration/test_dvc_experiments.py",  # reads README.md itself
}

# needle -> why its block is not run by a test that finds it
NOT_RUN = {
    "make repro\nmake test\n": "the quick start: CI (.ci/run) runs `make test`, and the slow tests run `dvc repro`",
    "stage: raw data set -> WebDataset tar shards": "README's layout map: text, not a command",
    "make drills\n": "tests the suite runs itself (tests/integration/test_train.py, in `make test`)",
}


def doc_files() -> list[Path]:
    """README.md, then every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks_of(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def fenced_blocks() -> list[str]:
    """Every fenced block of README.md and docs/*.md."""
    return [block for path in doc_files() for block in blocks_of(path.read_text())]


def readme_block(needle: str) -> str:
    """The one fenced block of README.md or docs/*.md that contains `needle`."""
    found = [b for b in fenced_blocks() if needle in b]
    assert len(found) == 1, f"README.md and docs/*.md have {len(found)} fenced blocks with {needle!r}"
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
