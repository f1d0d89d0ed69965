"""What many test modules share: params whose outputs stay in a test's folder, and the shards
read back (the stages themselves run through conftest's `run_stage` fixture)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import webdataset as wds

from pipeline import loader, records, sources, transforms
from pipeline import params as params_module
from pipeline.images import Conversion
from pipeline.tars import tar_samples
from tests.conftest import REPO

# Small limits, so that the tests' small images cross them.
CONVERSION = Conversion(quality=95, max_side=None, min_side=8, max_pixels=10_000, max_bytes=100_000)


def tmp_paths(root: Path, shards: Path | None = None) -> list[str]:
    """Overrides that keep a test's outputs under `root`: every path of params.yaml and the
    MLflow store (shards at `shards` when given: a module's shared shards)."""
    return [
        f"paths.shards={shards or root / 'shards'}",
        f"paths.ray_storage={root / 'ray'}",
        f"paths.reports={root / 'reports'}",
        f"paths.metrics={root / 'metrics'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ]


def make_params(tmp_path: Path, *overrides: str) -> params_module.Params:
    """params.yaml with its outputs under tmp_path, and `overrides`."""
    return params_module.load(REPO / "params.yaml", [*tmp_paths(tmp_path), *overrides])


def imagenet_params(tmp_path: Path, root: Path, *overrides: str):
    # The tiny trees reject 2 of ~18 train files on purpose, and have 6 files a train class: val
    # holds out 1 of them.
    return make_params(
        tmp_path,
        "data.source=imagenet",
        f"data.root={root}",
        "data.val_per_class=1",
        "shard.maxcount=4",
        "shard.max_reject_fraction=0.2",
        *overrides,
    )


def imagenet_source(root: Path) -> sources.Dataset:
    return sources.imagenet(root, seed=0, val_per_class=1)


def read_shards(shards: Path, split: str) -> dict[str, tuple[int, bytes]]:
    """{key: (label, jpeg bytes)} of a split, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((shards / split).glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return {key: (int(s["cls"]), s["jpg"]) for key, s in samples.items()}


def attempts(n: int) -> list:
    """The ids 0..n-1 for running a concurrent case n times, since a race shows only sometimes:
    the first runs in `make test-fast`, all n in `make test` (the rest are marked slow)."""
    return [pytest.param(i, marks=[pytest.mark.slow] if i else []) for i in range(n)]


def digits_loader(shards: Path | str, epoch: int = 0, train: bool = True, **kw) -> loader.Batches:
    """Digit shards' train (or val) batches, as a training run makes them."""
    kw = {"batch_size": 32, "num_workers": 2, "seed": 0, **kw}
    transform = transforms.train_transform("cifar", flip=False) if train else transforms.eval_transform("cifar")
    return loader.make_loader(str(shards), "train" if train else "val", transform, epoch=epoch, train=train, **kw)


@dataclass(frozen=True)
class Logged:
    """A line of a rank's batch log (`loader.Batches`): a batch taken, or an epoch's start (digest None)."""

    time: float
    attempt: str
    rank: int
    epoch: int
    step: int
    digest: str | None
    keys: tuple[str, ...]


def batch_log(folder: Path) -> list[Logged]:
    """Every rank's batch log in `folder` (rank-<r>.txt), in the order the lines were written."""
    logged = []
    for path in folder.glob("rank-*.txt"):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            time, attempt, epoch, *rest = line.split(" ")
            start = rest[0] == "start"
            step, digest, keys = (rest[1], None, "") if start else rest
            logged.append(
                Logged(float(time), attempt, rank, int(epoch), int(step), digest, tuple(filter(None, keys.split(","))))
            )
    return sorted(logged, key=lambda entry: entry.time)


def steps_that_count(logged: list[Logged]) -> list[Logged]:
    """The batches a run's result was trained on: an attempt that starts from a checkpoint at
    (epoch, step) undoes every batch earlier attempts took after it (their work is lost)."""
    attempts = sorted({entry.attempt for entry in logged}, key=float)
    kept: list[Logged] = []
    for attempt in attempts:
        mine = [entry for entry in logged if entry.attempt == attempt]
        resumed_at = min((entry.epoch, entry.step) for entry in mine if entry.digest is None)
        kept = [entry for entry in kept if (entry.epoch, entry.step) <= resumed_at]
        kept += [entry for entry in mine if entry.digest is not None]
    return kept


def shard_samples(url: str) -> list[tuple[str, bytes, bytes]]:
    """(key, jpg, cls) of every sample of one shard, read by the loader's tar reader."""
    return [(s["__key__"], s["jpg"], s["cls"]) for s in wds.DataPipeline(wds.SimpleShardList([url]), tar_samples)]


# num_params as the options make them: A (zero-padding identity) adds nothing to plain, B adds
# projections where dimensions grow, C projections on every shortcut.
EXTRA_PARAMS = {"none": 0, "A": 0, "B": 500, "C": 4000}


def finished_trial(
    depth: int, shortcut: str, train: float, val: float, num_params: int | None = None, **fields
) -> records.TrialRecord:
    """One finished trial of reports/sweep.json (pipeline.records.trial_record), its curve ending at
    (train, val) after 4 epochs."""
    return records.TrialRecord(
        arch="cifar",
        depth=depth,
        shortcut=shortcut,
        num_params=1000 * depth + EXTRA_PARAMS[shortcut] if num_params is None else num_params,
        best_val_top1_error=val,
        best_val_top5_error=val / 4,
        best_val_loss=0.1,
        best_epoch=3,
        final_train_top1_error=train,
        final_val_top1_error=val,
        epochs=4,
        planned_epochs=4,
        stopped_early=False,
        goodput=0.5,
        redone_steps=0,
        wall_time_s=12.0,
        overhead_s=3.0,
        curve=records.Curve(
            epoch=[0, 1, 2, 3],
            train_top1_error=[0.9, 0.5, (0.5 + train) / 2, train],
            val_top1_error=[0.9, 0.6, (0.6 + val) / 2, val],
        ),
        checkpoint=f"file:///ckpt/{depth}-{shortcut}",
        mlflow_run_id=f"run-{depth}-{shortcut}",
    ).model_copy(update=fields)


def failed_trial(depth: int, shortcut: str) -> records.FailedTrial:
    return records.FailedTrial(
        arch="cifar", depth=depth, shortcut=shortcut, error="RayTaskError: worker died",
        error_file=f"/ray/sweep/trial-{depth}-{shortcut}/error.txt",
    )  # fmt: skip


def sweep_of(trials: list, mlflow_run_id: str = "sweep-run") -> records.Sweep:
    return records.Sweep(name="sweep-test", mlflow_run_id=mlflow_run_id, trials=trials)
