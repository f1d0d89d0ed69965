"""README and docs/ as written: their commands, taken from README.md and docs/*.md themselves
(tests/readme.py finds each block by a needle, whichever page holds it), run verbatim in a fresh
clone where the quick start has been done (the project's .venv, the digits' shards), in the shell
a new user has (the venv not on PATH, no RAY_ADDRESS, no MLFLOW_TRACKING_URI). The docs and the
code cannot drift apart: change a command there and this runs the new one.

Commands for a real cluster (`<head>`, docker, kubectl) cannot run here: their `--set` options are
checked against params, and the files they name must exist. `make repro` and `make test` are
what CI and README's recorded run execute."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from pipeline import params as params_module
from tests.conftest import REPO
from tests.integration.conftest import make_clone
from tests.readme import bash, new_user_env, readme_block

pytestmark = pytest.mark.slow

# Small enough for a test; README's commands are run as they are, on these params.
TINY = {"model": {"depth": 8}, "train": {"epochs": 1, "batch_size": 64, "checkpoints_to_keep": 1}}


@pytest.fixture(scope="module")
def quick_started(tmp_path_factory) -> Path:
    """A fresh clone after the quick start: .venv (this one), tiny params, the digits' shards."""
    repo = make_clone(tmp_path_factory.mktemp("readme") / "repo")
    (repo / ".venv").symlink_to(Path(sys.executable).parent.parent)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shard = bash(".venv/bin/python -m pipeline.shard", repo)
    assert shard.returncode == 0, shard.stdout
    return repo


def test_the_bad_params_example_prints_what_readme_shows(quick_started):
    command, shown = readme_block("--set model.shortcut=D").strip().splitlines()
    result = bash(command.removeprefix("$ "), quick_started)
    assert result.returncode == 2 and result.stdout.strip() == shown


def test_the_training_commands(quick_started):
    block = readme_block("# CIFAR ResNet-20, option A")
    result = bash(f"set -e\n{block}", quick_started)
    assert result.returncode == 0, result.stdout[-4000:]
    client = MlflowClient(f"sqlite:///{quick_started / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resnet").experiment_id])
    trained = {(r.data.params["model.depth"], r.data.params["model.shortcut"]) for r in runs}
    assert {("8", "A"), ("56", "none")} <= trained


def test_the_ray_job_block(quick_started):
    if ray.is_initialized():  # the block starts its own head on Ray's default ports
        ray.shutdown()
    block = readme_block("ray job submit --address http://127.0.0.1:8265")
    # The head's job agent comes up a few seconds after `ray start` returns, later on a busy
    # machine; until then Ray answers "No available agent to submit job": run the block again.
    for _ in range(5):
        result = bash(block, quick_started)
        if "No available agent to submit job" not in result.stdout:
            break
        time.sleep(5)
    assert "succeeded" in result.stdout.lower(), result.stdout[-4000:]
    summary = json.loads((quick_started / "metrics" / "train.json").read_text())
    run = MlflowClient(f"sqlite:///{quick_started / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=quick_started, capture_output=True, text=True, check=True).stdout.strip()
    assert run.info.status == "FINISHED" and "val_top1_error" in run.data.metrics
    assert run.data.tags["mlflow.source.git.commit"] == commit


def test_the_mlflow_ui_block_serves_the_runs(quick_started):
    command = readme_block("mlflow ui").strip()
    server = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=quick_started, env=new_user_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = re.search(r"open (http://127\.0\.0\.1:\d+)", (REPO / "README.md").read_text()).group(1)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=resnet") as r:
                    assert json.load(r)["experiment"]["name"] == "resnet"
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow ui did not answer"
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_model_family_snippet(quick_started):
    snippet = readme_block('resnet.build("resnet50")')
    result = bash(f".venv/bin/python - <<'EOF'\n{snippet}\nprint(type(model).__name__)\nEOF", quick_started)
    assert result.returncode == 0 and result.stdout.strip().endswith("ResNet"), result.stdout


def test_the_cluster_commands_name_real_params_and_files():
    sweep = readme_block("ray job submit --address http://<head>:8265")
    overrides = [m.strip("\"'") for m in re.findall(r"--set (\"[^\"]+\"|\S+)", sweep)]
    assert len(overrides) >= 10
    params = params_module.load(REPO / "params.yaml", overrides)
    assert params.model.arch == "imagenet" and params.train.use_gpu
    infra = readme_block("kubectl apply")
    for path in re.findall(r"infra/[\w./-]+\.(?:yaml|sh|Dockerfile)|infra/Dockerfile", infra):
        assert (REPO / path).is_file(), path
