"""The Ray Train loop vs a plain single-process PyTorch loop, same model, batch, threads, data.

    python benchmarks/train_loop.py [--epochs 5] [--threads 2] [--out benchmarks/results/train_loop.json]

Both train CIFAR ResNet-20 on the digits shards (16x16, global batch 128) with the same loader
and recipe; images/s is the median of the training part of each epoch after the first (Ray's
start-up and per-epoch checkpointing are outside it, as they are outside a plain loop's).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

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
    model = checkpoints.build_model(p, len(manifest["classes"]))
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
            loss = F.cross_entropy(model(transforms.prepare_batch(pixels, manifest["mean"], False)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def ray_loop(p, epochs: int) -> list[float]:
    ray.init(num_cpus=p.train.cpus_per_worker, include_dashboard=False)
    try:
        summary = train(p)
    finally:
        ray.shutdown()
    history = checkpoints.load(summary["checkpoint"])["history"]
    return [h["images_per_s"] for h in history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
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
                f"train.cpus_per_worker={args.threads}",
            ],
        )
        shard.shard(p)
        p = driver.absolute_paths(p)
        assert tracking.tracking_uri(p).startswith("sqlite:")
        plain = plain_loop(p, args.epochs, args.threads)
        in_ray = ray_loop(p, args.epochs)
    plain_rate, ray_rate = statistics.median(plain[1:]), statistics.median(in_ray[1:])
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads of {args.threads} asked",
        "model": "cifar_resnet20, option A, digits 16x16, batch 128",
        "epochs": args.epochs,
        "plain_img_per_s_by_epoch": plain,
        "ray_train_img_per_s_by_epoch": in_ray,
        "plain_img_per_s": plain_rate,
        "ray_train_img_per_s": ray_rate,
        "ratio": ray_rate / plain_rate,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"plain PyTorch loop:        {plain_rate:7.0f} img/s")
    print(f"Ray Train, one worker:     {ray_rate:7.0f} img/s  -> {ray_rate / plain_rate:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
