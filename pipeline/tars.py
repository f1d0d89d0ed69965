"""Reading the shards' tar files: WebDataset's tar reader, made safe for shards others wrote.

`tar_samples` turns shard URLs into samples (dicts of member bytes keyed by extension) as
`wds.tarfile_to_samples` does, but reads each member in one piece (the plain headers that the
shard stage writes parsed here, anything else by tarfile), refuses members whose header
asks for more memory than any shard the stage writes would need (`member_refusal`), and
`whole_shards` fails at a shard that holds fewer samples than its manifest says. Members are
bytes only: nothing is unpickled. Shards may be local paths or `s3://` (any fsspec URL).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

from webdataset.tariterators import group_by_keys, url_opener

from pipeline.files import open_url

# Object stores, read through fsspec with the retries pipeline.files gives them.
OBJECT_STORES = ("s3", "gcs", "az", "abfs")  # gs://: WebDataset pipes it through gsutil


def opened(sources: Iterator[dict]) -> Iterator[dict]:
    """Each shard's source with its open `stream`: an object store's through fsspec, anything
    else through WebDataset's `url_opener` (files, pipes, http)."""
    for source in sources:
        if source["url"].split("://", 1)[0] in OBJECT_STORES:
            yield {**source, "stream": open_url(source["url"], "rb").open()}
        else:
            yield from url_opener(iter([source]))


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
    return size_refusal(member.size)


def size_refusal(size: int) -> str | None:
    if size > MAX_MEMBER_BYTES:
        return f"{size} bytes, over the limit of {MAX_MEMBER_BYTES} bytes for a member"
    return None


def plain_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular file's tar header that needs none of tar's extensions, parsed
    as tarfile parses it (`TarInfo.frombuf`); None for any other header (pax and GNU headers,
    sparse files, links, directories, a bad checksum, the archive's end), which tarfile reads.
    Reading these few fields instead of all of them, and the data without a file object around
    it, reads a shard's members about three times faster (BENCHMARKS.md, `tar_read_ms`)."""
    if (
        len(header) != tarfile.BLOCKSIZE
        or header[156:157] not in (tarfile.REGTYPE, tarfile.AREGTYPE)
        or header[124] in (0o200, 0o377)  # a size in base-256 (over 8 GiB)
    ):
        return None
    try:
        checksum, size = tarfile.nti(header[148:156]), tarfile.nti(header[124:136])
    except tarfile.InvalidHeaderError:
        return None
    # The checksum's field counts as spaces. (tarfile also accepts the signed sum of old tars.)
    if size < 0 or checksum != 256 + sum(header[:148]) + sum(header[156:]):
        return None
    name = tarfile.nts(header[:100], tarfile.ENCODING, "surrogateescape")
    prefix = tarfile.nts(header[345:500], tarfile.ENCODING, "surrogateescape")
    if prefix:  # a ustar name longer than 100 bytes
        name = f"{prefix}/{name}"
    return None if name.endswith("/") else (name, size)


def plain_members(stream: io.IOBase, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of a seekable tar's members from where `stream` is up to the first header
    `plain_member` leaves to tarfile, where `stream` is left."""
    while True:
        header = stream.read(tarfile.BLOCKSIZE)
        member = plain_member(header)
        if member is None:
            stream.seek(-len(header), io.SEEK_CUR)
            return
        name, size = member
        refusal = size_refusal(size)
        if refusal:
            raise ValueError(refused(url, name, refusal))
        data = stream.read(size)
        padding = -size % tarfile.BLOCKSIZE
        if len(data) != size or len(stream.read(padding)) != padding:
            raise tarfile.ReadError("unexpected end of data")  # as tarfile says it
        yield name, data


def tar_members(sources: Iterator[dict]) -> Iterator[dict]:
    """WebDataset's `tar_file_expander`, reading each member in one piece: WebDataset opens every
    tar in tarfile's stream mode, which copies a member 10 KiB at a time, a tenth of a JPEG's
    decode. Files and object stores (fsspec) seek: their plain members are read by
    `plain_members`, and tarfile reads on from the first member that needs more; a pipe is read
    by tarfile as a stream. A member `member_refusal` refuses is an error, before any of it is
    read."""
    for source in sources:
        url, stream = source["url"], source["stream"]
        try:
            seekable = isinstance(stream, io.IOBase) and stream.seekable()  # WebDataset's Pipe is neither
            with stream:
                for name, data in plain_members(stream, url) if seekable else ():
                    yield {"fname": name, "data": data, "__url__": url}
                with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
                    for member in tar:
                        if member.isreg():
                            refusal = member_refusal(member)
                            if refusal:
                                raise ValueError(refused(url, member.name, refusal))
                            yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
                        tar.members = []  # the headers read so far, which tarfile would keep to the end
        except (tarfile.TarError, EOFError) as error:
            raise ValueError(
                f"{url}: not a readable tar ({error}); check the shards with `python -m pipeline.verify`"
            ) from None
        yield {}  # a shard's end: WebDataset's group_by_keys never joins members of two shards


def refused(url: str, name: str, refusal: str) -> str:
    return f"{url}: {name}: {refusal}; check the shards with `python -m pipeline.verify`"


def tar_samples(urls: Iterator[dict]) -> Iterator[dict]:
    """Shard URLs -> samples: `wds.tarfile_to_samples` with `tar_members` as its reader."""
    return group_by_keys(tar_members(opened(urls)))


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
