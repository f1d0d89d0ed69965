"""Step time with checkpoints uploaded to S3 as training goes on (`train.async_upload`), against
the same run waiting for each upload.

    python benchmarks/checkpoint_upload.py [--repeats 2] [--set KEY=VALUE ...] [--out FILE]

Starts a real S3-compatible server on 127.0.0.1 (moto's server mode, as the tests do), shards the
digits locally, and trains `pipeline.train` runs with their checkpoints in s3://: a checkpoint
every `train.checkpoint_every_steps` steps and at each epoch's end. The runs alternate, async
then sync, `--repeats` times, so a drift of the machine's speed falls on both. Per run: the time
of its epochs after the first, as the workers time them (`epoch_time_s`: training with its step
checkpoints, then val; the epoch-end checkpoint falls between epochs, uncounted). The figure is
the median over pairs of sync's time divided by async's: above 1, async saves time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import ray

from pipeline import checkpoints, params, shard
from pipeline.train import train

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = ["model.depth=20", "train.epochs=4", "train.checkpoint_every_steps=2", "train.checkpoints_to_keep=1"]


def s3_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the S3 server did not start")


def epochs_seconds(run: dict) -> list[float]:
    """The `epoch_time_s` of each epoch after the first."""
    history = checkpoints.load(run["checkpoint"]).history
    return [entry.epoch_time_s for entry in history[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "checkpoint_upload.json"))
    args = parser.parse_args()
    server, endpoint = s3_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    boto3.client("s3").create_bucket(Bucket="bench")
    runs: dict[str, list[list[float]]] = {"async": [], "sync": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = [
                f"paths.shards={tmp}/shards",
                f"paths.metrics={tmp}/metrics",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                *DEFAULTS,
                *args.set,
            ]
            shard.shard(params.load(REPO / "params.yaml", base))
            for repeat in range(args.repeats):
                for mode in ("async", "sync"):
                    run_params = params.load(
                        REPO / "params.yaml",
                        [
                            *base,
                            f"paths.ray_storage=s3://bench/{mode}-{repeat}",
                            f"train.run_name={mode}-{repeat}",
                            f"train.async_upload={mode == 'async'}",
                        ],
                    )
                    try:
                        runs[mode].append(epochs_seconds(train(run_params)))
                    finally:
                        ray.shutdown()
                    print(f"{mode} run {repeat + 1}: epochs of {runs[mode][-1]} s", flush=True)
    finally:
        server.terminate()
    ratios = [sum(s) / sum(a) for s, a in zip(runs["sync"], runs["async"], strict=True)]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "params": DEFAULTS + args.set,
        "epochs_s": runs,
        "ratio_sync_over_async": statistics.median(ratios),
        "ratios": ratios,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"sync / async epoch time: {result['ratio_sync_over_async']:.3f} (runs {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
