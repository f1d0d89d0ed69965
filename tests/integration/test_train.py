"""Training with real Ray (local and two-node clusters) and a real MLflow store. (A job submission: test_readme.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import psutil
import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline import checkpoints, shard
from pipeline import params as params_module
from pipeline.train import train
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = ["model.depth=8", "train.batch_size=64", "train.num_workers=2", "train.checkpoints_to_keep=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shards"
    shard.shard(params_module.load(REPO / "params.yaml", [f"paths.shards={out}"]))
    return out


def tiny_params(tmp_path: Path, shards: Path, *overrides: str):
    return params_module.load(
        REPO / "params.yaml",
        [
            f"paths.shards={shards}",
            f"paths.ray_storage={tmp_path / 'ray'}",
            f"paths.metrics={tmp_path / 'metrics'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *TINY,
            *overrides,
        ],
    )


def history(uri: str, run_id: str, key: str = "val_top1_error") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_rerunning_the_same_command_resumes_into_the_same_run(tmp_path, shards, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow samples system metrics every 10 s by default, longer than these 2 epochs may take;
    # the Ray workers inherit the environment of the cluster this test starts.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        first = train(tiny_params(tmp_path, shards, "train.epochs=2"))
        again = train(tiny_params(tmp_path, shards, "train.epochs=2"))
    finally:
        ray.shutdown()
    run_id = first["mlflow_run_id"]
    assert again["run_name"] == first["run_name"] and again["mlflow_run_id"] == run_id
    assert [s for s, _ in history(uri, run_id)] == [0, 1]  # nothing trained twice, nothing logged twice
    assert [h.epoch for h in checkpoints.load(again["checkpoint"]).history] == [0, 1]

    run = MlflowClient(uri).get_run(run_id)
    assert int(run.data.params["num_params"]) == 75290  # cifar_resnet8, option A, 10 classes
    assert len(run.data.params["manifest_sha256"]) == 64
    assert run.data.params["model.depth"] == "8" and run.data.params["train.epochs"] == "2"
    assert run.data.tags["ray.world_size"] == "2"
    assert run.data.tags["mlflow.source.git.commit"]
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr", "images_per_s", "epoch_time_s"):
        assert key in run.data.metrics
    assert any(k.startswith("system/cpu") for k in run.data.metrics)  # system metrics

    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run_id]  # logged once


def is_train_worker(process: psutil.Process) -> bool:
    try:
        return "ray::RayTrainWorker" in " ".join(process.cmdline())
    except psutil.Error:  # gone since it was listed
        return False


def run_train_stage(tmp_path: Path, shards: Path, run_name: str, kill_after_epoch: int | None = None) -> tuple[dict, str]:
    """`python -m pipeline.train` in its own process (and its own local Ray); optionally
    SIGKILL one training worker as soon as an epoch's line appears."""
    overrides = [
        f"paths.shards={shards}",
        f"paths.ray_storage={tmp_path / 'ray'}",
        f"paths.metrics={tmp_path / run_name}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *TINY,
        "train.epochs=4",
        "train.max_failures=1",
        f"train.run_name={run_name}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, "-u", "-m", "pipeline.train", "--params", str(REPO / "params.yaml")]
    process = subprocess.Popen(
        command + [a for o in overrides for a in ("--set", o)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:
        output.append(line)
        if kill_after_epoch is not None and f"epoch {kill_after_epoch}/4" in line:
            # This run's own local cluster's workers: the run beside it has its own.
            workers = [p for p in psutil.Process(process.pid).children(recursive=True) if is_train_worker(p)]
            assert workers, "no Ray Train worker process found"
            os.kill(workers[-1].pid, signal.SIGKILL)  # in the middle of the next epoch
            kill_after_epoch = None
    text = "".join(output)
    assert process.wait(timeout=600) == 0, text[-4000:]
    return json.loads((tmp_path / run_name / "train.json").read_text()), text


def test_a_killed_worker_restarts_from_the_last_checkpoint_on_the_same_curve(tmp_path, shards):
    """Two runs side by side, one of which loses a worker (SIGKILL) in its third epoch."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with ThreadPoolExecutor(2) as pool:
        killed_run = pool.submit(run_train_stage, tmp_path, shards, "killed", kill_after_epoch=2)
        straight_run = pool.submit(run_train_stage, tmp_path, shards, "straight")
        (killed, text), (straight, _) = killed_run.result(), straight_run.result()
    # Ray registers checkpoints asynchronously: the restart resumes from epoch 2's or epoch 3's.
    assert "resuming killed at epoch" in text, text[-6000:]
    assert int(killed["metrics"]["epoch"]) == 3
    assert [s for s, _ in history(uri, killed["mlflow_run_id"])] == [0, 1, 2, 3]  # every epoch once

    killed_curve = history(uri, killed["mlflow_run_id"], "train_loss")
    straight_curve = history(uri, straight["mlflow_run_id"], "train_loss")
    assert len(killed_curve) == len(straight_curve) == 4
    for (_, a), (_, b) in zip(killed_curve, straight_curve):
        assert abs(a - b) <= 1e-4 * abs(b)  # the same curve, up to floating-point nondeterminism


def test_two_nodes_one_worker_each(tmp_path, shards):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        summary = train(tiny_params(tmp_path, shards, "train.epochs=2"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["ray.world_size"] == "2"
    assert len(run.data.tags["ray.nodes"].split(",")) == 2  # one rank on each node
    curve = history(uri, summary["mlflow_run_id"], "train_loss")
    assert len(curve) == 2 and curve[1][1] < curve[0][1]  # it trained
