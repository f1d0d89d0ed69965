"""Three splits, and what each is for: val chooses (the best epoch, the best trial, the registry's
champion), test is only reported. Per source, where each split comes from (pipeline/sources.py's
table); every holdout seeded and byte-identical on a rerun; the manifest's schema 3.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline import shard, sources, verify
from pipeline.errors import UsageError
from pipeline.manifest import MANIFEST, SCHEMA, Manifest, read_manifest
from tests.data_trees import WNIDS, cifar10_tree, imagefolder_tree, imagenet_tree, jpeg_bytes, picture
from tests.helpers import imagenet_params, make_params, read_shards


def hashes(manifest: Manifest) -> dict[str, str]:
    return {s.name: s.sha256 for split in manifest.splits.values() for s in split.shards}


def keys(records: list[sources.Record]) -> set[str]:
    return {r.key for r in records}


# --- digits: a stratified, seeded three-way split ------------------------------------------------


def test_digits_split_is_stratified_seeded_disjoint_and_complete():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, val, test = sources.digits_split(labels, 0, 0.2, 0.2)
    assert (len(train), len(val), len(test)) == (1077, 360, 360)
    assert sorted([*train, *val, *test]) == list(range(1797))  # disjoint and complete
    for part, low, high in ((train, 104, 109), (val, 35, 37), (test, 35, 37)):
        counts = Counter(labels[part])
        assert set(counts) == set(range(10)) and low <= min(counts.values()) and max(counts.values()) <= high
    again = sources.digits_split(labels, 0, 0.2, 0.2)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = sources.digits_split(labels, 1, 0.2, 0.2)
    assert set(other[2]) != set(test) and set(other[1]) != set(val)


def test_digits_shards_hold_the_three_splits(tmp_path):
    result = shard.shard(make_params(tmp_path))
    from sklearn.datasets import load_digits

    _, val, test = sources.digits_split(load_digits().target, 0, 0.2, 0.2)
    assert set(read_shards(tmp_path / "shards", "val")) == {f"digits_{i:04d}" for i in val}
    assert set(read_shards(tmp_path / "shards", "test")) == {f"digits_{i:04d}" for i in test}
    assert [s.name for s in result.splits["test"].shards] == ["test/shard-000000.tar", "test/shard-000001.tar"]
    assert verify.verify(tmp_path / "shards", result) == []
    assert shard.shard(make_params(tmp_path / "again")) == result  # byte-identical: same sha256s


# --- CIFAR-10: 45k/5k out of the training batches, the test batch as test ------------------------


def cifar_labels(folder: Path) -> dict[str, int]:
    """{"data_batch_1[7]": label, ...}: what the batch files say, for every image."""
    out = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
        out |= {f"{name}[{i}]": label for i, label in enumerate(batch[b"labels"])}
    return out


def test_cifar10_holds_out_val_per_class_of_the_training_batches(tmp_path):
    folder = cifar10_tree(tmp_path / "raw", per_batch=20)  # 100 training images, 10 a class
    dataset = sources.cifar10(tmp_path / "raw", seed=0, val_per_class=2)
    train, val, test = (dataset.splits[s] for s in sources.SPLITS)
    assert (len(train), len(val), len(test)) == (80, 20, 20)
    assert Counter(r.label for r in val) == {label: 2 for label in range(10)}
    assert Counter(r.label for r in train) == {label: 8 for label in range(10)}
    # Held-out records keep their keys, labels and sources; the test batch is the test split.
    assert all(r.key.startswith("cifar10_train_") and r.source.startswith("data_batch_") for r in train + val)
    assert all(r.key.startswith("cifar10_test_") and r.source.startswith("test_batch[") for r in test)
    assert not keys(train) & keys(val) and len(keys(train) | keys(val)) == 100
    truth = cifar_labels(folder)
    assert all(r.label == truth[r.source] for r in train + val + test)
    assert dataset.notes["val_split"].startswith("2 images a class held out of data_batch_1..5")

    other = sources.cifar10(tmp_path / "raw", seed=1, val_per_class=2)
    assert keys(other.splits["val"]) != keys(val) and keys(other.splits["test"]) == keys(test)


def test_cifar10_shards_are_byte_identical_on_a_rerun(tmp_path):
    cifar10_tree(tmp_path / "raw", per_batch=20)
    overrides = ("data.source=cifar10", f"data.root={tmp_path / 'raw'}", "data.val_per_class=2", "shard.maxcount=30")
    first = shard.shard(make_params(tmp_path / "a", *overrides))
    second = shard.shard(make_params(tmp_path / "b", *overrides, "shard.workers=1"))
    assert hashes(first) == hashes(second) and len(hashes(first)) == 3 + 1 + 1
    assert [first.splits[s].num_samples for s in sources.SPLITS] == [80, 20, 20]
    notes = first.model_extra
    assert notes["val_split"].endswith("seeded by data.seed 0") and notes["test_split"] == "test_batch"


def test_a_holdout_that_would_empty_a_train_class_is_one_line_and_exit_2(tmp_path, run_stage):
    cifar10_tree(tmp_path / "raw", per_batch=20)  # 10 training images a class
    result = run_stage(
        "shard", "--set", "data.source=cifar10", "--set", f"data.root={tmp_path / 'raw'}",
        "--set", "data.val_per_class=10", "--set", f"paths.shards={tmp_path / 'shards'}",
    )  # fmt: skip
    assert result.returncode == 2
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    assert result.stderr.strip() == (
        f"error: data.val_per_class: 10 would leave class 'airplane' of {folder}/data_batch_1..5 with no train "
        "image (it has 10); lower data.val_per_class"
    )
    assert not (tmp_path / "shards").exists()


# --- ImageNet: val held out of train/, the official val set as test ------------------------------


@pytest.mark.parametrize("val_format", ["loc_csv", "devkit", "folders"])
def test_imagenet_holds_out_val_from_train_and_tests_on_the_official_val(tmp_path, val_format):
    tree = imagenet_tree(tmp_path / "raw", val_format=val_format)
    dataset = sources.imagenet(tree.root, seed=0, val_per_class=2)
    train, val, test = (dataset.splits[s] for s in sources.SPLITS)
    assert Counter(r.label for r in val) == {0: 2, 1: 2, 2: 2}
    assert all(Path(r.source).parent.parent == tree.root / "train" for r in train + val)
    listed = {Path(r.source).stem: WNIDS[r.label] for r in train + val}
    assert not keys(train) & keys(val)
    # Every file of train/ is a train or val record (the truncated and empty ones too: the shard
    # stage rejects them in whichever split they fall), with the label of its folder.
    assert listed == {**tree.train_labels, **{key: key[:9] for key in tree.rejected}}
    assert {r.key: WNIDS[r.label] for r in test} == tree.val_labels  # the official val set, labelled
    assert dataset.notes["test_split"] == "the official val/"

    result = shard.shard(imagenet_params(tmp_path, tree.root, "data.val_per_class=2", "shard.max_reject_fraction=0.5"))
    seen_in_train = sum(1 for _ in (tree.root / "train").rglob("*.JPEG"))
    counted = [result.splits[s].num_samples + len(result.splits[s].rejected) for s in sources.SPLITS]
    assert counted[0] + counted[1] == seen_in_train and counted[2] == len(tree.val_labels)
    assert set(read_shards(tmp_path / "shards", "test")) == set(tree.val_labels)
    assert verify.verify(tmp_path / "shards", result) == []


def test_imagenet_holdout_is_byte_identical_on_a_rerun_and_moves_with_the_seed(tmp_path):
    tree = imagenet_tree(tmp_path / "raw")
    first = shard.shard(imagenet_params(tmp_path / "a", tree.root))
    again = shard.shard(imagenet_params(tmp_path / "b", tree.root, "shard.workers=1"))
    assert hashes(first) == hashes(again)
    val = {seed: keys(sources.imagenet(tree.root, seed=seed, val_per_class=1).splits["val"]) for seed in range(6)}
    assert len(set(map(frozenset, val.values()))) > 1


def test_imagenet_refuses_a_holdout_that_leaves_a_class_no_train_image(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", quirks=False)  # 4 images a class
    with pytest.raises(sources.SourceError) as info:
        sources.imagenet(tree.root, seed=0, val_per_class=4)
    assert str(info.value) == (
        f"data.val_per_class: 4 would leave class '{WNIDS[0]}' of {tree.root / 'train'} with no train image "
        "(it has 4); lower data.val_per_class"
    )


# --- imagefolder: test/ when there is one, else val/ is test and val comes out of train/ -----------


def folder_params(tmp_path: Path, root: Path, *overrides: str):
    return make_params(tmp_path, "data.source=imagefolder", f"data.root={root}", "data.val_per_class=1", *overrides)


def test_imagefolder_with_a_test_folder_takes_each_split_from_its_folder(tmp_path):
    root = tmp_path / "raw"
    imagefolder_tree(root, splits=("train", "val", "test"))
    dataset = sources.imagefolder(root, seed=0, val_per_class=1)
    for split in sources.SPLITS:
        assert {Path(r.source).parent.parent.name for r in dataset.splits[split]} == {split}
        assert len(dataset.splits[split]) == 6  # nothing held out
    assert "val_split" not in dataset.notes


def test_imagefolder_without_a_test_folder_tests_on_val_and_holds_val_out_of_train(tmp_path):
    root = tmp_path / "raw"
    imagefolder_tree(root, per_class=4)
    # What the walk over train/ refuses or skips stays train's: held-out val takes records only.
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "dog" / "broken.jpg").symlink_to(root / "train" / "dog" / "gone.jpg")
    (root / "val" / "cat" / "empty.jpg").write_bytes(b"")
    result = shard.shard(folder_params(tmp_path, root, "shard.max_reject_fraction=1"))
    train, val, test = (result.splits[s] for s in sources.SPLITS)
    assert (train.num_samples, val.num_samples, test.num_samples) == (6, 2, 8)
    assert [Path(r.source).name for r in train.rejected] == ["broken.jpg"]
    assert [Path(r.source).name for r in train.skipped] == [".DS_Store"]
    assert val.rejected == val.skipped == [] and [Path(r.source).name for r in test.rejected] == ["empty.jpg"]
    # Every entry under train/ and val/ is accounted for exactly once.
    entries = {
        folder: sum(1 for p in (root / folder).rglob("*") if p.is_file() or p.is_symlink())
        for folder in ("train", "val")
    }
    in_train = train.num_samples + len(train.rejected) + len(train.skipped)
    assert in_train + val.num_samples == entries["train"]
    assert test.num_samples + len(test.rejected) == entries["val"]
    # val: one image a class of train/, keys and labels kept; test: the whole of val/.
    held = read_shards(tmp_path / "shards", "val")
    assert Counter(label for label, _ in held.values()) == {0: 1, 1: 1}
    assert all(key.startswith(("cat_img_", "dog_img_")) for key in held)
    for key, (label, jpeg) in held.items():
        cls, _, number = key.partition("_img_")
        assert label == ["cat", "dog"].index(cls)
        assert jpeg == (root / "train" / cls / f"img.{number}.jpg").read_bytes()
    assert len(read_shards(tmp_path / "shards", "test")) == 8
    notes = result.model_extra
    assert notes["val_split"].startswith("1 image a class held out of train/") and notes["test_split"] == "val/"

    again = shard.shard(folder_params(tmp_path / "again", root, "shard.max_reject_fraction=1"))
    assert hashes(again) == hashes(result)


def test_imagefolder_with_test_alone_holds_val_out_of_train_and_without_either_is_one_line(tmp_path):
    root = tmp_path / "raw"
    imagefolder_tree(root, splits=("train", "test"))
    dataset = sources.imagefolder(root, seed=0, val_per_class=1)
    assert [len(dataset.splits[split]) for split in sources.SPLITS] == [4, 2, 6]
    assert {Path(r.source).parent.parent.name for r in dataset.splits["val"]} == {"train"}
    assert {Path(r.source).parent.parent.name for r in dataset.splits["test"]} == {"test"}
    assert dataset.notes["test_split"] == "test/"
    shutil.rmtree(root / "test")
    with pytest.raises(sources.SourceError) as info:
        sources.imagefolder(root, seed=0, val_per_class=1)
    assert str(info.value) == (
        f"{root}: no val/ or test/ folder (expected root/val/<class>/<images>, root/test/ or both)"
    )


# --- the manifest: schema 3 ---------------------------------------------------------------------


@pytest.mark.parametrize("old_schema", [1, 2])
def test_shards_of_an_older_schema_are_one_line_and_the_shard_stage_replaces_them(tmp_path, old_schema, run_stage):
    root, out = tmp_path / "raw", tmp_path / "shards"
    imagefolder_tree(root)
    result = shard.shard(folder_params(tmp_path, root))
    assert result.schema_version == SCHEMA == 3
    # The same shards as an older stage wrote them: schema 1 had no test split, and neither
    # schema 1 nor 2 always recorded image sizes.
    old = json.loads((out / MANIFEST).read_text())
    old["schema"] = old_schema
    for split in old["splits"].values():
        del split["image_size"]
    if old_schema == 1:
        del old["splits"]["test"]
        shutil.rmtree(out / "test")
    (out / MANIFEST).write_text(json.dumps(old))
    with pytest.raises(UsageError) as info:
        read_manifest(str(out))
    assert str(info.value) == (
        f"{out / MANIFEST}: schema {old_schema}, expected 3, from an older version; "
        "run `python -m pipeline.shard` again"
    )
    checked = run_stage("verify", "--set", f"paths.shards={out}", "--set", f"paths.metrics={tmp_path / 'metrics'}")
    assert checked.returncode == 2 and checked.stderr.strip() == f"error: {info.value}"
    # Its own output, of an older schema: the stage replaces it.
    assert shard.shard(folder_params(tmp_path, root)) == result


# --- choosing on val: the best epoch, the best trial, the registry's tie rule ---------------------


def test_an_image_rejected_in_a_held_out_val_counts_against_val(tmp_path):
    """The holdout happens before any file is read: a bad file drawn into val is val's reject."""
    root = tmp_path / "raw"
    for i in range(3):
        (root / "train" / "cat").mkdir(parents=True, exist_ok=True)
        (root / "train" / "cat" / f"{i}.jpg").write_bytes(
            b"" if i == 0 else jpeg_bytes(picture(np.random.default_rng(i), 20, 20))
        )
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "v.jpg").write_bytes(jpeg_bytes(picture(np.random.default_rng(9), 20, 20)))
    seed = next(
        s for s in range(50) if "cat_0" in keys(sources.imagefolder(root, seed=s, val_per_class=1).splits["val"])
    )
    result = shard.shard(folder_params(tmp_path, root, f"data.seed={seed}", "shard.max_reject_fraction=1"))
    val = result.splits["val"]
    assert val.num_samples == 0 and [r.reason for r in val.rejected] == ["empty file"]
    assert result.splits["train"].num_samples == 2 and result.splits["train"].rejected == []
