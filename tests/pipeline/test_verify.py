"""The verify stage: every shard rechecked against the manifest, each problem one line."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np

from pipeline import shard, verify
from pipeline.manifest import read_manifest
from tests.data_trees import jpeg_bytes, picture
from tests.helpers import make_params


def test_verify_passes_then_catches_a_corrupted_shard(tmp_path, run_stage):
    overrides = ["--set", f"paths.shards={tmp_path / 'shards'}", "--set", f"paths.metrics={tmp_path / 'metrics'}"]
    assert run_stage("shard", *overrides).returncode == 0
    ok = run_stage("verify", *overrides)
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads((tmp_path / "metrics" / "shards.json").read_text())
    assert metrics["train"]["num_samples"] == 1077 and metrics["val"]["num_shards"] == 2
    assert metrics["test"] == {"num_samples": 360, "num_shards": 2, "rejected": 0, "converted": 0}

    victim = tmp_path / "shards" / "val" / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / "shards" / "val" / "shard-000009.tar").write_bytes(b"")
    bad = run_stage("verify", *overrides)
    assert bad.returncode == 1
    assert f"verify: {victim}: sha256 differs from the manifest" in bad.stderr
    assert "shard-000009.tar: a shard the manifest does not list" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("verify: FAILED")


def test_verify_without_a_manifest_is_an_error(tmp_path, run_stage):
    (tmp_path / "shards" / "train").mkdir(parents=True)
    result = run_stage("verify", "--set", f"paths.shards={tmp_path / 'shards'}")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'shards' / 'manifest.json'}: missing; run `python -m pipeline.shard` first"
    )


def test_verify_counts_samples_by_key(tmp_path):
    shard.shard(make_params(tmp_path))
    manifest = read_manifest(str(tmp_path / "shards"))
    val = manifest.splits["val"]
    first = val.shards[0]
    shards = [first.model_copy(update={"num_samples": first.num_samples + 1}), *val.shards[1:]]
    splits = {**manifest.splits, "val": val.model_copy(update={"shards": shards})}
    problems = verify.verify(tmp_path / "shards", manifest.model_copy(update={"splits": splits}))
    path, count = tmp_path / "shards" / first.name, first.num_samples
    assert f"{path}: {count} samples, manifest says {count + 1}" in problems


def test_verify_names_a_label_of_thousands_of_digits(tmp_path):
    """int() refuses over 4,300 digits: a hostile .cls is a problem line, not a traceback."""
    shards = tmp_path / "shards"
    shards.mkdir()
    path = shards / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.jpg", jpeg_bytes(picture(np.random.default_rng(0), 8, 8))), ("a.cls", b"9" * 5000)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    count, problems = verify.check_samples(path, 10)
    assert count == 1 and problems == [f"{path}: sample a: label {'9' * 5000!r} not in 0..9"]


def test_verify_checks_shards_on_s3_as_the_loader_reads_them(digit_shards, s3_server, tmp_path, run_stage):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("verify-bucket")
    fs.put(str(digit_shards), "verify-bucket/shards", recursive=True)
    url = "s3://verify-bucket/shards"
    overrides = ["--set", f"paths.shards={url}", "--set", f"paths.metrics={tmp_path / 'metrics'}"]
    ok = run_stage("verify", *overrides)
    assert ok.returncode == 0, ok.stderr
    assert "verify: train: 7 shards, 1077 samples: OK" in ok.stdout

    # One shard altered, one gone, one the manifest does not list.
    altered, gone = "verify-bucket/shards/val/shard-000000.tar", "verify-bucket/shards/test/shard-000001.tar"
    data = bytearray(fs.cat(altered))
    data[-2000] ^= 0xFF
    fs.pipe(altered, bytes(data))
    fs.rm(gone)
    fs.pipe("verify-bucket/shards/train/shard-999999.tar", b"")
    failed = run_stage("verify", *overrides)
    assert failed.returncode == 1
    lines = failed.stderr.splitlines()
    assert f"verify: {url}/val/shard-000000.tar: sha256 differs from the manifest" in lines
    assert f"verify: {url}/test/shard-000001.tar: missing" in lines
    assert f"verify: {url}/train/shard-999999.tar: a shard the manifest does not list" in lines


def test_verify_names_local_shards_as_pathlib_does_and_lists_them_without_globbing(digit_shards, tmp_path, monkeypatch):
    """A `[` in the folder's name is no glob pattern: the unlisted shard is still found; and a
    local path is named as pathlib writes it, as before URLs were read."""
    shards = tmp_path / "run[1]" / "shards"
    shutil.copytree(digit_shards, shards)
    (shards / "train" / "shard-999999.tar").write_bytes(b"")
    (shards / "val" / "shard-000000.tar").unlink()
    manifest = read_manifest(str(shards))
    val = manifest.splits["val"]
    left = val.num_samples - val.shards[0].num_samples
    monkeypatch.chdir(tmp_path)
    assert verify.verify("./run[1]/shards/", manifest) == [
        "run[1]/shards/val/shard-000000.tar: missing",
        f"val: shards hold {left} samples, manifest says {val.num_samples}",
        "run[1]/shards/train/shard-999999.tar: a shard the manifest does not list",
    ]


def test_verify_downloads_each_shard_on_s3_once(digit_shards, s3_server, monkeypatch):
    """Its hash and its samples are read from one download (a temporary copy), not two."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("verify-once")
    fs.put(str(digit_shards), "verify-once/shards", recursive=True)
    reads: Counter[str] = Counter()
    get_file, open_file = s3fs.S3FileSystem._get_file, s3fs.S3FileSystem._open

    async def counted_get_file(self, rpath, lpath, **kwargs):
        reads[rpath.removeprefix("s3://")] += 1
        return await get_file(self, rpath, lpath, **kwargs)

    def counted_open(self, path, *args, **kwargs):
        reads[path.removeprefix("s3://")] += 1
        return open_file(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counted_get_file)
    monkeypatch.setattr(s3fs.S3FileSystem, "_open", counted_open)
    manifest = read_manifest(str(digit_shards))
    # fsspec keeps one S3FileSystem per configuration, with its sync methods bound when made.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert verify.verify("s3://verify-once/shards", manifest) == []
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    names = [entry.name for split in manifest.splits.values() for entry in split.shards]
    assert reads == Counter(f"verify-once/shards/{name}" for name in names)
