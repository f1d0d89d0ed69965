"""Hostile shards (the loader streams them from buckets others can write): inputs that claim far
more than they hold are refused, in one line naming the shard and the sample or member, before
anything of the claimed size is allocated or read.

Each hostile case runs in a child process whose address space is capped a little above what it
already holds: were the refusal to come after the allocation, the child would fail with a
MemoryError (or libjpeg's "insufficient memory") rather than the test machine running out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import tarfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import jpegcrop
from pipeline import loader, shard, tars, transforms, verify
from pipeline import params as params_module
from pipeline.images import MAX_PIXELS
from tests.conftest import REPO
from tests.data_trees import jpeg_bytes, picture
from tests.helpers import make_params

GIB = 1 << 30
CLAIMED_SIDE = 65500  # libjpeg's largest side: 13 GB of RGB, 13-26 GB of progressive coefficients
CLAIMED_BYTES = 16 * GIB

def capped(work: Callable[..., None], args: tuple[str, ...], results) -> None:
    """In the forked child: cap the address space, run `work(*args)`, send back its exit code
    and what it printed, a traceback included, as an interpreter would.

    The imports (torch's above all) already take ~3 GB of address space, so a fixed cap would
    measure them; the cap is 1 GiB above what the process holds: room for the work, and a tenth
    of what a claimed image or member would ask for."""
    os.environ.update(RANK="0", WORLD_SIZE="1")  # one process, no torch.distributed
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    cap = vm_kib * 1024 + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            work(*args)
        except SystemExit as ended:
            returncode = ended.code if isinstance(ended.code, int) else 1
        except BaseException:  # noqa: BLE001 - whatever it is, the test reads it as the traceback's last line
            traceback.print_exc()
            returncode = 1
    results.put((returncode, out.getvalue(), err.getvalue()))


def run_capped(work: Callable[..., None], *args: str) -> subprocess.CompletedProcess:
    """`work(*args)` under the cap, in a child forked from this process: its imports are done."""
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=capped, args=(work, args, results))
    child.start()
    returncode, stdout, stderr = results.get(timeout=300)
    child.join()
    return subprocess.CompletedProcess([work.__name__, *args], returncode, stdout, stderr)


# --- hostile inputs, built small -----------------------------------------------------------------

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its frame header (SOF) patched to claim width x height: the header
    libjpeg reads is valid, the entropy-coded data is that of the small image."""
    data = bytearray(jpeg)
    at = 2  # after SOI, walk the marker segments: 0xFF, marker, 2-byte length (which counts itself)
    while data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in SOF_MARKERS:  # then precision (1 byte), height, width (2 bytes each)
            data[at + 5 : at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(data)
        at += 2 + length
    raise AssertionError("no frame header before the first non-marker byte")


def pixel_bomb(progressive: bool = False) -> bytes:
    bomb = claiming(jpeg_bytes(picture(np.random.default_rng(0), 64, 48), progressive=progressive), *[CLAIMED_SIDE] * 2)
    assert len(bomb) < 10_000 and (b"\xff\xc2" in bomb) == progressive
    return bomb


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def plain_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + padded(data)


def with_checksum(header: bytearray) -> bytes:
    """A tar header with its checksum recomputed, as tarfile writes it."""
    header[148:156] = b"        "
    header[148:155] = b"%06o\0" % tarfile.calc_chksums(header)[0]
    return bytes(header)


def gnu_sparse_member(name: str, data: bytes) -> bytes:
    """An old-GNU sparse member (type 'S', what GNU tar --sparse writes): `data` stored, then a
    hole up to CLAIMED_BYTES. tarfile cannot write one, so its header is patched: the first
    entry of the sparse map (offset, bytes stored) at 386 and the expanded size at 483."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(CLAIMED_BYTES, 12, tarfile.GNU_FORMAT)
    return with_checksum(header) + padded(data)


def pax_sparse_member(name: str, data: bytes) -> bytes:
    """A GNU sparse member in a POSIX tar (format 0.1: the map in the pax header)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = {"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(CLAIMED_BYTES)}
    return info.tobuf(tarfile.PAX_FORMAT) + padded(data)


def oversized_member(name: str, data: bytes) -> bytes:
    """A member whose header claims CLAIMED_BYTES, of which the shard holds `data` only."""
    info = tarfile.TarInfo(name)
    info.size = CLAIMED_BYTES
    return info.tobuf(tarfile.GNU_FORMAT) + padded(data)


HOSTILE_JPEGS = {"baseline": pixel_bomb(), "progressive": pixel_bomb(progressive=True)}
HOSTILE_MEMBERS = {"gnu sparse": gnu_sparse_member, "pax sparse": pax_sparse_member, "16 GiB": oversized_member}
SPARSE_REFUSAL = f"a sparse file, {CLAIMED_BYTES} bytes once its holes are filled; shards hold no sparse files"
MEMBER_REFUSALS = {
    "gnu sparse": SPARSE_REFUSAL,
    "pax sparse": SPARSE_REFUSAL,
    "16 GiB": f"{CLAIMED_BYTES} bytes, over the limit of {tars.MAX_MEMBER_BYTES} bytes for a member",
}
BOMB_REFUSAL = f"{CLAIMED_SIDE} x {CLAIMED_SIDE} pixels, over the decoder's limit of {MAX_PIXELS} pixels"


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("digits")
    shard.shard(make_params(tmp))
    return tmp / "shards"


def with_hostile_shard(digit_shards: Path, tmp_path: Path, hostile: bytes, update_manifest: bool = True) -> Path:
    """A copy of the digit shards whose val/shard-000000.tar holds its first 3 samples, then the
    members `hostile` (raw tar bytes) of a sample keyed "hostile". The manifest is made to match
    (sha256, bytes, counts), so that the hostile sample is the one problem, or left as it was."""
    shards = tmp_path / "shards"
    shutil.copytree(digit_shards, shards)
    path = shards / "val" / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar]
    kept = list(dict.fromkeys(name.split(".")[0] for name, _ in members))[:3]
    good = b"".join(plain_member(name, data) for name, data in members if name.split(".")[0] in kept)
    path.write_bytes(good + hostile + bytes(2 * tarfile.BLOCKSIZE))
    if update_manifest:
        manifest = json.loads((shards / "manifest.json").read_text())
        entry = manifest["splits"]["val"]["shards"][0]
        assert entry["name"] == "val/shard-000000.tar"
        manifest["splits"]["val"]["num_samples"] += len(kept) + 1 - entry["num_samples"]
        data = path.read_bytes()
        entry.update(num_samples=len(kept) + 1, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards


def hostile_sample(jpg: bytes) -> bytes:
    return plain_member("hostile.jpg", jpg) + plain_member("hostile.cls", b"1")


def hostile_member(kind: str) -> bytes:
    jpg = jpeg_bytes(picture(np.random.default_rng(0), 16, 16))
    return HOSTILE_MEMBERS[kind]("hostile.jpg", jpg) + plain_member("hostile.cls", b"1")


# --- the decoder ---------------------------------------------------------------------------------

def decode_every_way(path: str) -> None:
    jpeg = Path(path).read_bytes()
    ways = {
        "whole": transforms.decode,
        "training crop": transforms.train_transform("imagenet", flip=True),
        "centre crop": transforms.eval_transform("imagenet", "single"),
        "ten crops": transforms.eval_transform("imagenet", "ten"),
    }
    for way, transform in ways.items():
        try:
            transform(jpeg)
            print(f"{way}: decoded")
        except ValueError as error:
            print(f"{way}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("kind", HOSTILE_JPEGS)
def test_the_decoder_refuses_a_pixel_bomb_before_allocating(tmp_path, kind):
    """Every way the transforms decode: a whole decode would take 13 GB; a progressive JPEG's
    coefficients alone 13 GB, even for a crop at 1/8 scale."""
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(HOSTILE_JPEGS[kind])
    result = run_capped(decode_every_way, str(bomb))
    assert result.returncode == 0, result.stderr
    ways = ["whole", "training crop", "centre crop", "ten crops"]
    assert result.stdout.splitlines() == [f"{way}: ValueError: {BOMB_REFUSAL}" for way in ways]


def test_the_decoders_limit_is_the_pixel_count_of_the_header():
    jpeg = jpeg_bytes(picture(np.random.default_rng(0), 64, 48))
    assert len(jpegcrop.decode(jpeg, 0, 0, 64, 48, 1, 64 * 48)) == 64 * 48 * 3
    with pytest.raises(ValueError, match=r"^64 x 48 pixels, over the decoder's limit of 3071 pixels$"):
        jpegcrop.decode(jpeg, 0, 0, 8, 8, 1, 64 * 48 - 1)
    with pytest.raises(ValueError, match="at least 1"):
        jpegcrop.decode(jpeg, 0, 0, 8, 8, 1, 0)


def test_the_decoder_takes_no_call_without_a_limit():
    """Fail closed: the limit is an argument of every decode, not a setting someone may forget."""
    jpeg = jpeg_bytes(picture(np.random.default_rng(0), 64, 48))
    with pytest.raises(TypeError, match="exactly 7 arguments"):
        jpegcrop.decode(jpeg, 0, 0, 8, 8, 1)


def test_the_ten_crop_refuses_a_resize_over_the_limit(tmp_path):
    """A 4 x 30,000 JPEG is within the decoder's limit, but the 10-crop resizes the whole image
    to a short side of 256: 1.9 billion pixels."""
    banner = tmp_path / "banner.jpg"
    banner.write_bytes(jpeg_bytes(np.zeros((4, 30_000, 3), np.uint8)))
    result = run_capped(decode_every_way, str(banner))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"ten crops: ValueError: resizing 30000 x 4 to 1920000 x 256 is over the limit of {MAX_PIXELS} pixels"
    )


def test_the_shard_stage_refuses_limits_the_loader_would_not_read(tmp_path):
    for key, value in [("max_pixels", MAX_PIXELS + 1), ("max_bytes", tars.MAX_MEMBER_BYTES + 1)]:
        with pytest.raises(shard.UsageError, match=f"shard.{key}: {value} is over"):
            shard.check_limits(make_params(tmp_path, f"shard.{key}={value}").shard)


def test_the_shard_stages_defaults_fit_the_loaders_limits():
    """The shard stage refuses an input over shard.max_pixels or shard.max_bytes: with the
    defaults, nothing it writes is refused by the loader."""
    params = params_module.load(REPO / "params.yaml", [])
    assert params.shard.max_pixels <= MAX_PIXELS
    assert params.shard.max_bytes <= tars.MAX_MEMBER_BYTES


# --- the loader ----------------------------------------------------------------------------------

def load_val(shards: str) -> None:
    batches = loader.make_loader(
        shards, "val", transforms.eval_transform("cifar"), batch_size=4, num_workers=0, epoch=0, seed=0, train=False
    )
    print(sum(len(labels) for _, labels in batches), "samples")


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", HOSTILE_JPEGS)
def test_the_loader_names_the_shard_and_sample_of_a_pixel_bomb(digit_shards, tmp_path, kind):
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_sample(HOSTILE_JPEGS[kind]))
    result = run_capped(load_val, str(shards))
    url = shards / "val" / "shard-000000.tar"
    assert last_line(result) == f"ValueError: {url}: sample hostile: {BOMB_REFUSAL}", result.stderr


@pytest.mark.parametrize("kind", HOSTILE_MEMBERS)
def test_the_loader_refuses_a_sparse_or_oversized_member_unread(digit_shards, tmp_path, kind):
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_member(kind))
    result = run_capped(load_val, str(shards))
    url = shards / "val" / "shard-000000.tar"
    expected = f"{url}: hostile.jpg: {MEMBER_REFUSALS[kind]}; check the shards with `python -m pipeline.verify`"
    assert last_line(result) == f"ValueError: {expected}", result.stderr


def read_pipe(url: str) -> None:
    print(len(list(wds.DataPipeline(wds.SimpleShardList([url]), tars.tar_samples))), "samples")


def test_a_sparse_member_in_a_piped_shard_is_refused_unread(digit_shards, tmp_path):
    """A pipe cannot seek: tarfile reads it as a stream, where a sparse member's holes are
    zero-filled all the same."""
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_member("gnu sparse"))
    url = f"pipe:cat {shards / 'val' / 'shard-000000.tar'}"
    result = run_capped(read_pipe, url)
    expected = f"{url}: hostile.jpg: {SPARSE_REFUSAL}; check the shards with `python -m pipeline.verify`"
    assert last_line(result) == f"ValueError: {expected}", result.stderr


def test_a_member_is_read_up_to_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "shard.tar"
    path.write_bytes(plain_member("a.cls", b"12") + plain_member("b.cls", b"123") + bytes(2 * tarfile.BLOCKSIZE))
    monkeypatch.setattr(tars, "MAX_MEMBER_BYTES", 2)
    members = tars.tar_members(iter([{"url": "the-url", "stream": path.open("rb")}]))
    assert next(members)["data"] == b"12"
    with pytest.raises(ValueError, match=r"^the-url: b\.cls: 3 bytes, over the limit of 2 bytes for a member; "):
        next(members)


# --- verify --------------------------------------------------------------------------------------

def verify_shards(shards: str, metrics: str) -> None:
    verify.main(["--params", str(REPO / "params.yaml"), "--set", f"paths.shards={shards}", "--set", f"paths.metrics={metrics}"])


def run_verify(shards: Path, tmp_path: Path) -> list[str]:
    """verify's problem lines (it exits 1), without its last line: FAILED and the count."""
    result = run_capped(verify_shards, str(shards), str(tmp_path / "metrics"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1] == f"verify: FAILED, {len(lines) - 1} problems in {shards}", (
        result.stderr
    )
    return lines[:-1]


@pytest.mark.parametrize("kind", HOSTILE_JPEGS)
def test_verify_reads_each_jpegs_header_and_names_a_pixel_bomb(digit_shards, tmp_path, kind):
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_sample(HOSTILE_JPEGS[kind]))
    path = shards / "val" / "shard-000000.tar"
    assert run_verify(shards, tmp_path) == [f"verify: {path}: sample hostile: {BOMB_REFUSAL}"]


@pytest.mark.parametrize("kind", ["gnu sparse", "pax sparse"])
def test_verify_names_a_sparse_member_without_reading_it(digit_shards, tmp_path, kind):
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_member(kind))
    path = shards / "val" / "shard-000000.tar"
    assert run_verify(shards, tmp_path) == [f"verify: {path}: hostile.jpg: {SPARSE_REFUSAL}"]


def test_verify_names_an_oversized_member_without_reading_it(digit_shards, tmp_path):
    """The shard ends inside the member's claimed 16 GiB: tarfile then finds the tar cut short,
    which is said too, after the member."""
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_member("16 GiB"))
    path = shards / "val" / "shard-000000.tar"
    lines = run_verify(shards, tmp_path)
    assert lines[0] == f"verify: {path}: hostile.jpg: {MEMBER_REFUSALS['16 GiB']}"
    assert lines[1].startswith(f"verify: {path}: not a readable tar (")


def test_verify_reads_no_sparse_member_of_a_shard_whose_sha256_differs(digit_shards, tmp_path):
    """The samples of a shard that fails its sha256 are checked all the same, never by
    reading a member the loader would refuse."""
    shards = with_hostile_shard(digit_shards, tmp_path, hostile_member("gnu sparse"), update_manifest=False)
    path = shards / "val" / "shard-000000.tar"
    lines = run_verify(shards, tmp_path)
    assert f"verify: {path}: sha256 differs from the manifest" in lines
    assert f"verify: {path}: hostile.jpg: {SPARSE_REFUSAL}" in lines
