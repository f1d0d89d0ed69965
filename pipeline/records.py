"""reports/sweep.json: one record per trial of a sweep, and how records are ranked.

The tune stage writes the records; evaluate, register and report read them. "Best" means the
same everywhere: the lowest val top-1 error, then, on a tie, the lowest val cross-entropy loss
(`val_rank`). That orders the epochs of a trial (its best epoch and checkpoint), the trials of a
sweep (the best trial), and the versions of the registered model (who holds the alias).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import resnet
from pipeline.errors import UsageError

METRIC = "val_top1_error"  # what "best" means for checkpoints, trials and models
CHECKPOINT_SCORE = "val_rank_score"  # `val_rank` as the one number Ray Train ranks checkpoints by
SWEEP_FILE = "sweep.json"
SHORTCUT_ORDER = list(resnet.SHORTCUTS)


def val_rank(error: float, loss: float | None) -> tuple[float, float]:
    """How val results order, best first: the lower top-1 error, then, on a tie, the lower
    cross-entropy loss. A few hundred val images can all be right, and then the error alone
    cannot tell two models apart. A loss not recorded (runs from before it was) ranks last."""
    return error, math.inf if loss is None or math.isnan(loss) else loss


LOSS_CAP = 100.0  # a mean cross-entropy above this is a diverged model, whatever its error


def val_rank_score(error: float, loss: float | None) -> float:
    """`val_rank` as one number, lower is better, for what ranks by a single metric: Ray Train
    keeps a run's best checkpoints by one reported value, and by the error alone it keeps the
    latest of equal errors, which need not be the epoch `best_epoch` picks (the lower loss).
    The loss, capped, is scaled below the error's smallest step (one image in a million), so it
    only orders equal errors: the same order as `val_rank` for val sets of up to a million images
    and losses below `LOSS_CAP`."""
    capped = LOSS_CAP if loss is None or math.isnan(loss) else min(loss, LOSS_CAP)
    return error + capped / LOSS_CAP * 1e-7


def epochs_of(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's per-epoch results, one per epoch in epoch order: a trial resumed after its last
    epoch reports that epoch again (pipeline.worker), and the later report stands."""
    by_epoch = {int(row["epoch"]): row for row in history if row.get(METRIC) is not None}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def best_epoch(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch the trial keeps: the best val_rank, the earliest of equals."""
    return min(epochs, key=lambda row: (val_rank(row[METRIC], row.get("val_loss")), row["epoch"]))


def trial_record(
    depth: int, shortcut: str, history: list[dict[str, Any]], planned_epochs: int, run: dict[str, Any]
) -> dict[str, Any]:
    """One finished trial's record, from its per-epoch results and its MLflow run (`run`:
    num_params, wall_time_s, overhead_s, checkpoint, mlflow_run_id; the two times: pipeline.tune.TrialTimes)."""
    epochs = epochs_of(history)
    best = best_epoch(epochs)
    loss = best.get("val_loss")
    return {
        "depth": depth,
        "shortcut": shortcut,
        "num_params": run["num_params"],
        "best_val_top1_error": float(best[METRIC]),
        "best_val_top5_error": float(best["val_top5_error"]),
        "best_val_loss": None if loss is None or math.isnan(loss) else float(loss),
        "best_epoch": int(best["epoch"]),
        "final_train_top1_error": float(epochs[-1]["train_top1_error"]),
        "final_val_top1_error": float(epochs[-1][METRIC]),
        "epochs": int(epochs[-1]["epoch"]) + 1,
        "planned_epochs": planned_epochs,
        # Fewer epochs than planned in a finished sweep: a scheduler (ASHA) stopped the trial.
        "stopped_early": int(epochs[-1]["epoch"]) + 1 < planned_epochs,
        "wall_time_s": run["wall_time_s"],
        "overhead_s": run["overhead_s"],
        "curve": {
            "epoch": [int(row["epoch"]) for row in epochs],
            "train_top1_error": [float(row["train_top1_error"]) for row in epochs],
            "val_top1_error": [float(row[METRIC]) for row in epochs],
        },
        "checkpoint": run["checkpoint"],
        "mlflow_run_id": run["mlflow_run_id"],
    }


def failed_record(depth: int, shortcut: str, error: str, error_file: str | None = None) -> dict[str, Any]:
    """A trial that failed: its one-line cause, and the file that holds its whole traceback."""
    return {"depth": depth, "shortcut": shortcut, "error": error, "error_file": error_file}


def in_sweep_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By depth, then plain before options A, B, C."""
    return sorted(records, key=lambda r: (r["depth"], SHORTCUT_ORDER.index(r["shortcut"])))


TABLE_COLUMNS = (
    "depth", "shortcut", "params", "best val top-1", "final train top-1", "final val top-1", "epochs", "wall",
    "overhead",
)  # fmt: skip


def table_row(trial: dict[str, Any]) -> list[str]:
    """A trial's cells under TABLE_COLUMNS, in the sweep's tables (the tune stage's console, the
    report's results.md); a failed trial's are empty past "failed"."""
    if "error" in trial:
        return [str(trial["depth"]), trial["shortcut"], "failed", *[""] * (len(TABLE_COLUMNS) - 3)]
    return [
        str(trial["depth"]),
        trial["shortcut"],
        f"{trial['num_params']:,}",
        f"{trial['best_val_top1_error']:.2%}",
        f"{trial['final_train_top1_error']:.2%}",
        f"{trial['final_val_top1_error']:.2%}",
        f"{trial['epochs']}{' (stopped early)' if trial.get('stopped_early') else ''}",
        seconds(trial["wall_time_s"]),
        seconds(trial.get("overhead_s")),  # none in records written before it was measured
    ]


def seconds(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.0f} s"


def sweep_finished(trial_epochs: list[int | None], grid_size: int, planned_epochs: int, early_stopping: bool) -> bool:
    """Whether every trial of the grid exists and ran to its end. `trial_epochs`: each trial's
    epochs done, None for a trial that failed (it is over). A scheduler that stops trials early
    (ASHA) ends some before `planned_epochs`; without one, a short trial was interrupted."""
    if len(trial_epochs) < grid_size:
        return False
    return early_stopping or all(epochs is None or epochs >= planned_epochs for epochs in trial_epochs)


def read_sweep(reports: str) -> list[dict[str, Any]]:
    path = Path(reports) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; run `python -m pipeline.tune` first") from None


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    finished = [t for t in trials if "error" not in t and t.get("checkpoint")]
    if not finished:
        raise UsageError("the sweep has no finished trial with a checkpoint")
    return min(finished, key=lambda t: val_rank(t["best_val_top1_error"], t.get("best_val_loss")))
