"""The Ray Train loop vs a plain single-process PyTorch loop, same model, batch, threads, data.

    python benchmarks/train_loop.py [--epochs 5] [--threads 1 2] [--repeats 3] [--out benchmarks/results/train_loop.json]

Both train CIFAR ResNet-20 on the digits shards (16x16, params.yaml's batch of 32, as the sweep
trains) with the same loader and recipe; images/s is the median of the training part of each
epoch after the first (Ray's start-up and per-epoch checkpointing are outside it, as they are
outside a plain loop's). Ray runs on the cluster the stages start on this machine
(`driver.ray_init`); each repeat runs the plain loop, then Ray, and the run with the median ratio
is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import ray
import torch
import torch.nn.functional as F

from pipeline import checkpoints, driver, loader, params, shard, tracking, transforms
from pipeline.manifest import read_manifest
from pipeline.train import train

REPO = Path(__file__).resolve().parent.parent


def plain_loop(p, epochs: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    manifest = read_manifest(p.paths.shards)
    torch.manual_seed(p.train.seed)
    model = checkpoints.build_model(p, len(manifest.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    rates = []
    for epoch in range(epochs):
        batches = loader.make_loader(
            p.paths.shards, "train", transforms.train_transform("cifar", flip=False),
            batch_size=p.train.batch_size, num_workers=0, epoch=epoch, seed=0, train=True, manifest=manifest,
        )  # fmt: skip
        model.train()
        seen, start = 0, time.perf_counter()
        for pixels, labels in batches:
            loss = F.cross_entropy(model(transforms.prepare_batch(pixels, manifest.mean, False)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def ray_loop(p) -> list[float]:
    driver.ray_init()
    try:
        summary = train(p)
    finally:
        ray.shutdown()
        # The local cluster's processes (children of this one) take seconds to end after
        # shutdown; the next repeat's plain loop would share the cores with them.
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=60)
    history = checkpoints.load(summary["checkpoint"])["history"]
    return [h["images_per_s"] for h in history]


def compare(p, epochs: int, threads: int) -> dict:
    p = p.model_copy(update={"train": p.train.model_copy(update={"cpus_per_worker": threads})})
    plain = plain_loop(p, epochs, threads)
    # A fresh run name: the same one would resume the last repeat's finished run.
    in_ray = ray_loop(p.model_copy(update={"train": p.train.model_copy(update={"run_name": f"bench-{time.time_ns()}"})}))
    plain_rate, ray_rate = statistics.median(plain[1:]), statistics.median(in_ray[1:])
    return {
        "threads": threads,
        "plain_img_per_s_by_epoch": plain,
        "ray_train_img_per_s_by_epoch": in_ray,
        "plain_img_per_s": plain_rate,
        "ray_train_img_per_s": ray_rate,
        "ratio": ray_rate / plain_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each comparison; the median is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_loop.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        p = params.load(
            REPO / "params.yaml",
            [
                f"paths.shards={tmp}/shards",
                f"paths.ray_storage={tmp}/ray",
                f"paths.metrics={tmp}/metrics",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"train.epochs={args.epochs}",
                "train.num_workers=1",
            ],
        )
        shard.shard(p)
        p = driver.absolute_paths(p)
        assert tracking.tracking_uri(p).startswith("sqlite:")
        runs = {threads: [compare(p, args.epochs, threads) for _ in range(args.repeats)] for threads in args.threads}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": f"cifar_resnet20, option A, digits 16x16, batch {p.train.batch_size}",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "by_threads": {
            str(threads): {"median": sorted(rs, key=lambda r: r["ratio"])[len(rs) // 2], "runs": rs}
            for threads, rs in runs.items()
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for threads, summary in result["by_threads"].items():
        median = summary["median"]
        spread = ", ".join(f"{r['ratio']:.2f}x" for r in summary["runs"])
        print(
            f"{threads} thread(s): plain PyTorch loop {median['plain_img_per_s']:5.0f} img/s, Ray Train one worker "
            f"{median['ray_train_img_per_s']:5.0f} img/s -> {median['ratio']:.2f}x ({spread})"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
