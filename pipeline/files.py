"""Files written whole or not at all, and their hashes.

Every output a stage writes goes under a temporary name, is flushed to disk, then renamed onto
its final name: a reader (DVC, Git, the next stage, a rerun after a crash) sees the old file or
the new one, never half of one. The folder is flushed too, so that the rename itself survives a
crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import fsspec


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk, so that renaming it to its final name never
    publishes a name whose data a crash can still lose."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def project_path(path: str) -> str:
    """A path of params made absolute against the project's folder: the folder DVC names in
    DVC_ROOT (for a queued or `--temp` experiment, which runs in a temporary copy under
    .dvc/tmp/exps, the project's own, not the copy), else the working directory. For what the
    stages keep outside DVC (the MLflow store, Ray's checkpoints), which must outlive the copy;
    the outputs DVC tracks stay relative to the working directory, where DVC collects them."""
    if "://" in path:
        return path
    return str((Path(os.environ.get("DVC_ROOT") or ".") / path).resolve())


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file, a local path or a URL (s3://...), read 1 MiB at a time."""
    h = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
