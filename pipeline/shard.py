"""Stage `shard`: a raw data set -> WebDataset tar shards + manifest.json.

    python -m pipeline.shard [--params params.yaml] [--set shard.workers=4] ...

Three splits, `${paths.shards}/{train,val,test}/shard-%06d.tar`: val chooses (epochs, trials, the
champion), test is only reported; `sources` says where each comes from, per data set.

Every file under a split's folders is accounted for (`sources` walks them): a sample, a
`rejected` entry naming the file and the reason, or a `skipped` hidden file. Every image is
checked by content, the cheap checks first (file size, then the header's pixel count and sides):
an RGB baseline JPEG passes through byte for byte; CMYK, greyscale, progressive and other
non-baseline JPEGs, 16-bit images and other formats (a PNG named .JPEG) are re-encoded as RGB
JPEG and listed in `converted`; whatever fails to read or decode, for any reason, is rejected.
The stage fails when a split's rejects exceed `shard.max_reject_fraction`.

Shards are written by `shard.workers` processes into `<paths.shards>.partial/`, each under a
temporary name, fsync'd and renamed when complete, with a small record of what went into it, so
a rerun after an interruption (Ctrl-C stops the stage at once, exit 130) keeps the finished
shards whose size and sha256 still match their record and writes the rest. The manifest is
written last, then the whole folder replaces `paths.shards`: a shard folder without a manifest
is never complete, and a failed run leaves the previous output as it was. The output is
replaced only when it is absent, empty or this stage's own previous output (`outputs`), a lock
keeps a second run out, and a link is written through.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Iterable
from concurrent.futures import as_completed
from dataclasses import astuple, dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pipeline import artifacts, cli, files, outputs, sources
from pipeline.errors import UsageError
from pipeline.images import MAX_PIXELS, Conversion, Prepared, Rejected, to_rgb_jpeg
from pipeline.manifest import MANIFEST, SCHEMA, Converted, ImageSize, Manifest, ManifestShard, ManifestSplit, Noted
from pipeline.params import Params
from pipeline.params import Shard as ShardParams
from pipeline.tars import MAX_MEMBER_BYTES


def size_range(sizes: list[tuple[int, int]]) -> ImageSize | None:
    """The image sizes of some samples, as the manifest records them per split (the trainer
    checks them against the arch): None for no samples."""
    if not sizes:
        return None
    return ImageSize(
        min_side=min(min(size) for size in sizes),
        max_side=max(max(size) for size in sizes),
        uniform=list(sizes[0]) if all(size == sizes[0] for size in sizes) else None,
    )


def merge_size_ranges(ranges: list[ImageSize | None]) -> ImageSize | None:
    ranges = [r for r in ranges if r is not None]
    if not ranges:
        return None
    uniform = ranges[0].uniform
    return ImageSize(
        min_side=min(r.min_side for r in ranges),
        max_side=max(r.max_side for r in ranges),
        uniform=uniform if uniform is not None and all(r.uniform == uniform for r in ranges) else None,
    )


class ShardResult(ManifestShard):
    """A written shard: its manifest entry, and what the manifest sums up over shards."""

    rejected: list[Noted]
    converted: list[Converted]
    channel_mean_sums: list[float]
    image_size: ImageSize | None

    def entry(self) -> ManifestShard:
        return ManifestShard(name=self.name, num_samples=self.num_samples, bytes=self.bytes, sha256=self.sha256)


def prepare(record: sources.Record, conversion: Conversion) -> Prepared:
    """One input record as a sample, its size checked before it is read."""
    size = record.size()
    if size > conversion.max_bytes:
        raise Rejected(f"{size} bytes, over shard.max_bytes {conversion.max_bytes}")
    try:
        data = record.read()
    except OSError as e:  # unreadable file: permissions, I/O error, gone since it was listed
        raise Rejected(f"cannot read: {e.strerror or e}") from None
    return to_rgb_jpeg(data, conversion)


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    records: tuple[sources.Record, ...]
    conversion: Conversion
    root: str | None  # data.root: samples record their source relative to it

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    def fingerprint(self) -> str:
        """What the shard is made of, so a rerun can tell a finished shard it may keep."""
        h = hashlib.sha256(json.dumps([SCHEMA, self.name, astuple(self.conversion), self.root]).encode())
        for r in self.records:
            h.update(json.dumps([r.key, r.label, r.source, r.size()]).encode())
        return h.hexdigest()

    def source_of(self, record: sources.Record) -> str:
        """Where a sample came from, as a person finds it: relative to data.root for files."""
        return os.path.relpath(record.source, self.root) if self.root and record.data is None else record.source


def plan(records: list[sources.Record], maxcount: int, maxsize: float) -> list[list[sources.Record]]:
    """Consecutive groups of at most maxcount records and (by input size) maxsize bytes."""
    groups: list[list[sources.Record]] = [[]]
    size = 0
    for r in records:
        record_size = r.size()  # a stat per file: once
        if groups[-1] and (len(groups[-1]) >= maxcount or size + record_size > maxsize):
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += record_size
    return [g for g in groups if g]


def shuffled(records: list[sources.Record], seed: int) -> list[sources.Record]:
    out = list(records)
    random.Random(seed).shuffle(out)
    return out


def kept_shard(path: Path, record_path: Path, fingerprint: str) -> ShardResult | None:
    """The result of a shard an interrupted run finished, or None. It is kept only if its record
    says it was made of these inputs and the file is still the one recorded, size and sha256: a
    torn or edited file, or a record of another plan, means writing the shard again."""
    try:
        done = json.loads(record_path.read_text())
        kept = ShardResult.model_validate(done["result"])
        if done["fingerprint"] == fingerprint and path.stat().st_size == kept.bytes and files.sha256_of(path) == kept.sha256:
            return kept
    except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        pass  # no shard, no record, or a record that is not one: write the shard
    return None


def write_shard(job: ShardJob, staging: Path) -> ShardResult:
    """Write one shard (or keep it from an interrupted run); returns its manifest entry plus
    its `rejected` and `converted` lists."""
    path = staging / job.name
    record_path = path.with_name(path.name + ".json")
    fingerprint = job.fingerprint()
    kept = kept_shard(path, record_path, fingerprint)
    if kept:
        return kept

    rejected, converted = [], []
    mean_sums, sizes, num_samples = [0.0, 0.0, 0.0], [], 0
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as stream, wds.TarWriter(stream, user="", group="", mtime=0, encoder=False) as tar:
        for r in job.records:
            try:
                prepared = prepare(r, job.conversion)
            except Rejected as e:
                rejected.append(Noted(source=r.source, reason=str(e)))
                continue
            if prepared.converted_from:
                converted.append(Converted(source=r.source, **{"from": prepared.converted_from}))
            # The key is made safe for WebDataset; `.source` keeps the original name.
            tar.write(
                {
                    "__key__": r.key,
                    "jpg": prepared.jpeg,
                    "cls": str(r.label).encode(),
                    "source": job.source_of(r).encode(),
                }
            )
            mean_sums = [a + b for a, b in zip(mean_sums, prepared.channel_means)]
            sizes.append(prepared.size)
            num_samples += 1
    # The data reaches the disk before the final name does: after a crash, a shard under its
    # final name is whole. Its record comes last (write_json_atomic flushes it and the folder).
    files.fsync_file(tmp)
    os.replace(tmp, path)
    result = ShardResult(
        name=job.name,
        num_samples=num_samples,
        bytes=path.stat().st_size,
        sha256=files.sha256_of(path),
        rejected=rejected,
        converted=converted,
        channel_mean_sums=mean_sums,
        image_size=size_range(sizes),
    )
    files.write_json_atomic(record_path, {"fingerprint": fingerprint, "result": result.model_dump(mode="json", by_alias=True)})
    return result


def check_limits(shard: ShardParams) -> None:
    """Every sample the stage writes must be one the loader will read: its decoder refuses
    images over MAX_PIXELS and its tar reader members over MAX_MEMBER_BYTES."""
    if shard.max_pixels > MAX_PIXELS:
        raise UsageError(f"shard.max_pixels: {shard.max_pixels} is over the decoder's limit of {MAX_PIXELS}")
    if shard.max_bytes > MAX_MEMBER_BYTES:
        raise UsageError(f"shard.max_bytes: {shard.max_bytes} is over the tar reader's limit of {MAX_MEMBER_BYTES}")


def build_jobs(dataset: sources.Dataset, params: Params) -> list[ShardJob]:
    check_limits(params.shard)
    jobs = []
    for split in sources.SPLITS:
        records = dataset.splits[split]
        if split == "train":  # every train shard should mix classes
            records = shuffled(records, params.data.seed)
        for index, group in enumerate(plan(records, params.shard.maxcount, params.shard.maxsize)):
            jobs.append(ShardJob(split, index, tuple(group), Conversion.of(params.shard), params.data.root))
    return jobs


def run_jobs(jobs: list[ShardJob], staging: Path, workers: int) -> dict[str, ShardResult]:
    """Write every shard with a pool of processes, a progress bar over samples.

    Ctrl-C or SIGTERM (see `shard`) stops it at once: the shards not started are cancelled and
    the workers ended mid-shard; their temporaries are removed, and `outputs.Interrupted` says
    how many finished shards a rerun will keep. A failing shard ends the pool the same way."""
    for split in {job.split for job in jobs}:
        (staging / split).mkdir(parents=True, exist_ok=True)
    results: dict[str, ShardResult] = {}
    total = sum(len(job.records) for job in jobs)
    try:
        with tqdm(total=total, unit="img", desc="shard", mininterval=1.0) as bar:
            if workers == 1:
                for job in jobs:
                    results[job.name] = write_shard(job, staging)
                    bar.update(len(job.records))
            else:
                with outputs.worker_pool(workers) as pool:
                    with outputs.deferred_interrupts():  # the workers start here
                        futures = {pool.submit(write_shard, job, staging): job for job in jobs}
                    for future in as_completed(futures):
                        job = futures[future]
                        results[job.name] = future.result()
                        bar.update(len(job.records))
    except KeyboardInterrupt:
        remove_stale(staging, jobs)
        kept = sum(1 for job in jobs if (staging / f"{job.name}.json").is_file())
        raise outputs.Interrupted(f"rerun to resume: {kept} of {len(jobs)} shards kept in {staging}") from None
    return results


def manifest(dataset: sources.Dataset, jobs: list[ShardJob], results: dict[str, ShardResult]) -> Manifest:
    splits = {}
    for split in sources.SPLITS:
        entries = [results[job.name] for job in jobs if job.split == split]
        splits[split] = ManifestSplit(
            num_samples=sum(e.num_samples for e in entries),
            shards=[e.entry() for e in entries],
            # What the walk over the files refused (symlinks out of the root, pipes, ...) comes
            # first, then what could not be read or decoded.
            rejected=[Noted(**r) for r in dataset.rejected.get(split, [])] + [r for e in entries for r in e.rejected],
            converted=[c for e in entries for c in e.converted],
            skipped=[Noted(**r) for r in dataset.skipped.get(split, [])],
            image_size=merge_size_ranges([e.image_size for e in entries]),
        )
    train = [results[job.name] for job in jobs if job.split == "train"]
    num_images = sum(e.num_samples for e in train)
    sums = [sum(e.channel_mean_sums[c] for e in train) for c in range(3)]
    # The paper subtracts the training set's mean; this is its per-channel form, in [0, 1]
    # units, with every image weighing the same whatever its size or format.
    mean = [round(s / num_images / 255, 6) for s in sums] if num_images else [0.0, 0.0, 0.0]
    notes = {"class_names": dataset.class_names} if dataset.class_names else {}
    return Manifest(source=dataset.source, classes=dataset.classes, mean=mean, splits=splits, **notes, **dataset.notes)


def check_rejects(manifest_: Manifest, max_fraction: float) -> None:
    for split, info in manifest_.splits.items():
        seen = info.num_samples + len(info.rejected)
        if seen == 0:
            raise UsageError(f"{split}: the data set has no {split} images")
        fraction = len(info.rejected) / seen
        if fraction > max_fraction:
            first = info.rejected[0]
            raise UsageError(
                f"{split}: {len(info.rejected)} of {seen} inputs rejected ({fraction:.2%} > "
                f"shard.max_reject_fraction {max_fraction:.2%}); first: {first.source}: {first.reason}"
            )


def publish(staging: Path, out: Path) -> None:
    """Replace `out` by the finished staging folder (the old output stays until then). `out`
    was checked when the run began; it is checked again, as files may have arrived since."""
    outputs.check_previous_output(out, "paths.shards")
    for record in staging.glob("*/*.tar.json"):
        record.unlink()
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    with outputs.deferred_interrupts():  # a Ctrl-C between the renames would leave no output
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
        files.fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(staging: Path, jobs: Iterable[ShardJob]) -> None:
    """Drop what an interrupted run left that a rerun cannot keep: temporaries, a shard without
    its record or a record without its shard (a worker ended between the two), and shards of
    an earlier plan. Nothing else is there to drop: `outputs.check_staging` made sure."""
    wanted = {job.name for job in jobs}
    for path in staging.glob("*/*"):
        name = f"{path.parent.name}/{path.name.removesuffix('.json')}"
        other_half = path.with_name(path.name.removesuffix(".json") if path.suffix == ".json" else f"{path.name}.json")
        if ".tmp-" in path.name or name not in wanted or not other_half.is_file():
            path.unlink()


def shard(params: Params) -> Manifest:
    """The stage. It replaces `paths.shards` (through a link, where it points) and works in
    `<paths.shards>.partial` beside it, under the lock `<paths.shards>.lock`, and refuses both
    folders unless they hold nothing but what it writes. Ctrl-C or SIGTERM: exit code 130."""
    out = outputs.resolve(params.paths.shards, "paths.shards")
    outputs.check_apart(out, params.data.root, "paths.shards", "data.root")
    staging = out.with_name(f"{out.name}.partial")
    try:
        with outputs.sigterm_as_interrupt(), outputs.locked(out.with_name(f"{out.name}.lock"), "paths.shards"):
            outputs.check_previous_output(out, "paths.shards")
            outputs.check_staging(staging, "paths.shards", sources.SPLITS)
            dataset = sources.load(params.data)
            jobs = build_jobs(dataset, params)
            staging.mkdir(parents=True, exist_ok=True)
            remove_stale(staging, jobs)
            results = run_jobs(jobs, staging, params.shard.workers)
            result = manifest(dataset, jobs, results)
            check_rejects(result, params.shard.max_reject_fraction)
            artifacts.write(staging / MANIFEST, result)
            publish(staging, out)
    except KeyboardInterrupt as e:
        # One line and the shell's code for Ctrl-C (128 + SIGINT), not a traceback per process.
        print(f"interrupted; {e}" if isinstance(e, outputs.Interrupted) else "interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return result


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("shard", "Shard a raw data set into WebDataset tars.", argv)
    result = shard(params)
    for split, info in result.splits.items():
        print(
            f"{split}: {info.num_samples} samples in {len(info.shards)} shards, "
            f"{len(info.rejected)} rejected, {len(info.converted)} converted"
        )
    print(f"wrote {Path(params.paths.shards) / MANIFEST}")


if __name__ == "__main__":
    cli.run(main)
