"""reports/sweep.json: one record per trial of a sweep, what names a trial, and how records are
ranked.

The tune stage writes the records; evaluate, register and report read them. "Best" means the
same everywhere: the lowest val top-1 error, then, on a tie, the lowest val cross-entropy loss
(`val_rank`). That orders the epochs of a trial (its best epoch and checkpoint), the trials of a
sweep (the best trial), and the versions of the registered model (who holds the alias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict

import resnet
from pipeline import artifacts
from pipeline.artifacts import Artifact, Record
from pipeline.errors import UsageError

METRIC = "val_top1_error"  # what "best" means for checkpoints, trials and models
CHECKPOINT_SCORE = "val_rank_score"  # `val_rank` as the one number Ray Train ranks checkpoints by
TRAINED_STEPS = "trained_steps"  # a run's steps that count so far, as rank 0 marks them (pipeline.tracking.RunWriter)
RESTART_REDONE_STEPS = "restart_redone_steps"  # per restart: steps trained after the checkpoint it resumed from
RESTART_REDONE_S = "restart_redone_s"  # and the seconds they took
STEPS_INTO_EPOCH = "steps_into_epoch"  # in a step checkpoint's report: a report of no epoch, which Tune does not see
SHORTCUT_ORDER = list(resnet.SHORTCUTS)


@dataclass(frozen=True)
class Trial:
    """One point of a sweep's grid, and every name it goes by."""

    arch: str
    depth: int
    shortcut: str

    @property
    def label(self) -> str:
        """For people (console lines, tables, plots, MLflow's run list): the paper's `plain-56`,
        `ResNet-56 A`."""
        return f"plain-{self.depth}" if self.shortcut == "none" else f"ResNet-{self.depth} {self.shortcut}"

    @property
    def key(self) -> str:
        """For files and keys (DVC metrics and plots, MLflow and Ray run names): `plain-56`,
        `resnet-56-A`; letters, digits and dashes."""
        return f"plain-{self.depth}" if self.shortcut == "none" else f"resnet-{self.depth}-{self.shortcut}"

    @property
    def model_name(self) -> str:
        """`resnet.build`'s name of its net (a plain net is built by the same builder)."""
        return resnet.model_name(self.arch, self.depth)

    def run_name(self, sweep: str) -> str:
        """Its MLflow run's and its Ray Train run's name: found again on a retry or a resume."""
        return f"{sweep}-{self.key}"


def val_rank(error: float, loss: float) -> tuple[float, float]:
    """How val results order, best first: the lower top-1 error, then, on a tie, the lower
    cross-entropy loss. A few hundred val images can all be right, and then the error alone
    cannot tell two models apart. A loss that is not a number (a diverged model) ranks last."""
    return error, math.inf if math.isnan(loss) else loss


LOSS_CAP = 100.0  # a mean cross-entropy above this is a diverged model, whatever its error


def val_rank_score(error: float, loss: float) -> float:
    """`val_rank` as one number, lower is better, for what ranks by a single metric: Ray Train
    keeps a run's best checkpoints by one reported value, and by the error alone it keeps the
    latest of equal errors, which need not be the epoch `best_epoch` picks (the lower loss).
    The loss, capped, is scaled below the error's smallest step (one image in a million), so it
    only orders equal errors: the same order as `val_rank` for val sets of up to a million images
    and losses below `LOSS_CAP`."""
    capped = LOSS_CAP if math.isnan(loss) else min(loss, LOSS_CAP)
    return error + capped / LOSS_CAP * 1e-7


class EpochMetrics(Record):
    """One epoch of a run, as its workers report it (to Ray, MLflow and the checkpoint)."""

    # Tune adds its own keys (time, iteration, ...) to the rows it keeps of these.
    model_config = ConfigDict(extra="ignore", strict=False)
    epoch: int
    train_loss: float
    train_top1_error: float
    val_top1_error: float
    val_top5_error: float
    val_loss: float  # the registry's tie-break (pipeline.register)
    lr: float  # at the epoch's end, for the record
    images_per_s: float
    epoch_time_s: float
    world_size: int  # the workers that trained it (an elastic run's may change)
    steps_s: float  # seconds of its training steps that count (not those a restart trained again)
    goodput: float  # the run so far: seconds of steps that count over wall seconds since it started
    redone_steps: int  # the run so far: steps that restarts trained again (their work was lost)

    @property
    def rank(self) -> tuple[float, float]:
        return val_rank(self.val_top1_error, self.val_loss)


def epochs_of(history: list[EpochMetrics]) -> list[EpochMetrics]:
    """A trial's per-epoch results, one per epoch in epoch order: a trial resumed after its last
    epoch reports that epoch again (pipeline.worker), and the later report stands."""
    by_epoch = {row.epoch: row for row in history}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def best_epoch(epochs: list[EpochMetrics]) -> EpochMetrics:
    """The epoch the trial keeps: the best val_rank, the earliest of equals."""
    return min(epochs, key=lambda row: (row.rank, row.epoch))


class Curve(Record):
    epoch: list[int]
    train_top1_error: list[float]
    val_top1_error: list[float]


class TrialRecord(Record):
    """A trial that ran: its results and where its model is."""

    arch: str
    depth: int
    shortcut: str
    num_params: int
    best_val_top1_error: float
    best_val_top5_error: float
    best_val_loss: float
    best_epoch: int
    final_train_top1_error: float
    final_val_top1_error: float
    epochs: int
    planned_epochs: int
    # Fewer epochs than planned in a finished sweep: a scheduler (ASHA) stopped the trial.
    stopped_early: bool
    goodput: float  # of its run, at its last epoch (`EpochMetrics.goodput`)
    redone_steps: int  # steps its restarts trained again
    # pipeline.tune.TrialTimes, best effort: None where its store did not take them.
    wall_time_s: float | None
    overhead_s: float | None
    curve: Curve
    checkpoint: str
    mlflow_run_id: str

    @property
    def trial(self) -> Trial:
        return Trial(self.arch, self.depth, self.shortcut)

    @property
    def rank(self) -> tuple[float, float]:
        return val_rank(self.best_val_top1_error, self.best_val_loss)


class FailedTrial(Record):
    """A trial that failed: its one-line cause, and the file that holds its whole traceback."""

    arch: str
    depth: int
    shortcut: str
    error: str
    error_file: str | None

    @property
    def trial(self) -> Trial:
        return Trial(self.arch, self.depth, self.shortcut)


class Sweep(Artifact):
    """reports/sweep.json: the sweep's name, its MLflow parent run, a record per trial."""

    SCHEMA: ClassVar[int] = 3  # 1: a bare list of records; 2: no goodput
    STAGE: ClassVar[str] = "tune"
    FILE: ClassVar[str] = "sweep.json"  # in paths.reports
    name: str
    mlflow_run_id: str
    trials: list[TrialRecord | FailedTrial]

    @property
    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if isinstance(t, TrialRecord)]

    @property
    def failed(self) -> list[FailedTrial]:
        return [t for t in self.trials if isinstance(t, FailedTrial)]

    def best_trial(self) -> TrialRecord:
        if not self.finished:
            raise UsageError("the sweep has no finished trial")
        return min(self.finished, key=lambda t: t.rank)


class RunFacts(Record):
    """What a trial's record takes from its MLflow run and the sweep's driver."""

    num_params: int
    wall_time_s: float | None
    overhead_s: float | None
    checkpoint: str
    mlflow_run_id: str


def trial_record(trial: Trial, history: list[EpochMetrics], planned_epochs: int, run: RunFacts) -> TrialRecord:
    """One finished trial's record, from its per-epoch results and its run."""
    epochs = epochs_of(history)
    best = best_epoch(epochs)
    return TrialRecord(
        arch=trial.arch,
        depth=trial.depth,
        shortcut=trial.shortcut,
        best_val_top1_error=best.val_top1_error,
        best_val_top5_error=best.val_top5_error,
        best_val_loss=best.val_loss,
        best_epoch=best.epoch,
        final_train_top1_error=epochs[-1].train_top1_error,
        final_val_top1_error=epochs[-1].val_top1_error,
        epochs=epochs[-1].epoch + 1,
        planned_epochs=planned_epochs,
        stopped_early=epochs[-1].epoch + 1 < planned_epochs,
        goodput=epochs[-1].goodput,
        redone_steps=epochs[-1].redone_steps,
        curve=Curve(
            epoch=[row.epoch for row in epochs],
            train_top1_error=[row.train_top1_error for row in epochs],
            val_top1_error=[row.val_top1_error for row in epochs],
        ),
        **run.model_dump(),
    )


def in_sweep_order(records: list[TrialRecord | FailedTrial]) -> list[TrialRecord | FailedTrial]:
    """By depth, then plain before options A, B, C."""
    return sorted(records, key=lambda r: (r.depth, SHORTCUT_ORDER.index(r.shortcut)))


TABLE_COLUMNS = (
    "trial", "params", "best val top-1", "final train top-1", "final val top-1", "epochs", "wall",
    "overhead", "goodput", "redone steps",
)  # fmt: skip


def table_row(trial: TrialRecord | FailedTrial) -> list[str]:
    """A trial's cells under TABLE_COLUMNS, in the sweep's tables (the tune stage's console, the
    report's results.md); a failed trial's are empty past "failed"."""
    if isinstance(trial, FailedTrial):
        return [trial.trial.label, "failed", *[""] * (len(TABLE_COLUMNS) - 2)]
    return [
        trial.trial.label,
        f"{trial.num_params:,}",
        f"{trial.best_val_top1_error:.2%}",
        f"{trial.final_train_top1_error:.2%}",
        f"{trial.final_val_top1_error:.2%}",
        f"{trial.epochs}{' (stopped early)' if trial.stopped_early else ''}",
        seconds(trial.wall_time_s),
        seconds(trial.overhead_s),
        f"{trial.goodput:.0%}",
        str(trial.redone_steps),
    ]


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} s"


def sweep_finished(trial_epochs: list[int | None], grid_size: int, planned_epochs: int, early_stopping: bool) -> bool:
    """Whether every trial of the grid exists and ran to its end. `trial_epochs`: each trial's
    epochs done, None for a trial that failed (it is over). A scheduler that stops trials early
    (ASHA) ends some before `planned_epochs`; without one, a short trial was interrupted."""
    if len(trial_epochs) < grid_size:
        return False
    return early_stopping or all(epochs is None or epochs >= planned_epochs for epochs in trial_epochs)


def read_sweep(reports: str) -> Sweep:
    return artifacts.read(str(Path(reports) / Sweep.FILE), Sweep)
