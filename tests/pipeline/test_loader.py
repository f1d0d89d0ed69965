"""The WebDataset loader: shard order, rank and worker splits, equal batch counts, clear errors."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import loader, shard, transforms
from pipeline.files import sha256_of
from pipeline.manifest import Manifest, ManifestShard, ManifestSplit, read_manifest
from tests.data_trees import imagenet_tree, jpeg_bytes, picture
from tests.helpers import batch_log, digits_loader, imagenet_params


def test_batches_per_epoch_takes_the_poorest_rank():
    counts = [170, 170, 170, 170, 170, 170, 170, 170, 77]
    # rank 0 reads shards 0,2,4,6,8 (worker 0: 0,4,8 = 417; worker 1: 2,6 = 340); rank 1 reads 1,3,5,7.
    assert loader.worker_sample_counts(counts, 0, 2, 2) == [417, 340]
    assert loader.worker_sample_counts(counts, 1, 2, 2) == [340, 340]
    assert loader.batches_per_epoch(counts, 2, 2, [32, 32]) == min(13 + 10, 10 + 10)
    assert loader.batches_per_epoch(counts, 1, 0, [32]) == sum(counts) // 32
    # Rank 0 makes only the poorest rank's 20 of its 13 + 10 batches: its workers in turn.
    assert loader.worker_batch_quotas([417, 340], 32, 20) == [10, 10]
    assert loader.worker_batch_quotas([417, 100], 32, 12) == [9, 3]
    with pytest.raises(ValueError):
        loader.worker_batch_quotas([417, 100], 32, 17)


def test_workers_decode_only_the_samples_of_the_epochs_batches(digit_shards, single_process, monkeypatch):
    decoded = mp.get_context("fork").Value("i", 0)
    decode = loader.decode

    def counted(sample, transform, keyed=False):
        with decoded.get_lock():
            decoded.value += 1
        return decode(sample, transform, keyed)

    monkeypatch.setattr(loader, "decode", counted)
    batches = digits_loader(digit_shards, num_workers=2)
    assert sum(len(y) for _, y in batches) == len(batches) * 32
    assert decoded.value == len(batches) * 32


def test_epoch_order_is_shared_by_ranks_and_changes_with_epoch():
    shards = [(f"s{i}", 1) for i in range(9)]
    assert loader.epoch_order(shards, 0, 1) == loader.epoch_order(shards, 0, 1)
    assert loader.epoch_order(shards, 0, 1) != loader.epoch_order(shards, 0, 2)
    assert sorted(loader.epoch_order(shards, 0, 1)) == shards


def test_train_epoch_is_reproducible_and_reshuffled(digit_shards, single_process):
    def labels(epoch):
        torch.manual_seed(0)
        return torch.cat([y for _, y in digits_loader(digit_shards, epoch)]).tolist()

    first = labels(0)
    assert len(first) == len(digits_loader(digit_shards)) * 32
    assert labels(0) == first
    assert labels(1) != first


def test_round_robin_follows_dataloaders_turns_past_a_worker_whose_quota_is_made():
    assert loader.round_robin([3, 1], 0) == ([0, 0], 0)
    assert loader.round_robin([3, 1], 2) == ([1, 1], 0)
    assert loader.round_robin([3, 1], 3) == ([2, 1], 1)  # worker 1's turn: it has none left, so 0 comes next
    assert loader.round_robin([3, 1], 4) == ([3, 1], 1)
    assert loader.round_robin([2, 2, 2], 4) == ([2, 1, 1], 1)
    with pytest.raises(ValueError):
        loader.round_robin([3, 1], 5)


def batches_with_positions(batches: loader.Batches) -> tuple[list, list, list]:
    """Every batch of an epoch, where the loader was after each, and the training process's RNG
    state then (what a step checkpoint taken after that batch keeps)."""
    taken, positions, rng = [], [], []
    for images, labels in batches:
        taken.append((images.clone(), labels.clone()))
        positions.append(batches.position())
        rng.append(torch.get_rng_state())
    return taken, positions, rng


# ranks x loader workers: the digits' 6 train shards give the workers unequal quotas.
@pytest.mark.parametrize(("rank", "world_size", "num_workers"), [(0, 1, 0), (0, 1, 2), (1, 2, 2), (0, 1, 3)])
def test_an_epoch_resumed_after_any_batch_makes_the_batches_of_an_uninterrupted_one(
    digit_shards, monkeypatch, rank, world_size, num_workers
):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    torch.manual_seed(7)  # with no loader workers, the training process draws the crops
    whole, positions, rng = batches_with_positions(digits_loader(digit_shards, epoch=3, num_workers=num_workers))
    assert len(whole) > 8
    for step in sorted({1, 2, 3, len(whole) // 2 + 1, len(whole) - 1}):
        torch.set_rng_state(rng[step - 1])  # as a resumed run restores it from the checkpoint
        resumed = digits_loader(digit_shards, epoch=3, num_workers=num_workers, resume=positions[step - 1])
        rest, rest_positions, _ = batches_with_positions(resumed)
        assert len(rest) == len(resumed) - step
        for (images, labels), (images_then, labels_then) in zip(rest, whole[step:], strict=True):
            assert torch.equal(labels, labels_then) and torch.equal(images, images_then), f"after step {step}"
        assert rest_positions[-1] == positions[-1]


def dealt_epoch(shards: Path, log: Path, monkeypatch, ranks: int, workers: int, **resume) -> list[list[str]]:
    """Every step's global batch (its samples' keys, in rank order) of epoch 3 at batch 48, on
    `ranks` ranks of `workers` loader workers, optionally resumed (`loader.Resume`)."""
    log.mkdir()
    for rank, share in enumerate(loader.batch_shares(48, ranks)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        batches = digits_loader(
            shards, epoch=3, num_workers=workers, batch_size=share, global_batch=48,
            resume=loader.Resume(**resume) if resume else None, log=loader.BatchLog(log / f"rank-{rank}.txt", "0"),
        )  # fmt: skip
        for _ in batches:
            pass
    steps: dict[int, list[str]] = {}
    for entry in sorted(batch_log(log), key=lambda entry: entry.rank):
        if entry.digest is not None:
            steps.setdefault(entry.step, []).extend(entry.keys)
    return [steps[step] for step in sorted(steps)]


# (ranks, loader workers) the epoch was dealt for -> those it resumes with
@pytest.mark.parametrize(
    ("dealt", "now"), [((2, 2), (1, 0)), ((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 0), (3, 2)), ((1, 0), (2, 1))]
)
def test_an_epoch_resumed_on_another_world_size_trains_every_remaining_sample_once(
    digit_shards, tmp_path, monkeypatch, dealt, now
):
    """Each replayed step's global batch is the dealt one: the same samples in the same order,
    so no sample of the epoch is trained twice or skipped, across the resize."""
    whole = dealt_epoch(digit_shards, tmp_path / "dealt", monkeypatch, *dealt)
    assert all(len(keys) == 48 for keys in whole) and len(whole) > 10
    stop = len(whole) // 2 - 1
    rest = dealt_epoch(digit_shards, tmp_path / "resized", monkeypatch, *now, steps=stop, replay_deal=dealt)
    assert rest == whole[stop:]
    trained = [key for keys in whole[:stop] + rest for key in keys]
    assert len(trained) == len(set(trained)) == 48 * len(whole)


def test_eval_reads_every_sample_once(digit_shards, single_process):
    batches = list(digits_loader(digit_shards, train=False))
    x, _ = batches[0]
    assert x.shape[1:] == (16, 16, 3) and x.dtype == torch.uint8
    assert sum(len(y) for _, y in batches) == 360


def _rank_main(rank: int, world_size: int, shards: str, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    batches = digits_loader(Path(shards), epoch=0)
    steps = 0
    for x, _ in batches:
        # A DDP step's all-reduce: a rank with more batches than another would wait here forever.
        dist.all_reduce(torch.ones(1))
        steps += 1
    evaluated = torch.tensor([sum(len(y) for _, y in digits_loader(Path(shards), train=False))])
    dist.all_reduce(evaluated)
    Path(results, f"rank{rank}").write_text(f"{steps} {len(batches)} {int(evaluated)}")
    dist.destroy_process_group()


def test_two_ranks_get_equal_batch_counts_on_uneven_shards(digit_shards, tmp_path):
    manifest = read_manifest(str(digit_shards))
    counts = [s.num_samples for s in manifest.splits["train"].shards]
    assert len(counts) % 2 == 1 and len(set(counts)) > 1  # the uneven case
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    ctx = mp.get_context("fork")  # as Ray Train workers are: their DataLoader workers fork too
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, str(digit_shards), str(tmp_path / "init"), str(tmp_path)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [tuple(map(int, (tmp_path / f"rank{r}").read_text().split())) for r in range(2)]
    steps = {r[0] for r in results}
    assert len(steps) == 1 and steps == {r[1] for r in results}, results
    assert all(r[2] == 360 for r in results)  # val: every sample once across the two ranks


def test_loader_never_unpickles_a_member(tmp_path, single_process):
    """A .pyd member holding a pickle that would write a file when loaded is never loaded."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))

    jpeg = jpeg_bytes(picture(np.random.default_rng(0), 16, 16))
    batches = one_shard_loader(tmp_path / "shards", [{"jpg": jpeg, "cls": b"3", "pyd": pickle.dumps(Exploit())}] * 4)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [3, 3, 3, 3]
    assert not marker.exists()


def test_an_undecodable_sample_is_named_in_the_error(tmp_path, single_process):
    """A shard that bypassed `verify` (a JPEG cut short at its header): the error names the
    shard, the sample and libjpeg's reason."""
    jpeg = jpeg_bytes(picture(np.random.default_rng(0), 16, 16))
    batches = one_shard_loader(tmp_path / "shards", [{"jpg": jpeg, "cls": b"1"}, {"jpg": jpeg[:100], "cls": b"2"}])
    with pytest.raises(ValueError, match=r"shard-000000\.tar: sample s1: .*JPEG"):
        list(batches)


def one_shard_loader(shards: Path, samples: list[dict[str, bytes]]) -> loader.Batches:
    """The train loader over one hand-written shard of `samples` (members by extension)."""
    (shards / "train").mkdir(parents=True)
    with tarfile.open(shards / "train" / "shard-000000.tar", "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = shards / "train" / "shard-000000.tar"
    entry = ManifestShard(
        name="train/shard-000000.tar", num_samples=len(samples), bytes=path.stat().st_size, sha256=sha256_of(path)
    )
    train, empty = (
        ManifestSplit(
            num_samples=sum(s.num_samples for s in listed),
            shards=listed,
            rejected=[],
            converted=[],
            skipped=[],
            image_size=None,
        )
        for listed in ([entry], [])
    )
    manifest = Manifest(
        source="hand-written",
        classes=[str(i) for i in range(10)],
        mean=[0.5, 0.5, 0.5],
        splits={"train": train, "val": empty, "test": empty},
    )
    return loader.make_loader(
        str(shards),
        "train",
        transforms.train_transform("cifar", flip=False),
        batch_size=2,
        num_workers=0,
        epoch=0,
        seed=0,
        train=True,
        manifest=manifest,
        shuffle_buffer=1,
    )


def test_too_few_samples_for_a_batch_is_a_clear_error(digit_shards, single_process):
    with pytest.raises(loader.UsageError, match="no full batch of 4096"):
        digits_loader(digit_shards, batch_size=4096)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(loader.UsageError, match="manifest.json: missing"):
        read_manifest(str(tmp_path))


def test_imagenet_shards_stream_through_the_imagenet_transforms(tmp_path, single_process):
    """Every sample the shard stage writes from an ImageNet tree with its quirks (CMYK, PNG,
    grayscale, progressive) decodes through the cropped decoder, in training and in both tests."""
    tree = imagenet_tree(tmp_path / "raw", size=(300, 260))
    shard.shard(imagenet_params(tmp_path, tree.root, "shard.maxcount=100"))
    shards = str(tmp_path / "shards")
    common = {"batch_size": 2, "num_workers": 0, "epoch": 0, "seed": 0}
    train = loader.make_loader(shards, "train", transforms.train_transform("imagenet", True), train=True, **common)
    assert len(train) > 0 and all(x.shape == (2, 224, 224, 3) for x, _ in train)
    for crop, shape in (("single", (224, 224, 3)), ("ten", (10, 224, 224, 3))):
        batches = loader.make_loader(shards, "val", transforms.eval_transform("imagenet", crop), train=False, **common)
        seen = [x.shape[1:] for x, _ in batches]
        assert seen and all(s == shape for s in seen)


def test_streams_shards_from_s3(digit_shards, s3_server, single_process):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("shards-bucket")
    fs.put(str(digit_shards), "shards-bucket/digits", recursive=True)
    url = "s3://shards-bucket/digits"
    assert read_manifest(url) == read_manifest(str(digit_shards))

    def labels(shards: str) -> list[int]:
        torch.manual_seed(0)
        return torch.cat([y for _, y in digits_loader(shards, epoch=2)]).tolist()

    assert labels(url) == labels(str(digit_shards))


def test_a_truncated_shard_is_named_in_the_loaders_error(digit_shards, tmp_path, single_process):
    copy = tmp_path / "shards"
    shutil.copytree(digit_shards, copy)
    path = min((copy / "train").glob("*.tar"))
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        # The header of the 41st sample's first member.
        first_members = {m.name.partition(".")[0]: m.offset for m in reversed(tar.getmembers())}
        at_header = sorted(first_members.values())[40]
    # Cut inside a member: tarfile reports it. Cut at a header: tarfile sees a shorter tar, and
    # the count in the manifest tells.
    cuts = {1000: r"not a readable tar \(unexpected end of data\)", at_header: "40 samples, the manifest says 170"}
    for size, error in cuts.items():
        path.write_bytes(whole[:size])
        with pytest.raises(ValueError, match=f"{path}: {error}; check the shards with `python -m pipeline.verify`"):
            list(digits_loader(copy, num_workers=0))
