"""The shard stage owns its output: it replaces only a folder that is absent, empty or its own
previous output, writes through links, holds a lock, and on Ctrl-C stops at once leaving only
complete shards, which a rerun checks before it keeps them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import shard, sources
from pipeline.errors import UsageError
from tests.conftest import REPO
from tests.data_trees import imagefolder_tree
from tests.helpers import make_params, read_shards


def tree(tmp_path: Path, per_class: int = 3) -> Path:
    root = tmp_path / "raw"
    imagefolder_tree(root, per_class=per_class)
    return root


def params_for(tmp_path: Path, root: Path, out: Path, *overrides: str):
    # The tree has no test/: its val/ is the test split and val is 1 image a class of train/.
    return make_params(
        tmp_path,
        "data.source=imagefolder",
        f"data.root={root}",
        "data.val_per_class=1",
        f"paths.shards={out}",
        "shard.maxcount=2",
        *overrides,
    )


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_folder_with_other_files_is_refused_and_left_untouched(tmp_path, run_stage):
    data = tmp_path / "data"
    precious = data / "imagenet" / "train" / "n01440764_1.JPEG"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"\xff\xd8 someone's data set")

    result = run_stage("shard", "--set", f"paths.shards={data}", "--set", f"paths.metrics={tmp_path / 'metrics'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: paths.shards: {data} holds files the shard stage did not write (e.g. {data / 'imagenet'}); "
        "choose an empty or new folder"
    )
    assert listing(data) == {"imagenet/train/n01440764_1.JPEG": b"\xff\xd8 someone's data set"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder, no lock left


def test_a_rerun_replaces_its_own_output_but_not_a_file_someone_added(tmp_path):
    root, out = tree(tmp_path), tmp_path / "shards"
    first = shard.shard(params_for(tmp_path, root, out))
    (out / "train" / "shard-000000.tar").write_bytes(b"damaged")  # still its own: replaced
    assert shard.shard(params_for(tmp_path, root, out)) == first
    assert sha256(out / "train" / "shard-000000.tar") == first.splits["train"].shards[0].sha256

    (out / "val" / "notes.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(
        UsageError, match=re.escape(f"{out} holds files the shard stage did not write (e.g. {out}/val/notes.txt)")
    ):
        shard.shard(params_for(tmp_path, root, out))
    assert listing(out) == before


def test_a_staging_folder_with_other_files_is_refused(tmp_path):
    root, out = tree(tmp_path), tmp_path / "shards"
    notes = tmp_path / "shards.partial" / "train" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    with pytest.raises(UsageError, match=r"shards\.partial holds files the shard stage did not write"):
        shard.shard(params_for(tmp_path, root, out))
    assert notes.read_text() == "mine"
    assert not out.exists()


def test_a_link_stays_a_link_and_the_shards_land_where_it_points(tmp_path):
    root = tree(tmp_path)
    target = tmp_path / "other_disk" / "shards"
    target.mkdir(parents=True)
    link = tmp_path / "shards"
    link.symlink_to(target)

    for _ in range(2):  # the first run fills an empty folder, the second replaces its output
        result = shard.shard(params_for(tmp_path, root, link))
        assert link.is_symlink() and link.resolve() == target
        assert json.loads((target / "manifest.json").read_text()) == result.model_dump(mode="json", by_alias=True)
        assert len(read_shards(target, "train")) == 4  # 3 images a class, 1 held out as val
        assert sorted(p.name for p in tmp_path.iterdir()) == ["other_disk", "raw", "shards"]
        assert sorted(p.name for p in target.parent.iterdir()) == ["shards"]  # no staging, lock or old copy left


def test_an_output_inside_the_input_and_an_input_inside_the_output_are_refused(tmp_path):
    root = tree(tmp_path)
    before = listing(root)
    with pytest.raises(UsageError, match=re.escape(f"paths.shards: {root / 'shards'} is inside data.root {root}")):
        shard.shard(params_for(tmp_path, root, root / "shards"))
    with pytest.raises(UsageError, match=re.escape(f"data.root: {root} is inside paths.shards {tmp_path}")):
        shard.shard(params_for(tmp_path, root, tmp_path))
    assert listing(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_second_run_on_one_output_is_refused_while_the_first_holds_the_lock(tmp_path):
    root, out = tree(tmp_path), tmp_path / "shards"
    lock = tmp_path / "shards.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running shard stage holds it
        with pytest.raises(UsageError, match=f"another shard run holds {lock}"):
            shard.shard(params_for(tmp_path, root, out))
        assert not out.exists() and not (tmp_path / "shards.partial").exists()
    shard.shard(params_for(tmp_path, root, out))
    assert not lock.exists()  # removed by the run that held it last


def test_a_torn_or_altered_shard_left_by_an_interrupted_run_is_written_again(tmp_path):
    root = tree(tmp_path)
    reference = shard.shard(params_for(tmp_path, root, tmp_path / "reference"))

    out = tmp_path / "shards"
    params = params_for(tmp_path, root, out)
    staging = tmp_path / "shards.partial"
    jobs = shard.build_jobs(sources.load(params.data), params)
    for job in jobs[:2]:  # two shards finished before the crash ...
        (staging / job.split).mkdir(parents=True, exist_ok=True)
        shard.write_shard(job, staging)
    torn, altered = (staging / job.name for job in jobs[:2])
    torn.write_bytes(torn.read_bytes()[:1000])  # ... one cut short, the other one byte changed
    data = bytearray(altered.read_bytes())
    data[700] ^= 0xFF
    altered.write_bytes(bytes(data))

    assert shard.shard(params) == reference
    for entry in (s for split in reference.splits.values() for s in split.shards):
        assert sha256(out / entry.name) == entry.sha256


# The shard stage with every shard slowed down, so that the run would take about 20 s:
# a large data set, without the test having to make one.
SLOW_SHARD = """
import functools, sys, time
from pipeline import cli, shard

write_shard = shard.write_shard

@functools.wraps(write_shard)  # the same name, so the pool's workers find it
def slow_write_shard(*args):
    time.sleep(0.5)
    return write_shard(*args)

shard.write_shard = slow_write_shard
cli.run(shard.main)
"""


# Ctrl-C in a terminal sends SIGINT to the whole process group, the workers included; a
# process manager sends SIGTERM to the stage alone.
INTERRUPTS = {
    "ctrl_c": lambda process: os.killpg(process.pid, signal.SIGINT),
    "sigterm": lambda process: os.kill(process.pid, signal.SIGTERM),
}


def interrupt_and_check(
    process: subprocess.Popen, staging: Path, interrupt: Callable[[subprocess.Popen], None]
) -> None:
    """Interrupt the stage once a first shard is done; check it stopped at once and left only whole shards."""
    deadline = time.monotonic() + 60
    while not list(staging.glob("*/*.tar.json")):  # a first shard finished
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    before = set(staging.glob("*/*.tar"))

    interrupt(process)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5, stderr
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    with pytest.raises(ProcessLookupError):  # no worker outlived the stage
        os.killpg(process.pid, 0)

    # At most the shards in flight when the signal came were finished; none started after.
    kept = set(staging.glob("*/*.tar"))
    assert 1 <= len(kept) <= len(before) + 2 < 80
    last = stderr.strip().splitlines()[-1]
    assert last == f"interrupted; rerun to resume: {len(kept)} of 80 shards kept in {staging}"
    time.sleep(1)
    assert set(staging.glob("*/*.tar")) == kept
    # Every shard there is whole, as its record says; nothing else is left.
    for path in kept:
        record = json.loads(path.with_name(path.name + ".json").read_text())["result"]
        assert (path.stat().st_size, sha256(path)) == (record["bytes"], record["sha256"])
    assert {p for p in staging.glob("*/*") if p.is_file()} == kept | {p.with_name(p.name + ".json") for p in kept}


@pytest.mark.parametrize("interrupt", INTERRUPTS)
def test_an_interrupt_stops_at_once_leaves_complete_shards_and_a_rerun_resumes(tmp_path, interrupt):
    root, out = tree(tmp_path, per_class=20), tmp_path / "shards"  # 80 images, 80 shards of 1
    overrides = [
        "data.source=imagefolder",
        f"data.root={root}",
        "data.val_per_class=1",
        f"paths.shards={out}",
        "shard.maxcount=1",
        "shard.workers=2",
    ]
    command = [sys.executable, "-c", SLOW_SHARD, "--params", str(REPO / "params.yaml")]
    command += [a for o in overrides for a in ("--set", o)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
    )
    try:
        interrupt_and_check(process, tmp_path / "shards.partial", INTERRUPTS[interrupt])
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever a failed check left running
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    staging = tmp_path / "shards.partial"
    kept = {path.relative_to(staging): path.stat().st_ino for path in staging.glob("*/*.tar")}
    resumed = shard.shard(make_params(tmp_path, *overrides))
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # kept, not written again
    reference = [
        o if not o.startswith("paths.shards=") else f"paths.shards={tmp_path / 'reference'}" for o in overrides
    ]
    assert resumed == shard.shard(make_params(tmp_path, *reference))
