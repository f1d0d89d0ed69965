"""Training with real Ray (local and two-node clusters) and a real MLflow store. (A job submission: test_readme.)"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from benchmarks import node_lost
from pipeline import checkpoints, loader, shard
from pipeline import params as params_module
from pipeline.train import train
from tests.conftest import REPO
from tests.helpers import batch_log, steps_that_count

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


def kill_a_worker_at(process: subprocess.Popen, log: Path, epoch: int, step: int) -> None:
    """SIGKILL one of `process`'s Ray Train workers once rank 0's batch log shows it took `step`
    of `epoch` (both from 0 and 1, as the log has them)."""
    while process.poll() is None:
        if log.exists() and any(line.split(" ")[2:4] == [str(epoch), str(step)] for line in log.read_text().splitlines()):
            # This run's own local cluster's workers: the run beside it has its own.
            workers = [p for p in psutil.Process(process.pid).children(recursive=True) if is_train_worker(p)]
            assert workers, "no Ray Train worker process found"
            os.kill(random.choice(workers).pid, signal.SIGKILL)
            return
        time.sleep(0.005)


def run_train_stage(
    tmp_path: Path, shards: Path, run_name: str, *overrides: str, kill_at: tuple[int, int] | None = None
) -> tuple[dict, str]:
    """`python -m pipeline.train` in its own process (and its own local Ray), its ranks logging
    their batches to tmp_path/<run_name>-batches/; optionally SIGKILL a training worker once
    rank 0 has taken a given batch (`kill_a_worker_at`)."""
    overrides = [
        f"paths.shards={shards}",
        f"paths.ray_storage={tmp_path / 'ray'}",
        f"paths.metrics={tmp_path / run_name}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *TINY,
        "train.epochs=4",
        "train.max_failures=1",
        f"train.run_name={run_name}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env[loader.BATCH_LOG_ENV] = str(tmp_path / f"{run_name}-batches")
    command = [sys.executable, "-u", "-m", "pipeline.train", "--params", str(REPO / "params.yaml")]
    process = subprocess.Popen(
        command + [a for o in overrides for a in ("--set", o)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killer = None
    if kill_at is not None:
        rank_0_log = tmp_path / f"{run_name}-batches" / "rank-0.txt"
        killer = threading.Thread(target=kill_a_worker_at, args=(process, rank_0_log, *kill_at))
        killer.start()
    text = "".join(process.stdout)
    assert process.wait(timeout=600) == 0, text[-4000:]
    if killer is not None:
        killer.join()
    return json.loads((tmp_path / run_name / "train.json").read_text()), text


def batch_logs(folder: Path) -> dict[tuple[int, int, int], set[str]]:
    """{(rank, epoch, step): the hashes logged for it}: more than one, were a repeat not exact."""
    logged: dict[tuple[int, int, int], set[str]] = {}
    for entry in batch_log(folder):
        if entry.digest is not None:
            logged.setdefault((entry.rank, entry.epoch, entry.step), set()).add(entry.digest)
    return logged


def test_a_worker_killed_at_a_random_step_resumes_from_the_step_checkpoint_on_the_same_batches(tmp_path, shards):
    """Two runs side by side: one takes step checkpoints and loses a worker (SIGKILL) at a random
    step of its second epoch; the other runs straight, without step checkpoints. The killed run
    trains every batch of the straight one, in order, and any step it takes again is the same
    batch; it ends with the same weights, every epoch logged once."""
    step = random.Random().randint(7, 13)  # of 14 (1,077 digits in batches of 64 over 2 ranks)
    with ThreadPoolExecutor(2) as pool:
        killed_run = pool.submit(
            run_train_stage, tmp_path, shards, "killed", "train.checkpoint_every_steps=3", kill_at=(1, step)
        )
        straight_run = pool.submit(run_train_stage, tmp_path, shards, "straight")
        (killed, text), (straight, _) = killed_run.result(), straight_run.result()
    # Ray registers a checkpoint asynchronously, but a report waits until the one before it is
    # registered: the restart resumes from the step checkpoint before the kill, or the one before.
    assert "resuming killed at epoch 2, step " in text, (step, text[-6000:])
    killed_batches = batch_logs(tmp_path / "killed-batches")
    straight_batches = batch_logs(tmp_path / "straight-batches")
    assert {key: {digest} for key, (digest,) in straight_batches.items()} == straight_batches
    assert killed_batches == straight_batches, f"killed at epoch 2, step {step}"
    assert int(killed["metrics"]["epoch"]) == 3
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert [s for s, _ in history(uri, killed["mlflow_run_id"])] == [0, 1, 2, 3]  # every epoch once

    killed_curve = history(uri, killed["mlflow_run_id"], "train_loss")
    straight_curve = history(uri, straight["mlflow_run_id"], "train_loss")
    for (_, a), (_, b) in zip(killed_curve, straight_curve, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)  # the same curve, up to floating-point nondeterminism
    killed_net = checkpoints.load(killed["checkpoint"]).model
    for key, value in checkpoints.load(straight["checkpoint"]).model.items():
        assert torch.allclose(killed_net[key].float(), value.float(), rtol=1e-5, atol=1e-6), key


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


def step_checkpoints(storage: Path) -> list[tuple[int, int]]:
    """(epoch, step) of the step checkpoints a run's Ray storage holds now (one Ray is writing,
    or deleting as it rotates them, is skipped)."""
    found = []
    for path in storage.glob("*/checkpoint_*/checkpoint.pt"):
        try:
            state = checkpoints.load(path.parent)
        except (OSError, RuntimeError, EOFError):  # half written, or gone
            continue
        if state.progress is not None:
            found.append((state.epoch + 1, state.progress.steps))
    return found


def test_a_preemption_notice_takes_a_step_checkpoint_and_the_run_resumes_from_it(tmp_path, shards, monkeypatch, capfd):
    """Two nodes, a rank on each. `ray drain-node` gives the second a preemption notice with a
    deadline, as a cloud's reclaim does through Ray's autoscaler; the ranks take a step checkpoint
    at their next check; the node is then lost (removed) and a new one joins. The run restarts
    from the step checkpoint, not from the last epoch: no step before it is trained twice."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")  # 5 s by default: a few epochs here
    monkeypatch.setenv(loader.BATCH_LOG_ENV, str(tmp_path / "batches"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    overrides = ["train.epochs=6", "train.preemption_check_steps=1", "train.run_name=spot"]
    try:
        ray.init(address=cluster.address)  # before the spot node: Ray Train's controller lives on the driver's node
        spot = cluster.add_node(num_cpus=1)
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(train, tiny_params(tmp_path, shards, *overrides))
            rank_0_log = tmp_path / "batches" / "rank-0.txt"
            while not (rank_0_log.exists() and rank_0_log.read_text().count("\n") >= 3):
                assert not run.done(), run.result()
                time.sleep(0.02)
            drain = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                 "--node-id", spot.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                 "--reason-message", "spot instance reclaimed", "--deadline-remaining-seconds", "60"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert drain.returncode == 0, drain.stderr
            printed = ""
            while ", saved" not in printed:  # the step checkpoint, registered by Ray
                assert not run.done(), f"the run ended without a step checkpoint: {printed[-4000:]}"
                printed += capfd.readouterr().out
                time.sleep(0.02)
            taken = step_checkpoints(tmp_path / "ray")
            # The reclaim, before the deadline: the machine goes at once. (Ray counts the restart as a
            # preemption or, when a surviving rank's broken all-reduce is seen first, as a failure.)
            cluster.remove_node(spot, allow_graceful=False)
            cluster.add_node(num_cpus=1)  # the autoscaler's replacement
            summary = run.result(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
    printed += capfd.readouterr().out
    ((epoch, step),) = taken
    assert f": step checkpoint at epoch {epoch + 1}, step {step}, saved" in printed, printed[-4000:]
    assert re.search(r"preemption notice for rank [01], in \d+ s: ", printed)  # the rank on the drained node
    assert "resuming spot at epoch " in printed  # from the step checkpoint, or an epoch's end after it

    taken_at = Counter((e.rank, e.epoch, e.step) for e in batch_log(tmp_path / "batches") if e.digest is not None)
    steps = max(s for _, e, s in taken_at if e == 0)
    assert set(taken_at) == {(r, e, s) for r in (0, 1) for e in range(6) for s in range(1, steps + 1)}
    assert all(times == 1 for (_, e, s), times in taken_at.items() if (e, s) <= (epoch, step)), (epoch, step)
    assert summary["metrics"]["epoch"] == 5
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert [s for s, _ in history(uri, summary["mlflow_run_id"])] == list(range(6))  # every epoch once


def test_a_node_lost_mid_epoch_leaves_one_worker_going_on_from_the_step_checkpoint_and_the_run_grows_back(
    tmp_path, shards
):
    """`train.num_workers=[1, 2]` on two nodes; the second node's raylet SIGKILLed at step 9 of
    epoch 2 (benchmarks/node_lost.py). The run goes on with one worker from a step checkpoint of
    that epoch, grows back to two when a node joins, and ends with every epoch logged once, no
    sample trained twice in an epoch, and each restart's lost work within two checkpoints."""
    result = node_lost.drill(tmp_path, shards, "train.checkpoint_every_steps=2", kill_at=(2, 9))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = result.summary["mlflow_run_id"]
    assert [s for s, _ in history(uri, run_id)] == list(range(node_lost.EPOCHS))  # every epoch once
    assert result.world_sizes[0] == 2 and 1 in result.world_sizes and result.world_sizes[-1] == 2, result.world_sizes

    logged = batch_log(tmp_path / "batches")
    attempts = sorted({entry.attempt for entry in logged}, key=float)
    resumed_at = min((e.epoch, e.step) for e in logged if e.attempt == attempts[1] and e.digest is None)
    assert resumed_at[0] == 1 and resumed_at[1] in (6, 8), resumed_at  # mid-epoch: a step checkpoint's
    kept = steps_that_count(logged)
    for epoch in range(node_lost.EPOCHS):
        keys = [key for entry in kept if entry.epoch == epoch for key in entry.keys]
        assert len(keys) == len(set(keys)), f"epoch {epoch + 1}: a sample trained twice"
        steps = sorted({entry.step for entry in kept if entry.epoch == epoch})
        assert steps == list(range(1, len(steps) + 1)) and len(keys) == 64 * len(steps), f"epoch {epoch + 1}"
    assert result.restarts >= 2 and result.redone_steps <= 5 * result.restarts, result
    assert 0 < result.goodput < 1
