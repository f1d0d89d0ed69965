"""Reading the shards' tar files: WebDataset's tar reader, made safe for shards others wrote.

`tar_samples` turns shard URLs into samples (dicts of member bytes keyed by extension) as
`wds.tarfile_to_samples` does, but reads each member in one piece, refuses members whose header
asks for more memory than any shard the stage writes would need (`member_refusal`), and
`whole_shards` fails at a shard that holds fewer samples than its manifest says. Members are
bytes only: nothing is unpickled. Shards may be local paths or `s3://` (any fsspec URL).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import group_by_keys, url_opener


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    return fsspec.open(url, mode).open()


# WebDataset's own openers cover files, pipes, http and gs; object stores go through fsspec.
for _scheme in ("s3", "gcs", "az", "abfs"):
    gopen_schemes[_scheme] = _open_with_fsspec


# The largest tar member read into memory (by the loader, and by `verify`). A member is read
# whole, and its header alone says how large it is: a shard someone else wrote can claim 16 GiB
# in a member that holds a few bytes. The shard stage writes nothing near this: a JPEG passed
# through is at most shard.max_bytes (64 MiB by default), and one it re-encodes has at most
# images.MAX_PIXELS pixels, ~180 MB even for pure noise at quality 100 (2 bytes a pixel).
MAX_MEMBER_BYTES = 256 * 1024 * 1024


def member_refusal(member: tarfile.TarInfo) -> str | None:
    """Why a regular tar member must not be read, or None. A sparse member (a GNU tar
    extension) stores only its data blocks and reads back as its full size with the holes
    zero-filled: 250 KB in the tar can read as 16 GiB. The shard stage never writes one."""
    if member.issparse():
        return f"a sparse file, {member.size} bytes once its holes are filled; shards hold no sparse files"
    if member.size > MAX_MEMBER_BYTES:
        return f"{member.size} bytes, over the limit of {MAX_MEMBER_BYTES} bytes for a member"
    return None


def tar_members(sources: Iterator[dict]) -> Iterator[dict]:
    """WebDataset's `tar_file_expander`, reading each member in one piece: WebDataset opens every
    tar in tarfile's stream mode, which copies a member 10 KiB at a time, a tenth of a JPEG's
    decode. Files and object stores (fsspec) seek; a pipe is read as a stream. A member
    `member_refusal` refuses is an error, before any of it is read."""
    for source in sources:
        url, stream = source["url"], source["stream"]
        try:
            seekable = isinstance(stream, io.IOBase) and stream.seekable()  # WebDataset's Pipe is neither
            with stream, tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
                for member in tar:
                    if member.isreg():
                        refusal = member_refusal(member)
                        if refusal:
                            raise ValueError(
                                f"{url}: {member.name}: {refusal}; check the shards with `python -m pipeline.verify`"
                            )
                        yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
                    tar.members = []  # the headers read so far, which tarfile would keep to the end
        except (tarfile.TarError, EOFError) as error:
            raise ValueError(
                f"{url}: not a readable tar ({error}); check the shards with `python -m pipeline.verify`"
            ) from None
        yield {}  # a shard's end: WebDataset's group_by_keys never joins members of two shards


def tar_samples(urls: Iterator[dict]) -> Iterator[dict]:
    """Shard URLs -> samples: `wds.tarfile_to_samples` with `tar_members` as its reader."""
    return group_by_keys(tar_members(url_opener(urls)))


def whole_shards(samples: Iterator[dict], counts: dict[str, int]) -> Iterator[dict]:
    """Every shard's samples, and an error at a shard that ends short of its manifest count.
    tarfile reads a tar cut off at a member's header as a shorter tar, and a rank left short of
    batches would hang the others in all-reduce."""
    url, seen = None, 0
    for sample in samples:
        if sample["__url__"] != url:
            _check_count(url, seen, counts)
            url, seen = sample["__url__"], 0
        seen += 1
        yield sample
    _check_count(url, seen, counts)


def _check_count(url: str | None, seen: int, counts: dict[str, int]) -> None:
    if url is not None and seen != counts[url]:
        raise ValueError(
            f"{url}: {seen} samples, the manifest says {counts[url]}; check the shards with `python -m pipeline.verify`"
        )
