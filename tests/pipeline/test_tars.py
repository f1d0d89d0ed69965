"""Reading shards' tars: every member in one piece, from files and streams."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from pipeline import tars
from tests.helpers import shard_samples


def test_tar_members_read_a_stream_as_a_file(digit_shards):
    """Files seek, and each member is read in one piece; a pipe cannot, and is read as a stream."""
    path = min((digit_shards / "train").glob("*.tar"))
    from_file = shard_samples(str(path))
    assert len(from_file) == 170
    assert shard_samples(f"pipe:cat {path}") == from_file


def tar_of(path: Path, members: list[tuple[str, bytes | str | None]], format: int, pax: dict | None = None) -> bytes:
    """A tar of regular files (bytes), directories (None) and symlinks (str: the target)."""
    with tarfile.open(path, "w", format=format, pax_headers=pax or {}) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
            else:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if isinstance(content, bytes) else None)
    return path.read_bytes()


def tarfile_reads(path: Path) -> list[tuple[str, bytes]] | str:
    """What tarfile itself reads of a tar: every regular member's (name, data), or its error."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    except tarfile.TarError as error:
        return str(error)


def loader_reads(path: Path) -> list[tuple[str, bytes]] | str:
    """What the loader's tar reader reads of it, or the reason it gives."""
    try:
        members = tars.tar_members(iter([{"url": str(path), "stream": open(path, "rb")}]))  # noqa: SIM115 (tar_members closes it)
        return [(m["fname"], m["data"]) for m in members if m]
    except ValueError as error:
        return re.fullmatch(r".*: not a readable tar \((.*)\); check .*", str(error)).group(1)


LONG_DIR = "d" * 120  # a path over 100 bytes: a ustar prefix, a GNU long name or a pax path
PLAIN = [("a.cls", b"3"), ("a.jpg", bytes(range(256)) * 3), ("b.cls", b""), ("b.jpg", b"x" * 512)]
TARS = {
    "gnu": (PLAIN, tarfile.GNU_FORMAT, None),
    "ustar with prefixes": ([(f"{LONG_DIR}/{name}", data) for name, data in PLAIN], tarfile.USTAR_FORMAT, None),
    "gnu long names": ([(f"{LONG_DIR}/{LONG_DIR}/{name}", data) for name, data in PLAIN], tarfile.GNU_FORMAT, None),
    "pax long name midway": (
        [*PLAIN[:2], (f"{LONG_DIR}/{LONG_DIR}/c.cls", b"1"), *PLAIN[2:]],
        tarfile.PAX_FORMAT,
        None,
    ),
    "pax non-ascii name": ([*PLAIN[:2], ("é.cls", b"1"), *PLAIN[2:]], tarfile.PAX_FORMAT, None),
    "pax global header": (PLAIN, tarfile.PAX_FORMAT, {"comment": "made by someone else"}),
    "directories and links": ([("d/", None), *PLAIN[:2], ("l.jpg", "a.jpg"), *PLAIN[2:]], tarfile.GNU_FORMAT, None),
}


@pytest.mark.parametrize("kind", TARS)
def test_the_tar_reader_reads_what_tarfile_reads(tmp_path, kind):
    """The reader parses plain headers itself and hands tarfile the rest of a shard at the first
    header that needs more: the members are tarfile's, whatever the format."""
    path = tmp_path / "shard.tar"
    tar_of(path, *TARS[kind])
    reads = tarfile_reads(path)
    assert len(reads) >= len(PLAIN)
    assert loader_reads(path) == reads


def cut_data(tar: bytes) -> bytes:
    return tar[: 512 * 3 + 100]  # a.jpg's header, then 100 of its 768 bytes


def cut_padding(tar: bytes) -> bytes:
    return tar[: 512 * 3 + 768 + 10]  # a.jpg whole, 10 of its 256 bytes of padding


def bad_checksum(tar: bytes) -> bytes:
    return tar[: 512 * 5] + b"\xff" + tar[512 * 5 + 1 :]  # b.cls's header


BROKEN = {
    "empty": lambda tar: b"",
    "zeros": lambda tar: bytes(4096),
    "not a tar": lambda tar: b"<html>" * 200,
    "cut in a member's data": cut_data,
    "cut in a member's padding": cut_padding,
    "cut in a header": lambda tar: tar[: 512 * 4 + 100],
    "bad checksum midway": bad_checksum,
    "no end blocks": lambda tar: tar[: 512 * 7],
}


@pytest.mark.parametrize("kind", BROKEN)
def test_the_tar_reader_fails_where_tarfile_fails(tmp_path, kind):
    """A broken tar reads as tarfile reads it: the same error, or the same members up to where
    tarfile sees the archive end (whole_shards then counts the samples against the manifest)."""
    path = tmp_path / "shard.tar"
    path.write_bytes(BROKEN[kind](tar_of(path, PLAIN, tarfile.GNU_FORMAT)))
    assert loader_reads(path) == tarfile_reads(path)
