"""reports/sweep.json's records, and what "best" means: the lowest val error, then the lowest val loss."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import records, tracking, tune
from pipeline.errors import UsageError


def test_sweep_records_the_best_epochs_val_loss_lowest_error_then_lowest_loss(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("resnet")
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3],
            "train_top1_error": [0.5, 0.1, 0.0, 0.0],
            "val_top1_error": [0.5, 0.0, 0.0, 0.0],
            "val_top5_error": [0.1, 0.0, 0.0, 0.0],
            "val_loss": [1.2, 0.30, 0.05, 0.08],  # epochs 1-3 tie on errors; epoch 2 is the surest
        }
    )
    grid = []
    for trial, frame in (("t1", history), ("t2", history.drop(columns="val_loss"))):
        run = client.create_run(experiment, tags={tracking.RUN_NAME_TAG: f"sweep-x-{trial}"})
        client.log_param(run.info.run_id, "num_params", 78042)
        client.set_tag(run.info.run_id, "best_checkpoint", f"/ckpt/{trial}")
        grid.append(
            SimpleNamespace(
                config={"depth": 20, "shortcut": "A" if trial == "t1" else "B"},
                metrics_dataframe=frame,
                error=None,
                metrics={"trial_id": trial},
            )
        )
    with_loss, without = tune.records(grid, "sweep-x", uri, experiment, 4)
    assert (with_loss["best_val_top1_error"], with_loss["best_val_loss"]) == (0.0, 0.05)
    # A run from before val_loss was recorded: the first epoch of the lowest error, no loss.
    assert (without["best_val_top1_error"], without["best_val_loss"]) == (0.0, None)


def test_the_best_trial_is_the_lowest_val_error_then_the_lowest_val_loss():
    trials = [
        {"depth": 20, "shortcut": "none", "best_val_top1_error": 0.0, "best_val_loss": 0.09, "checkpoint": "a"},
        {"depth": 20, "shortcut": "A", "best_val_top1_error": 0.0, "best_val_loss": 0.02, "checkpoint": "b"},
        {"depth": 20, "shortcut": "B", "best_val_top1_error": 0.0, "checkpoint": "c"},  # no loss: last
        {"depth": 56, "shortcut": "A", "best_val_top1_error": 0.01, "best_val_loss": 0.001, "checkpoint": "d"},
    ]
    assert records.best_trial(trials)["checkpoint"] == "b"
    assert records.best_trial([trials[2], trials[3]])["checkpoint"] == "c"


def epoch(number: int, val: float | None, loss: float | None = 0.5, train: float = 0.1) -> dict:
    """One epoch's report, as Ray Tune's history holds it (None: a value the epoch lacks)."""
    return {"epoch": number, "train_top1_error": train, "val_top1_error": val, "val_top5_error": 0.0, "val_loss": loss}


def test_val_rank_is_error_then_loss_and_an_unrecorded_loss_ranks_last():
    assert records.val_rank(0.1, 9.0) < records.val_rank(0.2, 0.1)
    assert records.val_rank(0.1, 0.2) < records.val_rank(0.1, 0.3)
    assert records.val_rank(0.1, None) == records.val_rank(0.1, float("nan")) == (0.1, float("inf"))
    assert records.val_rank(0.1, 50.0) < records.val_rank(0.1, None)


def test_epochs_of_keeps_one_report_an_epoch_the_later_one_in_epoch_order():
    history = [epoch(1, 0.3), epoch(0, 0.5), epoch(1, 0.2), {"epoch": 2, "val_top1_error": None}]
    epochs = records.epochs_of(history)
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[1]["val_top1_error"] == 0.2  # a resumed trial's report of its last epoch again


def test_the_best_epoch_is_the_lowest_error_then_the_lowest_loss_then_the_earliest():
    assert records.best_epoch([epoch(0, 0.2), epoch(1, 0.1), epoch(2, 0.3)])["epoch"] == 1
    assert records.best_epoch([epoch(0, 0.1, 0.4), epoch(1, 0.1, 0.2), epoch(2, 0.1, 0.3)])["epoch"] == 1
    assert records.best_epoch([epoch(0, 0.1, 0.2), epoch(1, 0.1, 0.2)])["epoch"] == 0
    assert records.best_epoch([epoch(0, 0.1, None), epoch(1, 0.1, 0.9)])["epoch"] == 1


def test_a_trial_record_holds_its_best_epoch_its_last_and_its_curve():
    run = {"num_params": 270, "wall_time_s": 30.0, "checkpoint": "/ckpt", "mlflow_run_id": "r"}
    history = [epoch(0, 0.5, 1.0, 0.6), epoch(1, 0.1, None, 0.2), epoch(2, 0.2, 0.3, 0.05)]
    record = records.trial_record(56, "B", history, planned_epochs=4, run=run)
    assert record["best_epoch"] == 1 and record["best_val_top1_error"] == 0.1 and record["best_val_loss"] is None
    assert (record["final_train_top1_error"], record["final_val_top1_error"]) == (0.05, 0.2)
    assert (record["epochs"], record["planned_epochs"]) == (3, 4)
    assert record["curve"] == {"epoch": [0, 1, 2], "train_top1_error": [0.6, 0.2, 0.05], "val_top1_error": [0.5, 0.1, 0.2]}
    assert {k: record[k] for k in run} == run and (record["depth"], record["shortcut"]) == (56, "B")


def test_a_sweep_is_finished_when_every_trial_of_the_grid_ran_to_its_end_or_failed():
    assert records.sweep_finished([4, 4, None], grid_size=3, planned_epochs=4, early_stopping=False)
    assert not records.sweep_finished([4, 4], grid_size=3, planned_epochs=4, early_stopping=False)  # one never started
    assert not records.sweep_finished([4, 2, 4], grid_size=3, planned_epochs=4, early_stopping=False)  # interrupted
    assert records.sweep_finished([4, 2, 4], grid_size=3, planned_epochs=4, early_stopping=True)  # ASHA stopped one


def test_records_come_in_sweep_order_plain_first():
    shuffled = [{"depth": 56, "shortcut": "A"}, {"depth": 20, "shortcut": "C"}, {"depth": 20, "shortcut": "none"}]
    assert [(r["depth"], r["shortcut"]) for r in records.in_sweep_order(shuffled)] == [(20, "none"), (20, "C"), (56, "A")]


def test_no_finished_trial_with_a_checkpoint_and_no_sweep_file_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="^the sweep has no finished trial with a checkpoint$"):
        records.best_trial([{"depth": 20, "shortcut": "A", "error": "died"}, {"depth": 20, "shortcut": "B", "checkpoint": None}])
    with pytest.raises(UsageError, match=r"sweep\.json: missing; run `python -m pipeline\.tune` first$"):
        records.read_sweep(str(tmp_path))
