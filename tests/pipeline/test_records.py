"""reports/sweep.json's records, and what "best" means: the lowest val error, then the lowest val loss."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import records, tracking, tune


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
