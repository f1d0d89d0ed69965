"""Every input file is accounted for, every bad one is a counted reject naming it, and keys are
safe for WebDataset: the messy trees an ordinary data set (or an attacker) holds."""

from __future__ import annotations

import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from pipeline import loader, shard, sources, transforms, verify
from pipeline.images import Rejected, to_rgb_jpeg
from pipeline.manifest import ImageSize, Noted
from tests.data_trees import cifar10_tree, jpeg_bytes, picture, png_bytes
from tests.helpers import CONVERSION, make_params, read_shards

RNG = np.random.default_rng(0)


def image_file(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else jpeg_bytes(picture(RNG, 24, 20)))
    return path


def folder_params(tmp_path: Path, root: Path, *overrides: str):
    """An imagefolder tree; the tests below give it a test/ folder, so that train/ is all train."""
    return make_params(
        tmp_path, "data.source=imagefolder", f"data.root={root}", "shard.max_reject_fraction=1", *overrides
    )


# --- per-file conversion ------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    png = bytearray(png_bytes(picture(RNG, 8, 8)))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(png[12:29]))  # the IHDR chunk's CRC
    return bytes(png)


def test_pixel_and_byte_limits_come_before_decoding(tmp_path):
    # PNG headers claiming more pixels than the file holds: refused from the header alone.
    for side, reason in [(200, "200x200 pixels, over shard.max_pixels 10000"), (60000, "too many pixels")]:
        with pytest.raises(Rejected, match=reason):
            to_rgb_jpeg(png_claiming(side, side), CONVERSION)
    # A 5 GiB file (sparse: no disk used) is refused from its size; reading it would take minutes.
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as f:
        f.truncate(5 << 30)
    with pytest.raises(Rejected, match=f"{5 << 30} bytes, over shard.max_bytes 100000"):
        shard.prepare(sources.Record("huge", 0, str(huge)), CONVERSION)


def test_the_mean_weighs_every_image_the_same(tmp_path):
    root = tmp_path / "raw"
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((16, 16, 3), np.uint8)
    blue[..., 2] = 255
    image_file(root / "train" / "a" / "red.jpg", jpeg_bytes(red))  # passes through
    image_file(root / "train" / "a" / "blue.png", png_bytes(blue))  # converted
    image_file(root / "val" / "a" / "x.jpg")
    image_file(root / "test" / "a" / "t.jpg")
    result = shard.shard(folder_params(tmp_path, root))
    assert result.mean == pytest.approx([0.5, 0.0, 0.5], abs=0.01)
    assert result.splits["train"].image_size == ImageSize(min_side=16, max_side=64, uniform=None)
    assert result.splits["val"].image_size == ImageSize(min_side=20, max_side=24, uniform=[24, 20])


# --- the walk over the files --------------------------------------------------------------------


def test_every_file_is_a_sample_a_reject_or_a_counted_skip(tmp_path):
    root, outside = tmp_path / "raw", tmp_path / "elsewhere"
    train = root / "train"
    image_file(train / "cat" / "a.jpg")
    image_file(train / "cat" / "more" / "b.jpg")  # a sub-folder: read, as ImageFolder does
    image_file(train / "cat" / ".DS_Store", b"\0\0\0\1Bud1")  # hidden: skipped, counted
    image_file(train / "cat" / ".ipynb_checkpoints" / "c.jpg")
    image_file(train / "dog" / "d.jpg")
    (train / "dog" / "link.jpg").symlink_to(train / "cat" / "a.jpg")  # inside the root: followed
    (train / "dog" / "broken.jpg").symlink_to(train / "dog" / "gone.jpg")
    (train / "dog" / "escape.jpg").symlink_to(image_file(outside / "secret.jpg"))
    (train / "dog" / "loop").symlink_to(train / "dog")
    os.mkfifo(train / "dog" / "pipe.jpg")  # reading it would block forever
    image_file(train / "loose.jpg")  # beside the class folders: no class
    image_file(root / "val" / "cat" / "v.jpg")
    image_file(root / "test" / "cat" / "t.jpg")

    result = shard.shard(folder_params(tmp_path, root))
    split = result.splits["train"]
    reasons = {Path(r.source).name: r.reason for r in split.rejected}
    assert split.num_samples == 4  # a, more/b, d, link
    assert reasons == {
        "broken.jpg": "broken symlink",
        "escape.jpg": f"symlink to {(outside / 'secret.jpg').resolve()}, outside data.root",
        "loop": "symlink loop",
        "pipe.jpg": "not a regular file",
        "loose.jpg": "not in a class folder",
    }
    assert split.skipped == [
        Noted(source=str(train / "cat" / ".DS_Store"), reason="hidden file"),
        Noted(source=str(train / "cat" / ".ipynb_checkpoints"), reason="hidden folder"),
    ]
    keys = set(read_shards(tmp_path / "shards", "train"))
    assert keys == {"cat_a", "cat_more_b", "dog_d", "dog_link"}


def test_an_empty_train_class_is_an_error(tmp_path, run_stage):
    root = tmp_path / "raw"
    image_file(root / "train" / "cat" / "a.jpg")
    (root / "train" / "dog").mkdir()
    image_file(root / "val" / "cat" / "v.jpg")
    result = run_stage("shard", *folder_args(tmp_path, root))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {root / 'train' / 'dog'}: an empty class folder (1 of 2 classes have no files)"
    )


def folder_args(tmp_path: Path, root: Path) -> list[str]:
    return [
        "--set", "data.source=imagefolder", "--set", f"data.root={root}",
        "--set", f"paths.shards={tmp_path / 'shards'}", "--set", f"paths.metrics={tmp_path / 'metrics'}",
    ]  # fmt: skip


def test_class_and_file_names_with_dots_shard_verify_and_load(tmp_path):
    """Caltech-256 and CUB-200 name classes `001.ak47`: WebDataset splits keys at a dot."""
    root = tmp_path / "raw"
    for split in ("train", "val", "test"):
        for cls in ("001.ak47", "002.american-flag"):
            image_file(root / split / cls / f"{cls[4:]}.0001.jpg")
            image_file(root / split / cls / f"{cls[4:]}_0001.jpg")  # the same key once dots go
    result = shard.shard(folder_params(tmp_path, root))
    assert result.splits["train"].num_samples == 4 and not result.splits["train"].rejected
    keys = set(read_shards(tmp_path / "shards", "train"))
    assert "001_ak47_ak47_0001" in keys and all("." not in k for k in keys) and len(keys) == 4
    assert verify.verify(tmp_path / "shards", result) == []
    batches = loader.make_loader(
        str(tmp_path / "shards"), "val", transforms.eval_transform("imagenet"), batch_size=4, num_workers=0, epoch=0, seed=0, train=False
    )
    assert sum(len(labels) for _, labels in batches) == 4


def test_each_sample_keeps_its_original_path(tmp_path):
    root = tmp_path / "raw"
    image_file(root / "train" / "001.ak47" / "x.y.jpg")
    image_file(root / "val" / "001.ak47" / "v.jpg")
    image_file(root / "test" / "001.ak47" / "t.jpg")
    shard.shard(folder_params(tmp_path, root))
    with tarfile.open(tmp_path / "shards" / "train" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["001_ak47_x_y.cls", "001_ak47_x_y.jpg", "001_ak47_x_y.source"]
        assert tar.extractfile("001_ak47_x_y.source").read().decode() == "train/001.ak47/x.y.jpg"


# --- CIFAR-10 -----------------------------------------------------------------------------------


def rewrite_batch(folder: Path, name: str, **changes) -> None:
    batch = pickle.loads((folder / name).read_bytes())
    batch.update({k.encode(): v for k, v in changes.items()})
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": [1, 2]}, "data_batch_2: 3 images but 2 labels"),
        ({"labels": [1, 2, 10]}, "data_batch_2: labels is not a list of integers in 0..9"),
        ({"data": np.zeros((3, 100), np.uint8)}, "data_batch_2: data is a uint8 array of shape (3, 100)"),
        ({"data": "pixels"}, "data_batch_2: data is a str, expected a uint8 array"),
    ],
)
def test_malformed_cifar_batches_are_one_line_errors(tmp_path, change, message):
    folder = cifar10_tree(tmp_path / "raw", per_batch=3)
    rewrite_batch(folder, "data_batch_2", **change)
    with pytest.raises(sources.SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sources.cifar10(tmp_path / "raw", seed=0, val_per_class=1)


def test_a_truncated_cifar_pickle_is_one_line_and_exit_2(tmp_path, run_stage):
    folder = cifar10_tree(tmp_path / "raw", per_batch=3)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    result = run_stage(
        "shard", "--set", "data.source=cifar10", "--set", f"data.root={tmp_path / 'raw'}",
        "--set", f"paths.shards={tmp_path / 'shards'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "test_batch: not a CIFAR-10 python batch" in result.stderr
