"""The shard and verify stages on generated trees with ImageNet's quirks, and on digits."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline import shard, sources
from pipeline.manifest import read_manifest
from tests.data_trees import (
    WNIDS,
    cifar10_tree,
    imagefolder_tree,
    imagenet_tree,
)
from tests.helpers import imagenet_params, imagenet_source, make_params, read_shards


@pytest.mark.parametrize("val_format", ["loc_csv", "devkit", "folders"])
def test_imagenet_labels_quirks_and_exact_accounting(tmp_path, val_format):
    tree = imagenet_tree(tmp_path / "raw", val_format=val_format)
    result = shard.shard(imagenet_params(tmp_path, tree.root))
    out = tmp_path / "shards"

    assert result.classes == WNIDS  # sorted wnids: torchvision's index
    # train/ holds train and the val held out of it; the official val/ is the test split.
    for folder, splits, expected in (("train", ("train", "val"), tree.train_labels), ("val", ("test",), tree.val_labels)):
        infos = [result.splits[split] for split in splits]
        seen = sum(1 for _ in (tree.root / folder).rglob("*.JPEG"))
        assert sum(info.num_samples + len(info.rejected) for info in infos) == seen
        samples = {k: v for split in splits for k, v in read_shards(out, split).items()}
        assert {k: WNIDS[label] for k, (label, _) in samples.items()} == expected
        for _, jpeg in samples.values():
            with Image.open(io.BytesIO(jpeg)) as image:
                assert (image.format, image.mode) == ("JPEG", "RGB")
                assert not image.info.get("progressive")

    rejected = {Path(r.source).stem: r.reason for r in result.splits["train"].rejected}
    assert set(rejected) == tree.rejected
    assert rejected[f"{WNIDS[2]}_empty"] == "empty file"
    assert rejected[f"{WNIDS[1]}_truncated"] == "truncated image"
    converted = {
        Path(c.source).stem: c.from_ for split in sources.SPLITS for c in result.splits[split].converted
    }
    assert converted == tree.converted
    on_disk = json.loads((out / shard.MANIFEST).read_text())
    assert on_disk == result.model_dump(mode="json", by_alias=True)
    assert read_manifest(str(out)) == result
    assert on_disk["splits"]["train"]["shards"][0]["name"] == "train/shard-000000.tar"


def test_imagenet_class_names_are_kept(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", val_format="devkit", quirks=False)
    dataset = imagenet_source(tree.root)
    assert dataset.class_names == ["tench, Tinca tinca", "English springer", "chain saw, chainsaw"]
    assert dataset.notes["test_labels"].endswith("ILSVRC2012_validation_ground_truth.txt")


def test_the_three_val_label_formats_agree(tmp_path):
    labels = []
    for fmt in ("loc_csv", "devkit", "folders"):
        dataset = imagenet_source(imagenet_tree(tmp_path / fmt, val_format=fmt, quirks=False).root)
        labels.append({r.key: r.label for r in dataset.splits["test"]})
    assert labels[0] == labels[1] == labels[2]


def test_passes_good_jpegs_through_untouched(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", quirks=False)
    shard.shard(imagenet_params(tmp_path, tree.root))
    samples = {**read_shards(tmp_path / "shards", "train"), **read_shards(tmp_path / "shards", "val")}
    for key, wnid in tree.train_labels.items():
        assert samples[key][1] == (tree.root / "train" / wnid / f"{key}.JPEG").read_bytes()


def test_train_shards_mix_classes(tmp_path):
    shard.shard(make_params(tmp_path))
    first = Counter(label for label, _ in read_shards(tmp_path / "shards", "train").values())
    assert len(first) == 10
    with tarfile.open(tmp_path / "shards" / "train" / "shard-000000.tar") as tar:
        labels = {int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
    assert len(labels) >= 8


def test_digits_split_is_stratified_and_complete(tmp_path):
    result = shard.shard(make_params(tmp_path))
    assert [result.splits[split].num_samples for split in ("train", "val", "test")] == [1077, 360, 360]
    assert all(0.05 < m < 0.5 for m in result.mean)  # mostly black digits, white strokes
    val, test = read_shards(tmp_path / "shards", "val"), read_shards(tmp_path / "shards", "test")
    for split in (val, test):
        counts = Counter(label for label, _ in split.values())
        assert set(counts) == set(range(10)) and all(35 <= n <= 37 for n in counts.values())
    train_keys = set(read_shards(tmp_path / "shards", "train"))
    assert not train_keys & set(val) and not train_keys & set(test) and not set(val) & set(test)
    with Image.open(io.BytesIO(next(iter(val.values()))[1])) as image:
        assert image.size == (16, 16) and image.mode == "RGB"


def test_same_params_give_byte_identical_shards_whatever_the_worker_count(tmp_path):
    tree = imagenet_tree(tmp_path / "raw")
    one = shard.shard(imagenet_params(tmp_path / "a", tree.root, "shard.workers=1"))
    two = shard.shard(imagenet_params(tmp_path / "b", tree.root, "shard.workers=2"))
    hashes = lambda m: [s.sha256 for split in m.splits.values() for s in split.shards]
    assert hashes(one) == hashes(two)
    assert len(hashes(one)) > 4


def test_plan_respects_maxcount_and_maxsize():
    records = [sources.Record(f"k{i}", 0, f"s{i}", b"x" * size) for i, size in enumerate([5, 5, 5, 20, 1, 1, 1])]
    groups = shard.plan(records, maxcount=3, maxsize=10)
    assert [[r.key for r in g] for g in groups] == [["k0", "k1"], ["k2"], ["k3"], ["k4", "k5", "k6"]]
    assert shard.plan([], 3, 10) == []


def test_max_side_shrinks_images(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", quirks=False, size=(120, 90))
    shard.shard(imagenet_params(tmp_path, tree.root, "shard.max_side=60"))
    for _, jpeg in read_shards(tmp_path / "shards", "val").values():
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.size == (60, 45)


def test_too_many_rejects_fail_and_keep_the_previous_output(tmp_path, run_stage):
    tree = imagenet_tree(tmp_path / "raw")
    base = [
        f"paths.shards={tmp_path / 'shards'}",
        "data.source=imagenet",
        f"data.root={tree.root}",
        "data.val_per_class=1",
        "shard.maxcount=4",
    ]
    ok = run_stage("shard", *[a for o in base + ["shard.max_reject_fraction=0.2"] for a in ("--set", o)])
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "shards" / "manifest.json").read_bytes()

    failed = run_stage("shard", *[a for o in base + ["shard.max_reject_fraction=0.01"] for a in ("--set", o)])
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: 2 of ") and "shard.max_reject_fraction" in last
    assert (tmp_path / "shards" / "manifest.json").read_bytes() == before


def test_bad_val_labels_are_errors_not_guesses(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", quirks=False)
    csv = tree.root / "LOC_val_solution.csv"
    original = csv.read_text()

    csv.write_text(original.replace(f"{WNIDS[0]} 10", "n09999999 10", 1))
    with pytest.raises(sources.SourceError, match="n09999999, which has no train folder"):
        imagenet_source(tree.root)

    csv.write_text("\n".join(original.splitlines()[:-1]) + "\n")
    with pytest.raises(sources.SourceError, match="no label for this val image"):
        imagenet_source(tree.root)

    csv.unlink()
    with pytest.raises(sources.SourceError, match="no val labels; expected val/<wnid>/ folders"):
        imagenet_source(tree.root)


def test_devkit_without_meta_mat_is_an_error(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", val_format="devkit", quirks=False)
    (tree.root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(sources.SourceError, match="meta.mat: missing"):
        imagenet_source(tree.root)


def test_two_files_with_one_key_are_both_kept(tmp_path):
    tree = imagenet_tree(tmp_path / "raw", val_format="folders", quirks=False)
    twin = tree.root / "train" / WNIDS[1] / f"{WNIDS[0]}_1000.JPEG"
    twin.write_bytes((tree.root / "train" / WNIDS[0] / f"{WNIDS[0]}_1000.JPEG").read_bytes())
    dataset = imagenet_source(tree.root)
    records = dataset.splits["train"] + dataset.splits["val"]
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys) == len(tree.train_labels) + 1
    assert {r.label for r in records if r.key.startswith(f"{WNIDS[0]}_1000")} == {0, 1}


def test_missing_or_malformed_root_is_one_line_and_exit_2(tmp_path, run_stage):
    missing = run_stage("shard", "--set", "data.source=imagenet", "--set", f"data.root={tmp_path / 'nope'}")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: data.root: {tmp_path / 'nope'}: no such folder"

    (tmp_path / "empty").mkdir()
    malformed = run_stage("shard", "--set", "data.source=imagenet", "--set", f"data.root={tmp_path / 'empty'}")
    assert malformed.returncode == 2
    assert (
        malformed.stderr.strip()
        == f"error: {tmp_path / 'empty' / 'train'}: no such folder (expected ILSVRC-2012's train/<wnid>/*.JPEG)"
    )

    unset = run_stage("shard", "--set", "data.source=cifar10")
    assert unset.returncode == 2 and "data.root: required for data.source=cifar10" in unset.stderr


def test_imagefolder_source(tmp_path):
    imagefolder_tree(tmp_path / "raw")
    result = shard.shard(
        make_params(tmp_path, "data.source=imagefolder", f"data.root={tmp_path / 'raw'}", "data.val_per_class=1")
    )
    assert result.classes == ["cat", "dog"]
    # No test/: val/ is the test split (tests/pipeline/test_splits.py has the rest).
    assert set(read_shards(tmp_path / "shards", "test")) == {
        f"{c}/img_{i}".replace("/", "_") for c in ("cat", "dog") for i in range(3)
    }
    (tmp_path / "raw" / "val" / "bird").mkdir()
    with pytest.raises(sources.SourceError, match="class 'bird' has no train folder"):
        sources.imagefolder(tmp_path / "raw", seed=0, val_per_class=1)


def test_cifar10_source(tmp_path):
    cifar10_tree(tmp_path / "raw", per_batch=4)
    result = shard.shard(
        make_params(tmp_path, "data.source=cifar10", f"data.root={tmp_path / 'raw'}", "data.val_per_class=1")
    )
    assert result.classes[:2] == ["airplane", "automobile"]
    counts = [result.splits[split].num_samples for split in ("train", "val", "test")]
    assert counts == [10, 10, 4]  # 2 images a class in the training batches, 1 held out as val


def test_cifar10_reader_refuses_anything_but_arrays(tmp_path):
    folder = cifar10_tree(tmp_path / "raw", per_batch=2)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [0], b"data": Path("x")}))
    with pytest.raises(sources.SourceError, match="refusing to load pathlib"):
        sources.cifar10(tmp_path / "raw", seed=0, val_per_class=1)


def test_an_interrupted_run_leaves_nothing_that_looks_complete_and_a_rerun_finishes(tmp_path):
    tree = imagenet_tree(tmp_path / "raw")
    reference = shard.shard(imagenet_params(tmp_path / "ref", tree.root))

    params = imagenet_params(tmp_path, tree.root)
    jobs = shard.build_jobs(sources.load(params.data), params)
    staging = tmp_path / "shards.partial"
    for split in sources.SPLITS:
        (staging / split).mkdir(parents=True)
    kept = shard.write_shard(jobs[0], staging)  # one shard finished before the "crash"
    (staging / "train" / "shard-000001.tar.tmp-999").write_bytes(b"half a shard")
    assert not (tmp_path / "shards").exists()  # nothing at the output path looks complete

    result = shard.shard(params)
    assert result == reference
    assert result.splits["train"].shards[0].sha256 == kept.sha256
    assert not staging.exists()
    assert not list((tmp_path / "shards").rglob("*.tmp-*")) and not list((tmp_path / "shards").rglob("*.json.*"))
