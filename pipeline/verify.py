"""Stage `verify`: recheck every shard against manifest.json; write the shard counts as metrics.

    python -m pipeline.verify [--params params.yaml]

Shards may be local or `s3://` (any fsspec URL), as the loader reads them; a remote shard is
downloaded once, to a temporary file, for its hash and its samples. Checks each
shard's sha256, size and sample count, that every sample has a JPEG the loader will
decode (its header read: no more pixels than `MAX_PIXELS`) and an integer label
within the classes, that the split totals add up, and that no shard lies in the folder that
the manifest does not list. A member the loader would refuse to read (sparse, or over
`MAX_MEMBER_BYTES`) is reported without being read. Any mismatch is printed, one line
each, and the stage exits 1.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

import jpegcrop
from pipeline import cli
from pipeline.files import open_url, sha256_of, url_to_fs, write_json_atomic
from pipeline.images import MAX_PIXELS
from pipeline.manifest import Manifest, read_manifest
from pipeline.params import Params
from pipeline.tars import member_refusal


def check_samples(path: str | Path, num_classes: int, name: str | None = None) -> tuple[int, list[str]]:
    """(number of samples, problems) of one tar shard, a local path or a URL; the problem lines
    call it `name` (by default, its path)."""
    name = name or str(path)
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    refused: set[str] = set()  # samples with a member left unread: that member's line says it all
    problems = []
    try:
        with open_url(str(path), "rb") as f, tarfile.open(fileobj=f) as tar:
            for info in tar:
                if not info.isfile():
                    problems.append(f"{name}: {info.name}: not a regular file")
                    continue
                key, _, ext = info.name.partition(".")
                refusal = member_refusal(info)
                if refusal:
                    problems.append(f"{name}: {info.name}: {refusal}")
                    refused.add(key)
                    members.setdefault(key, {})  # still a sample, for the count
                elif ext in ("jpg", "cls"):
                    members[key][ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError) as e:
        # What came before still counts: a member claiming more than the tar holds (refused
        # above) makes tarfile find the tar cut short at the next header.
        return 0, [*problems, f"{name}: not a readable tar ({e})"]
    for key, sample in members.items():
        if key in refused:
            continue
        if "jpg" not in sample or "cls" not in sample:
            problems.append(f"{name}: sample {key} lacks {'jpg' if 'jpg' not in sample else 'cls'}")
            continue
        try:
            width, height = jpegcrop.size(sample["jpg"])  # the header only
        except ValueError as e:
            problems.append(f"{name}: sample {key}: .jpg: {e}")
        else:
            if width * height > MAX_PIXELS:  # the line the loader's error would end with
                problems.append(
                    f"{name}: sample {key}: {width} x {height} pixels, over the decoder's limit of {MAX_PIXELS} pixels"
                )
        label = sample["cls"].decode("ascii", "replace")
        # A label of thousands of digits is no class, and int() refuses it (Python's digit limit).
        if not label.isdigit() or len(label) > 9 or int(label) >= num_classes:
            problems.append(f"{name}: sample {key}: label {label!r} not in 0..{num_classes - 1}")
    return len(members), problems


def location(shards: str | Path) -> str:
    """How problem lines name the shards folder: a URL as given, a local path as pathlib
    writes it (`./data/shards/` as `data/shards`), as these lines read before URLs were."""
    text = str(shards)
    return text.rstrip("/") if "://" in text or "::" in text else str(Path(text))


def file_size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    """Bytes of the file at `path`, or None where there is none (absent, or a folder): one
    request on an object store, where isfile and size would be two."""
    try:
        info = fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info["size"] if info["type"] == "file" else None


def stored_shards(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The names (`split/shard.tar`) of the tars one folder below `root`, in pathlib's order.
    Listed, not globbed: a `[` in a local folder's name would be a glob pattern, and the
    shard the manifest does not list would go unreported."""
    prefix = root.rstrip("/") + "/"
    found = (path[len(prefix) :] for path in fs.find(root, maxdepth=2, withdirs=True) if path.startswith(prefix))
    tars = [name for name in found if name.count("/") == 1 and name.endswith(".tar")]
    return sorted(tars, key=lambda name: name.split("/"))  # as pathlib sorts: folder, then file


@contextmanager
def readable_copy(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """A local path to read the file at `path` from: itself when local, else a temporary copy,
    so that a shard in an object store is downloaded once for its hash and its samples."""
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        local = str(Path(scratch) / "shard.tar")
        fs.get_file(path, local)
        yield local


def verify(shards: str | Path, manifest: Manifest) -> list[str]:
    """Every problem of the shards under `shards` (a folder or a URL), one line each."""
    fs, root = url_to_fs(str(shards))
    # fsspec shares one filesystem object per store within a process, with the listings it has
    # seen: a check reads the store as it is now.
    fs.invalidate_cache()
    base = location(shards)
    problems = []
    num_classes = len(manifest.classes)
    for split, info in manifest.splits.items():
        total = 0
        for entry in info.shards:
            path = f"{base}/{entry.name}"
            size = file_size(fs, f"{root}/{entry.name}")
            if size is None:
                problems.append(f"{path}: missing")
                continue
            if size != entry.bytes:
                problems.append(f"{path}: {size} bytes, manifest says {entry.bytes}")
            with readable_copy(fs, f"{root}/{entry.name}") as local:
                if sha256_of(local) != entry.sha256:
                    problems.append(f"{path}: sha256 differs from the manifest")
                # Its samples are checked all the same: nothing the loader would refuse is read,
                # and the lines say what is wrong beyond "differs".
                count, sample_problems = check_samples(local, num_classes, name=path)
            problems += sample_problems
            if count != entry.num_samples:
                problems.append(f"{path}: {count} samples, manifest says {entry.num_samples}")
            total += entry.num_samples
        if total != info.num_samples:
            problems.append(f"{split}: shards hold {total} samples, manifest says {info.num_samples}")
    listed = {entry.name for info in manifest.splits.values() for entry in info.shards}
    for name in stored_shards(fs, root):
        if name not in listed:
            problems.append(f"{base}/{name}: a shard the manifest does not list")
    return problems


def shard_metrics(manifest: Manifest) -> dict[str, dict[str, int]]:
    """metrics/shards.json, a DVC metric: each split's counts."""
    return {
        split: {
            "num_samples": info.num_samples,
            "num_shards": len(info.shards),
            "rejected": len(info.rejected),
            "converted": len(info.converted),
        }
        for split, info in manifest.splits.items()
    }


def main(argv: list[str] | None = None) -> None:
    params: Params = cli.parse("verify", "Recheck the shards against their manifest.", argv)
    shards = params.paths.shards
    manifest = read_manifest(shards)
    problems = verify(shards, manifest)
    if problems:
        for line in problems:
            print(f"verify: {line}", file=sys.stderr)
        print(f"verify: FAILED, {len(problems)} problems in {shards}", file=sys.stderr)
        sys.exit(1)
    metrics = shard_metrics(manifest)
    out = Path(params.paths.metrics) / "shards.json"
    write_json_atomic(out, metrics)
    for split, m in metrics.items():
        print(f"verify: {split}: {m['num_shards']} shards, {m['num_samples']} samples: OK")
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
