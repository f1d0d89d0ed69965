"""Replacing an output folder safely, and stopping a stage so that only complete files remain.

A stage that replaces a whole folder must first know the folder is its own. A mistyped
`paths.shards` (/data, $HOME/datasets) named a folder that was then replaced, the raw data set in
it included. So the shard stage replaces a folder only when it is absent, empty, or its own
previous output, and refuses anything else with one line (a UsageError, exit code 2) before it
touches anything. A link is written through: the link stays, the data lands where it points.

One lock per output keeps two runs from renaming each other's files away. Ctrl-C and SIGTERM
stop a run at once: queued work is cancelled and the worker processes are ended, leaving only
temporaries (which the next run removes) and complete files, flushed to disk before they are
given their final names.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import stat
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.manifest import MANIFEST, SCHEMA

# --- where the output goes -------------------------------------------------------------------


def resolve(path: str, what: str) -> Path:
    """The real folder `path` names, links followed, so the stage writes beside and into the
    target and a link stays a link. Refuses a link to nothing (the stage would create the folder
    wherever a missing mount used to be), a file, and a mount point (which cannot be renamed)."""
    given = Path(path)
    for part in (given, *given.parents):
        if part.is_symlink() and not part.exists():
            raise UsageError(f"{what}: {part} is a link to {os.path.realpath(part)}, which does not exist")
    out = Path(os.path.realpath(given))
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what}: {out} is not a folder")
    if out.is_dir() and os.path.ismount(out):
        raise UsageError(f"{what}: {out} is a mount point, which cannot be replaced; choose a folder inside it")
    return out


def check_apart(out: Path, root: str | None, what_out: str, what_root: str) -> None:
    """Refuse an output inside the input or an input inside the output: replacing the output
    would delete the input, or the next run would read its own output as data."""
    if root is None:
        return
    data = Path(os.path.realpath(root))
    if out == data or data in out.parents:
        raise UsageError(f"{what_out}: {out} is inside {what_root} {data}; write the output elsewhere")
    if out in data.parents:
        raise UsageError(f"{what_root}: {data} is inside {what_out} {out}, which the stage replaces; move one of them")


# --- what the stage owns ---------------------------------------------------------------------


def check_owned(folder: Path, what: str, owns: Callable[[str, bool], bool], advice: str) -> None:
    """Refuse unless `owns(path relative to folder, is a folder)` accepts everything in `folder`
    (absent counts as empty). Links are judged as themselves, never followed: a link named like a
    shard is a file (DVC's symlink cache makes those), a link to a folder is foreign."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise UsageError(f"{what}: {folder} is not a folder the shard stage made; {advice}")
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            raise UsageError(f"{what}: {current} cannot be read ({e.strerror}); {advice}") from None
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            relative = Path(entry.path).relative_to(folder).as_posix()
            if not owns(relative, is_dir):
                raise UsageError(
                    f"{what}: {folder} holds files the shard stage did not write (e.g. {entry.path}); {advice}"
                )
            if is_dir:
                pending.append(Path(entry.path))


SPLIT_NAME = re.compile(r"[a-z]+")
SHARD_NAME = re.compile(r"[a-z]+/shard-\d{6,}\.tar")


def check_previous_output(out: Path, what: str) -> None:
    """Refuse to replace `out` unless it is absent, empty, or the shard stage's own output: a
    manifest of this schema or an older one, the shards it lists in their split folders (an
    empty split folder named in the manifest included), and nothing else.

    Older schemas are owned, not read: every other stage refuses them with "rerun the shard
    stage", and this is that rerun. Only the shard names are taken, which every schema lists in
    the same place."""
    advice = "choose an empty or new folder"
    folders: set[str] = set()
    files: set[str] = set()
    manifest_path = out / MANIFEST
    if manifest_path.exists() or manifest_path.is_symlink():
        try:
            manifest = json.loads(manifest_path.read_text())
            schema = manifest.get("schema")
            if type(schema) is not int or not 1 <= schema <= SCHEMA:  # the stage replaces its older outputs too
                raise ValueError(f"schema {schema!r}, expected {SCHEMA} or older")
            folders = {split for split in manifest["splits"] if SPLIT_NAME.fullmatch(split)}
            names = [s["name"] for info in manifest["splits"].values() for s in info["shards"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise UsageError(
                f"{what}: {out} holds a {MANIFEST} the shard stage cannot take for its own ({reason}); {advice}"
            ) from None
        files = {MANIFEST} | {n for n in names if SHARD_NAME.fullmatch(n) and n.split("/")[0] in folders}
    check_owned(out, what, lambda path, is_dir: path in (folders if is_dir else files), advice)


def check_staging(staging: Path, what: str, splits: Collection[str]) -> None:
    """Reuse the staging folder only if it holds what the shard stage writes there: split
    folders of shards, their .json records and temporaries, and the manifest."""
    names = "|".join(map(re.escape, splits))
    staged = re.compile(rf"(?:{re.escape(MANIFEST)}|(?:{names})/shard-\d{{6,}}\.tar(?:\.json)?)(?:\.tmp-\d+)?")
    check_owned(
        staging,
        what,
        lambda path, is_dir: path in splits if is_dir else bool(staged.fullmatch(path)),
        "move it away or choose another output",
    )


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the block, or refuse at once if another
    process holds it. The file is created, and removed at the end while still held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:  # a link, a folder: not a lock file this stage made
            raise UsageError(f"{what}: {path} cannot be used as a lock file ({e.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size:
            os.close(fd)
            raise UsageError(f"{what}: {path} is not an empty lock file; move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another shard run holds {path}; wait for it to finish") from None
        # The lock is on the file, not the name: if the last holder removed the file between our
        # open and our flock, we hold a file nobody else will see. Then take the one at the name.
        try:
            if os.path.samestat(info, os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


# --- stopping ----------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after the stage stopped its workers; the message says what is kept."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal handlers live only there


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM stops the process as Ctrl-C does, with a KeyboardInterrupt, so
    the stage cleans up either way (by default SIGTERM kills it and orphans its workers)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block has finished, then act on them: for steps that
    must not stop half done (two renames that swap an output; starting and ending workers)."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])  # now handled as it would have been


def _leave_signals_to_parent() -> None:
    """A pool worker's first step. Ctrl-C reaches every process of the terminal's group, and
    the parent alone decides what it means; SIGTERM, which the parent sends to end a worker,
    ends it (a forked worker inherits the parent's handlers, which would turn it into an
    exception the pool reports and then take the next job)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool that is ended, not waited for, when the block fails or is interrupted:
    leaving a ProcessPoolExecutor's own `with` block waits for every submitted job, so a Ctrl-C
    went on writing shards for most of a minute. Submit the jobs inside `deferred_interrupts()`,
    where the workers start, so none starts with the parent's handlers and a Ctrl-C pending."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_leave_signals_to_parent)
    try:
        yield pool
    except BaseException:
        with deferred_interrupts():  # a second Ctrl-C must not leave workers running
            end_pool(pool)
        raise
    pool.shutdown()


def end_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the jobs not started and end the workers now, mid-job."""
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
        return
    processes = list((pool._processes or {}).values())  # no public way to reach them before 3.14
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()
    # With its workers gone the pool's manager thread ends at once; waiting for it here keeps
    # it from racing the interpreter's exit ("Bad file descriptor" from concurrent.futures).
    pool.shutdown(wait=True, cancel_futures=True)
