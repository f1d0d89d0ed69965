"""Files written whole or not at all, their hashes, and object stores that blip.

Every output a stage writes goes under a temporary name, is flushed to disk, then renamed onto
its final name: a reader (DVC, Git, the next stage, a rerun after a crash) sees the old file or
the new one, never half of one. The folder is flushed too, so that the rename itself survives a
crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs


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


# Object stores (s3://) answer with a reset connection, a 503 or a throttle now and then, and an
# endpoint can be away for a minute. botocore's "standard" retry mode retries those (and only
# those) with exponential backoff and jitter, capped at 20 s a wait: S3_ATTEMPTS attempts wait
# out about two minutes. A request that gets no answer is cut at S3_TIMEOUT_S, then retried.
S3_ATTEMPTS = 10
S3_TIMEOUT_S = 20


def storage_options(url: str) -> dict[str, object]:
    """fsspec's options for `url`: for s3://, botocore's retry mode and timeouts above."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    retries = {"max_attempts": S3_ATTEMPTS, "mode": "standard"}
    return {"config_kwargs": {"retries": retries, "connect_timeout": S3_TIMEOUT_S, "read_timeout": S3_TIMEOUT_S}}


def open_url(url: str, mode: str = "rb", **kwargs: Any):
    """fsspec.open, with the object store's retries: every read of a shard, a manifest or a
    checkpoint goes through here (or through `url_to_fs`)."""
    return fsspec.open(url, mode, **storage_options(url), **kwargs)


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **storage_options(url))


def ray_storage(path: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: for s3://, Arrow's S3 client
    (which Ray writes checkpoints with) with the same retries and timeouts as `storage_options`,
    at the endpoint AWS_ENDPOINT_URL names, if any (a MinIO, Ceph or test server); else Ray's
    own choice."""
    if not path.startswith("s3://"):
        return path, None
    options: dict[str, object] = {
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        "connect_timeout": S3_TIMEOUT_S,
        "request_timeout": S3_TIMEOUT_S,
    }
    if endpoint := os.environ.get("AWS_ENDPOINT_URL"):
        parts = urllib.parse.urlsplit(endpoint)
        options.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme or "https")
    if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        options["region"] = region
    return path.removeprefix("s3://"), pyarrow.fs.S3FileSystem(**options)


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file, a local path or a URL (s3://...), read 1 MiB at a time."""
    h = hashlib.sha256()
    with open_url(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def disk_bytes(*roots: Path) -> int:
    """The disk space the files under `roots` take, each file once however many names it has
    (DVC's cache and the workspace share hard-linked files): allocated blocks, not lengths.
    Symlinks count as the little they are, not as what they point to."""
    seen: dict[tuple[int, int], int] = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                stat = os.lstat(os.path.join(folder, name))
                seen[(stat.st_dev, stat.st_ino)] = stat.st_blocks * 512
    return sum(seen.values())
