"""reports/sweep.json's records, and what "best" means: the lowest val error, then the lowest val loss."""

from __future__ import annotations

import itertools
import json
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
        for step in range(4):
            client.log_metric(run.info.run_id, records.METRIC, 0.0, step=step)
        client.set_terminated(run.info.run_id)  # its trial wrote all it had to
        grid.append(
            SimpleNamespace(
                config={"depth": 20, "shortcut": "A" if trial == "t1" else "B"},
                metrics_dataframe=frame,
                error=None,
                metrics={"trial_id": trial},
            )
        )
    with_loss, without = tune.records(grid, "sweep-x", tracking.Store(uri, budget_s=10), experiment, 4, None)
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
    run = {"num_params": 270, "wall_time_s": 30.0, "overhead_s": 6.0, "checkpoint": "/ckpt", "mlflow_run_id": "r"}
    history = [epoch(0, 0.5, 1.0, 0.6), epoch(1, 0.1, None, 0.2), epoch(2, 0.2, 0.3, 0.05)]
    record = records.trial_record(56, "B", history, planned_epochs=4, run=run)
    assert record["best_epoch"] == 1 and record["best_val_top1_error"] == 0.1 and record["best_val_loss"] is None
    assert (record["final_train_top1_error"], record["final_val_top1_error"]) == (0.05, 0.2)
    assert (record["epochs"], record["planned_epochs"]) == (3, 4)
    assert record["curve"] == {
        "epoch": [0, 1, 2],
        "train_top1_error": [0.6, 0.2, 0.05],
        "val_top1_error": [0.5, 0.1, 0.2],
    }
    assert {k: record[k] for k in run} == run and (record["depth"], record["shortcut"]) == (56, "B")


def test_a_sweep_is_finished_when_every_trial_of_the_grid_ran_to_its_end_or_failed():
    assert records.sweep_finished([4, 4, None], grid_size=3, planned_epochs=4, early_stopping=False)
    assert not records.sweep_finished([4, 4], grid_size=3, planned_epochs=4, early_stopping=False)  # one never started
    assert not records.sweep_finished([4, 2, 4], grid_size=3, planned_epochs=4, early_stopping=False)  # interrupted
    assert records.sweep_finished([4, 2, 4], grid_size=3, planned_epochs=4, early_stopping=True)  # ASHA stopped one


def test_records_come_in_sweep_order_plain_first():
    shuffled = [{"depth": 56, "shortcut": "A"}, {"depth": 20, "shortcut": "C"}, {"depth": 20, "shortcut": "none"}]
    assert [(r["depth"], r["shortcut"]) for r in records.in_sweep_order(shuffled)] == [
        (20, "none"),
        (20, "C"),
        (56, "A"),
    ]


def test_no_finished_trial_with_a_checkpoint_and_no_sweep_file_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="^the sweep has no finished trial with a checkpoint$"):
        records.best_trial(
            [{"depth": 20, "shortcut": "A", "error": "died"}, {"depth": 20, "shortcut": "B", "checkpoint": None}]
        )
    with pytest.raises(UsageError, match=r"sweep\.json: missing; run `python -m pipeline\.tune` first$"):
        records.read_sweep(str(tmp_path))


def test_val_rank_orders_a_list_of_results_best_first():
    results = [(0.2, 0.1), (0.1, None), (0.1, 0.3), (0.0, 5.0), (0.1, 0.2)]
    ranked = sorted(results, key=lambda r: records.val_rank(*r))
    assert ranked == [(0.0, 5.0), (0.1, 0.2), (0.1, 0.3), (0.1, None), (0.2, 0.1)]


def test_val_rank_score_orders_as_val_rank_down_to_one_image_in_a_million():
    """Ray Train keeps checkpoints by this one number: it must rank epochs as `best_epoch` does."""
    images = 1_000_000
    errors = [0.0, 1 / images, 0.5 - 1 / images, 0.5, 1.0, 37 / 360, 38 / 360, 1 / 3]
    losses = [0.0, 1e-6, 0.2, 0.2 + 1e-6, 6.9, 99.9, 100.0, 1e9, None, float("nan")]
    results = [(e, loss) for e in errors for loss in losses]

    def order(x, y) -> int:
        return (x > y) - (x < y)

    for a, b in itertools.combinations(results, 2):
        by_rank = order(records.val_rank(*a), records.val_rank(*b))
        by_score = order(records.val_rank_score(*a), records.val_rank_score(*b))
        # Losses at or over the cap (or unrecorded) tie, and then only the error orders.
        capped = min(records.val_rank(*a)[1], records.val_rank(*b)[1]) >= records.LOSS_CAP
        assert by_score == by_rank or (capped and a[0] == b[0] and by_score == 0), (a, b)


def test_epochs_of_drops_reports_without_a_val_error_and_reads_float_epochs_as_the_same_epoch():
    # A Tune history read through pandas can carry epochs as floats; a row without a val error
    # (the key absent, or None) is a report of something else.
    history = [epoch(2, 0.4), {"epoch": 0}, epoch(0.0, 0.6), epoch(1, 0.5), epoch(2.0, 0.3)]
    epochs = records.epochs_of(history)
    assert [int(e["epoch"]) for e in epochs] == [0, 1, 2]
    assert [e["val_top1_error"] for e in epochs] == [0.6, 0.5, 0.3]
    assert records.epochs_of([{"epoch": 0, "val_top1_error": None}, {"epoch": 1}]) == []


def test_the_best_epoch_ranks_a_nan_loss_last_and_a_lower_error_beats_any_loss():
    assert records.best_epoch([epoch(0, 0.1, float("nan")), epoch(1, 0.1, 7.0)])["epoch"] == 1
    assert records.best_epoch([epoch(0, 0.2, 0.01), epoch(1, 0.1, 7.0)])["epoch"] == 1
    assert records.best_epoch([epoch(3, 0.1, None), epoch(5, 0.1, None)])["epoch"] == 3  # no loss at all: earliest


def test_a_trial_record_of_a_resumed_trial_takes_its_last_epoch_from_the_later_report():
    run = {"num_params": 270, "wall_time_s": 30.0, "overhead_s": 6.0, "checkpoint": "/ckpt", "mlflow_run_id": "r"}
    # Reported out of order, epoch 2 twice (the trial resumed after it), and last a row without val.
    history = [epoch(1, 0.3, 0.6, 0.4), epoch(0, 0.5, 0.9, 0.6), epoch(2, 0.25, 0.5, 0.3),
               epoch(2, 0.2, float("nan"), 0.1), epoch(3, None, None, 0.01)]  # fmt: skip
    record = records.trial_record(20, "none", history, planned_epochs=3, run=run)
    assert (record["final_train_top1_error"], record["final_val_top1_error"]) == (0.1, 0.2)
    assert record["epochs"] == 3 and record["curve"]["epoch"] == [0, 1, 2]
    assert record["curve"]["val_top1_error"] == [0.5, 0.3, 0.2]
    # The best epoch is the later report of epoch 2, whose loss is NaN: recorded as no loss.
    assert (record["best_epoch"], record["best_val_top1_error"], record["best_val_loss"]) == (2, 0.2, None)
    json.dumps(record, allow_nan=False)  # sweep.json: plain JSON, no NaN


def test_a_trial_record_keeps_the_best_epochs_loss_and_top5_not_the_last_ones():
    run = {"num_params": 270, "wall_time_s": 30.0, "overhead_s": 6.0, "checkpoint": "/ckpt", "mlflow_run_id": "r"}
    history = [epoch(0, 0.1, 0.25), {**epoch(1, 0.1, 0.125), "val_top5_error": 0.5}, epoch(2, 0.3, 0.01)]
    record = records.trial_record(20, "A", history, planned_epochs=3, run=run)
    assert (record["best_epoch"], record["best_val_loss"], record["best_val_top5_error"]) == (1, 0.125, 0.5)
    assert record["final_val_top1_error"] == 0.3
    assert all(type(record[k]) is float for k in ("best_val_top1_error", "best_val_top5_error", "best_val_loss"))


def test_a_grid_missing_a_trial_is_unfinished_even_with_early_stopping():
    assert not records.sweep_finished([4, 2], grid_size=3, planned_epochs=4, early_stopping=True)
    assert not records.sweep_finished([], grid_size=1, planned_epochs=4, early_stopping=False)


def test_failed_trials_are_over_and_a_trial_past_its_planned_epochs_is_finished():
    assert records.sweep_finished([None, None], grid_size=2, planned_epochs=4, early_stopping=False)
    assert records.sweep_finished([5, 4], grid_size=2, planned_epochs=4, early_stopping=False)
    assert not records.sweep_finished([None, 0], grid_size=2, planned_epochs=4, early_stopping=False)  # never reported


def test_sweep_order_is_by_depth_as_a_number_then_plain_a_b_c():
    shuffled = [{"depth": d, "shortcut": s} for d in (110, 20, 56) for s in ("C", "A", "none", "B")]
    ordered = [(r["depth"], r["shortcut"]) for r in records.in_sweep_order(shuffled)]
    assert ordered == [(d, s) for d in (20, 56, 110) for s in ("none", "A", "B", "C")]


def test_the_best_trial_passes_over_failed_trials_and_trials_without_a_checkpoint():
    trials = [
        {"depth": 20, "shortcut": "none", "error": "RayTaskError: worker died"},  # no numbers at all
        {"depth": 20, "shortcut": "A", "best_val_top1_error": 0.0, "best_val_loss": 0.01, "checkpoint": None},
        {"depth": 20, "shortcut": "B", "best_val_top1_error": 0.0, "best_val_loss": 0.01},  # no checkpoint key
        {"depth": 20, "shortcut": "C", "best_val_top1_error": 0.0, "best_val_loss": 0.01, "checkpoint": ""},
        {"depth": 56, "shortcut": "A", "best_val_top1_error": 0.2, "best_val_loss": 0.9, "checkpoint": "kept"},
        {"depth": 56, "shortcut": "B", "best_val_top1_error": 0.3, "best_val_loss": 0.1, "checkpoint": "worse"},
    ]
    assert records.best_trial(trials)["checkpoint"] == "kept"
    with pytest.raises(UsageError):
        records.best_trial([])


def test_read_sweep_reads_the_records_back_and_names_the_missing_file_by_its_path(tmp_path):
    trials = [{"depth": 20, "shortcut": "A", "best_val_top1_error": 0.1}, {"depth": 56, "shortcut": "B", "error": "x"}]
    (tmp_path / records.SWEEP_FILE).write_text(json.dumps(trials))
    assert records.read_sweep(str(tmp_path)) == trials
    missing = tmp_path / "elsewhere"
    with pytest.raises(UsageError) as raised:
        records.read_sweep(str(missing))
    assert str(raised.value).startswith(f"{missing / 'sweep.json'}: missing")
