"""One hash of everything the loader yields in an epoch: a change made for speed must leave it as
it was.

    python benchmarks/batch_hash.py SHARDS [--arch imagenet] [--epoch 0] [--workers 2]

Reads the train split of SHARDS (a `pipeline.shard` output) as training does, with the paper's
train transforms and fixed seeds, and prints the sha256 of every batch's pixels and labels in
order, and the eval transform's over the val split. Run it on the code before and after a change
(e.g. from a `git worktree` of the older commit, with PYTHONPATH pointing at it): the same shards
must give the same two hashes.
"""

from __future__ import annotations

import argparse
import hashlib

import torch

from pipeline import loader, transforms


def batches_sha256(shards: str, split: str, arch: str, epoch: int, workers: int) -> tuple[str, int]:
    train = split == "train"
    torch.manual_seed(loader.epoch_seed(0, epoch, 0))  # as pipeline.worker seeds each epoch
    batches = loader.make_loader(
        shards,
        split,
        transforms.train_transform(arch, flip=True) if train else transforms.eval_transform(arch),
        batch_size=64,
        num_workers=workers,
        epoch=epoch,
        seed=0,
        train=train,
    )
    digest, count = hashlib.sha256(), 0
    for pixels, labels in batches:
        digest.update(pixels.contiguous().numpy().tobytes())
        digest.update(labels.numpy().tobytes())
        count += len(labels)
    return digest.hexdigest(), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shards")
    parser.add_argument("--arch", default="imagenet", choices=["imagenet", "cifar"])
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for split in ("train", "val"):
        digest, count = batches_sha256(args.shards, split, args.arch, args.epoch, args.workers)
        print(f"{split}: {count} images, sha256 {digest}")


if __name__ == "__main__":
    main()
