"""The node-lost drill: what a lost node costs an elastic run, with step checkpoints and without.

    python benchmarks/node_lost.py [--every 4] [--kill-at 2 8] [--set KEY=VALUE ...] [--out FILE]

A local two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU each) trains the digits with
`train.num_workers=[1, 2]`: a rank on each node. At a set step of a set epoch, the second node's
raylet and its workers are killed (SIGKILL: a machine lost), the run goes on with one worker from its last
checkpoint, and once it has, a new node joins and the run grows back to two workers (Ray's
elastic resize, every `train.resize_check_seconds`). The drill runs twice, killed at the same
point: with a step checkpoint every `--every` steps, and with checkpoints at epochs' ends only
(ResNet-20 by default: `--set` adds params.yaml overrides).
Per run: its goodput (seconds of steps that count over wall seconds, as the run logs it), the
steps its restarts trained again, and their seconds. tests/integration/test_train.py runs the
drill and checks what it must keep (every epoch once, no sample twice in an epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from pipeline import loader, params, shard
from pipeline.records import RESTART_REDONE_S, RESTART_REDONE_STEPS
from pipeline.train import train

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 40  # for the run to outlast its growing back: Ray asks for more nodes every 20 s
DRILL = [
    "model.depth=8",
    "train.batch_size=64",
    "train.num_workers=[1, 2]",
    f"train.epochs={EPOCHS}",
    "train.checkpoints_to_keep=1",
    "train.resize_check_seconds=2",
]
# A lost node is declared dead after 3 missed health checks half a second apart (Ray's default:
# 5 missed 3 s apart), so that the drill's restarts do not wait on it.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
# Ray Train's settings, which it passes on to its controller: the polling of the project's own
# local clusters (pipeline.driver.LOCAL_CLUSTER_ENV: a report, and so a checkpoint, waits for the
# controller's next look, 2 s by default); and as Ray's elastic policy may still count the lost
# node's CPU when it restarts the group, how long it waits for the old size before it tries the
# workers there are (60 s by default).
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


@dataclass
class Drill:
    summary: dict  # pipeline.train's
    world_sizes: list[int]  # of each epoch, as MLflow has them
    goodput: float  # at the last epoch
    redone_steps: int
    redone_s: float
    restarts: int
    wall_s: float


def batch_log_lines(folder: Path) -> list[list[str]]:
    """Each line of the ranks' batch logs (`loader.Batches`) as its fields; one still being written is left out."""
    lines = [line.split(" ") for path in folder.glob("rank-*.txt") for line in path.read_text().splitlines()]
    return [fields for fields in lines if len(fields) >= 5]


def wait_for(condition, run, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if run.done():
            raise RuntimeError(f"the run ended before {what}: {run.result()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} in {timeout:.0f} s")
        time.sleep(0.05)


def kill_node(node) -> None:
    """SIGKILL a node's raylet and every process it started (its workers): a machine lost. (Killed
    alone, the raylet leaves its workers training until they next call on Ray.)"""
    (raylet,) = node.all_processes["raylet"]
    processes = [psutil.Process(raylet.process.pid)]
    processes += processes[0].children(recursive=True)
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def drill(folder: Path, shards: Path, *overrides: str, kill_at: tuple[int, int] = (2, 9)) -> Drill:
    """Train with the second of two nodes lost once rank 0 has taken step `kill_at[1]` of epoch
    `kill_at[0]` (both from 1), and a node added once the run goes on without it."""
    batches = folder / "batches"
    os.environ[loader.BATCH_LOG_ENV] = str(batches)  # before the nodes start: their workers inherit it
    os.environ.update(RAY_TRAIN_ENV)
    run_params = params.load(
        REPO / "params.yaml",
        [
            f"paths.shards={shards}",
            f"paths.ray_storage={folder / 'ray'}",
            f"paths.metrics={folder / 'metrics'}",
            f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
            "train.run_name=node-lost",
            *DRILL,
            *overrides,
        ],
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS},
    )
    started = time.monotonic()
    try:
        # The driver joins before the second node starts: Ray Train keeps its controller on the
        # driver's node, which the drill must not lose (two raylets on one IP: it could pick either).
        ray.init(address=cluster.address)
        spot = cluster.add_node(num_cpus=1)
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(train, run_params)
            epoch, step = kill_at[0] - 1, str(kill_at[1])
            wait_for(
                lambda: any(fields[2:4] == [str(epoch), step] for fields in batch_log_lines(batches)),
                run,
                f"step {kill_at[1]} of epoch {kill_at[0]}",
            )
            first_attempt = batch_log_lines(batches)[0][1]
            kill_node(spot)
            cluster.remove_node(spot, allow_graceful=False)  # what the raylet leaves
            wait_for(
                lambda: any(f[1] != first_attempt and f[3] != "start" for f in batch_log_lines(batches)),
                run,
                "step trained on the node left",
            )
            cluster.add_node(num_cpus=1)  # a replacement joins
            summary = run.result(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key in (loader.BATCH_LOG_ENV, *RAY_TRAIN_ENV):
            os.environ.pop(key, None)
    wall_s = time.monotonic() - started
    client = MlflowClient(run_params.mlflow.tracking_uri)
    run_id = summary["mlflow_run_id"]

    def metric(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    goodput = metric("goodput")
    return Drill(
        summary=summary,
        world_sizes=[int(w) for w in metric("world_size")],
        goodput=goodput[-1] if goodput else 0.0,
        redone_steps=int(sum(metric(RESTART_REDONE_STEPS))),
        redone_s=sum(metric(RESTART_REDONE_S)),
        restarts=len(metric(RESTART_REDONE_STEPS)),
        wall_s=wall_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=4, help="train.checkpoint_every_steps of the first run")
    parser.add_argument("--kill-at", type=int, nargs=2, default=(2, 8), metavar=("EPOCH", "STEP"))
    parser.add_argument("--set", action="append", default=["model.depth=20"], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "node_lost.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shard.shard(params.load(REPO / "params.yaml", [f"paths.shards={shards}"]))
        for name, every in (("step_checkpoints", str(args.every)), ("epoch_checkpoints", "null")):
            folder = Path(tmp) / name
            folder.mkdir()
            result = drill(
                folder, shards, *args.set, f"train.checkpoint_every_steps={every}", kill_at=tuple(args.kill_at)
            )
            results[name] = {k: v for k, v in asdict(result).items() if k != "summary"}
            print(f"{name}: {results[name]}", flush=True)
    step, epoch = results["step_checkpoints"], results["epoch_checkpoints"]
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "kill_at": {"epoch": args.kill_at[0], "step": args.kill_at[1]},
        "checkpoint_every_steps": args.every,
        "overrides": args.set,
        **results,
        "goodput_ratio": step["goodput"] / epoch["goodput"] if epoch["goodput"] else None,
        "redone_steps_saved": epoch["redone_steps"] - step["redone_steps"],
        "redone_s_saved": epoch["redone_s"] - step["redone_s"],
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"goodput {step['goodput']:.0%} with a step checkpoint every {args.every} steps, {epoch['goodput']:.0%} "
        f"with epoch checkpoints only ({out['goodput_ratio']:.2f}x); steps trained again: {step['redone_steps']} "
        f"against {epoch['redone_steps']}\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
