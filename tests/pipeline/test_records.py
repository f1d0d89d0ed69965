"""reports/sweep.json's records, the names of a trial, and what "best" means: the lowest val
error, then the lowest val loss."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import artifacts, records, tracking, tune
from pipeline.errors import UsageError
from pipeline.records import EpochMetrics, RunFacts, Trial
from tests.helpers import failed_trial, finished_trial, make_params, sweep_of


def epoch(number: int, val: float, loss: float = 0.5, train: float = 0.1, top5: float = 0.0) -> EpochMetrics:
    """One epoch's report, as the workers make it."""
    return EpochMetrics(
        epoch=number, train_loss=1.0, train_top1_error=train, val_top1_error=val, val_top5_error=top5,
        val_loss=loss, lr=0.1, images_per_s=100.0, epoch_time_s=1.0, world_size=1, steps_s=1.0, goodput=0.5, redone_steps=0,
    )  # fmt: skip


RUN = RunFacts(num_params=270, wall_time_s=30.0, overhead_s=6.0, checkpoint="/ckpt", mlflow_run_id="r")


# --- one trial, one set of names ----------------------------------------------------------------


def test_a_trial_has_one_label_one_key_and_one_run_name_and_plain_is_never_resnet():
    plain, residual = Trial("cifar", 56, "none"), Trial("cifar", 56, "B")
    assert (plain.label, plain.key, plain.run_name("sweep-1")) == ("plain-56", "plain-56", "sweep-1-plain-56")
    assert (residual.label, residual.key) == ("ResNet-56 B", "resnet-56-B")
    assert residual.run_name("sweep-1") == "sweep-1-resnet-56-B"
    assert "resnet" not in plain.run_name("sweep-1") and "resnet" not in plain.label.lower()
    assert plain.model_name == residual.model_name == "cifar_resnet56"  # the builder's name, for both


# --- what "best" means ---------------------------------------------------------------------------


def test_val_rank_is_error_then_loss_and_a_nan_loss_ranks_last():
    assert records.val_rank(0.1, 9.0) < records.val_rank(0.2, 0.1)
    assert records.val_rank(0.1, 0.2) < records.val_rank(0.1, 0.3)
    assert records.val_rank(0.1, float("nan")) == (0.1, math.inf)
    assert records.val_rank(0.1, 50.0) < records.val_rank(0.1, float("nan"))


def test_val_rank_orders_a_list_of_results_best_first():
    results = [(0.2, 0.1), (0.1, float("inf")), (0.1, 0.3), (0.0, 5.0), (0.1, 0.2)]
    ranked = sorted(results, key=lambda r: records.val_rank(*r))
    assert ranked == [(0.0, 5.0), (0.1, 0.2), (0.1, 0.3), (0.1, float("inf")), (0.2, 0.1)]


def test_val_rank_score_orders_as_val_rank_down_to_one_image_in_a_million():
    """Ray Train keeps checkpoints by this one number: it must rank epochs as `best_epoch` does."""
    images = 1_000_000
    errors = [0.0, 1 / images, 0.5 - 1 / images, 0.5, 1.0, 37 / 360, 38 / 360, 1 / 3]
    losses = [0.0, 1e-6, 0.2, 0.2 + 1e-6, 6.9, 99.9, 100.0, 1e9, float("nan")]
    results = [(e, loss) for e in errors for loss in losses]

    def order(x, y) -> int:
        return (x > y) - (x < y)

    for a, b in itertools.combinations(results, 2):
        by_rank = order(records.val_rank(*a), records.val_rank(*b))
        by_score = order(records.val_rank_score(*a), records.val_rank_score(*b))
        # Losses at or over the cap (or NaN) tie, and then only the error orders.
        capped = min(records.val_rank(*a)[1], records.val_rank(*b)[1]) >= records.LOSS_CAP
        assert by_score == by_rank or (capped and a[0] == b[0] and by_score == 0), (a, b)


def test_the_best_epoch_is_the_lowest_error_then_the_lowest_loss_then_the_earliest():
    assert records.best_epoch([epoch(0, 0.2), epoch(1, 0.1), epoch(2, 0.3)]).epoch == 1
    assert records.best_epoch([epoch(0, 0.1, 0.4), epoch(1, 0.1, 0.2), epoch(2, 0.1, 0.3)]).epoch == 1
    assert records.best_epoch([epoch(0, 0.1, 0.2), epoch(1, 0.1, 0.2)]).epoch == 0
    assert records.best_epoch([epoch(0, 0.1, float("nan")), epoch(1, 0.1, 7.0)]).epoch == 1
    assert records.best_epoch([epoch(0, 0.2, 0.01), epoch(1, 0.1, 7.0)]).epoch == 1


def test_the_best_trial_is_the_lowest_val_error_then_the_lowest_val_loss_and_never_a_failed_one():
    sweep = sweep_of([
        failed_trial(20, "none"),
        finished_trial(20, "A", 0.0, 0.0, best_val_loss=0.09),
        finished_trial(20, "B", 0.0, 0.0, best_val_loss=0.02),
        finished_trial(56, "A", 0.0, 0.01, best_val_loss=0.001),
    ])  # fmt: skip
    assert sweep.best_trial().trial == Trial("cifar", 20, "B")
    assert [t.shortcut for t in sweep.failed] == ["none"] and len(sweep.finished) == 3
    with pytest.raises(UsageError, match="^the sweep has no finished trial$"):
        sweep_of([failed_trial(20, "A")]).best_trial()


# --- a trial's record ------------------------------------------------------------------------------


def test_epochs_of_keeps_one_report_an_epoch_the_later_one_in_epoch_order():
    epochs = records.epochs_of([epoch(1, 0.3), epoch(0, 0.5), epoch(1, 0.2)])
    assert [e.epoch for e in epochs] == [0, 1]
    assert epochs[1].val_top1_error == 0.2  # a resumed trial's report of its last epoch again


def test_a_trial_record_holds_its_best_epoch_its_last_and_its_curve():
    history = [epoch(0, 0.5, 1.0, 0.6), epoch(1, 0.1, 0.4, 0.2), epoch(2, 0.2, 0.3, 0.05)]
    record = records.trial_record(Trial("cifar", 56, "B"), history, planned_epochs=4, run=RUN)
    assert (record.best_epoch, record.best_val_top1_error, record.best_val_loss) == (1, 0.1, 0.4)
    assert (record.final_train_top1_error, record.final_val_top1_error) == (0.05, 0.2)
    assert (record.epochs, record.planned_epochs, record.stopped_early) == (3, 4, True)
    assert record.curve == records.Curve(epoch=[0, 1, 2], train_top1_error=[0.6, 0.2, 0.05], val_top1_error=[0.5, 0.1, 0.2])
    assert record.trial == Trial("cifar", 56, "B") and record.checkpoint == RUN.checkpoint


def test_a_trial_record_of_a_resumed_trial_takes_its_last_epoch_from_the_later_report():
    history = [epoch(1, 0.3, 0.6, 0.4), epoch(0, 0.5, 0.9, 0.6), epoch(2, 0.25, 0.5, 0.3), epoch(2, 0.2, 0.45, 0.1)]
    record = records.trial_record(Trial("cifar", 20, "none"), history, planned_epochs=3, run=RUN)
    assert (record.final_train_top1_error, record.final_val_top1_error) == (0.1, 0.2)
    assert record.epochs == 3 and record.curve.epoch == [0, 1, 2] and record.curve.val_top1_error == [0.5, 0.3, 0.2]
    assert not record.stopped_early


def test_a_trial_record_keeps_the_best_epochs_loss_and_top5_not_the_last_ones():
    history = [epoch(0, 0.1, 0.25), epoch(1, 0.1, 0.125, top5=0.5), epoch(2, 0.3, 0.01)]
    record = records.trial_record(Trial("cifar", 20, "A"), history, planned_epochs=3, run=RUN)
    assert (record.best_epoch, record.best_val_loss, record.best_val_top5_error) == (1, 0.125, 0.5)
    assert record.final_val_top1_error == 0.3


def test_a_trial_whose_times_were_not_recorded_is_written_and_read_back(tmp_path):
    """TrialTimes writes wall and overhead times best effort: a store that was away leaves them
    None, which sweep.json holds as null (a NaN would be no JSON at all)."""
    untimed = RUN.model_copy(update={"wall_time_s": None, "overhead_s": None})
    record = records.trial_record(Trial("cifar", 20, "A"), [epoch(0, 0.1)], planned_epochs=1, run=untimed)
    sweep = sweep_of([record])
    artifacts.write(tmp_path / records.Sweep.FILE, sweep)
    json.loads((tmp_path / records.Sweep.FILE).read_text())  # plain JSON
    assert records.read_sweep(str(tmp_path)) == sweep
    assert records.table_row(record)[-4:-2] == ["", ""]  # wall, overhead


# --- the sweep ------------------------------------------------------------------------------------


def test_a_sweep_is_finished_when_every_trial_of_the_grid_ran_to_its_end_or_failed():
    assert records.sweep_finished([4, 4, None], grid_size=3, planned_epochs=4, early_stopping=False)
    assert not records.sweep_finished([4, 4], grid_size=3, planned_epochs=4, early_stopping=False)  # one never started
    assert not records.sweep_finished([4, 2, 4], grid_size=3, planned_epochs=4, early_stopping=False)  # interrupted
    assert records.sweep_finished([4, 2, 4], grid_size=3, planned_epochs=4, early_stopping=True)  # ASHA stopped one
    assert not records.sweep_finished([4, 2], grid_size=3, planned_epochs=4, early_stopping=True)
    assert records.sweep_finished([5, 4], grid_size=2, planned_epochs=4, early_stopping=False)
    assert not records.sweep_finished([None, 0], grid_size=2, planned_epochs=4, early_stopping=False)  # never reported


def test_sweep_order_is_by_depth_as_a_number_then_plain_a_b_c():
    shuffled = [finished_trial(d, s, 0.1, 0.1) for d in (110, 20, 56) for s in ("C", "A", "none", "B")]
    shuffled.append(failed_trial(20, "B"))
    ordered = [(r.depth, r.shortcut) for r in records.in_sweep_order(shuffled)]
    assert ordered[:5] == [(20, "none"), (20, "A"), (20, "B"), (20, "B"), (20, "C")]
    assert ordered[5:] == [(d, s) for d in (56, 110) for s in ("none", "A", "B", "C")]


def test_read_sweep_reads_the_records_back_and_refuses_an_old_or_missing_file_in_one_line(tmp_path):
    sweep = sweep_of([finished_trial(20, "A", 0.01, 0.05), failed_trial(56, "B")])
    artifacts.write(tmp_path / records.Sweep.FILE, sweep)
    read = records.read_sweep(str(tmp_path))
    assert read == sweep and isinstance(read.trials[1], records.FailedTrial)

    (tmp_path / records.Sweep.FILE).write_text(json.dumps([{"depth": 20, "shortcut": "A"}]))  # schema 1: a list
    with pytest.raises(UsageError, match=r"sweep\.json: a JSON list, expected an object; run `python -m pipeline\.tune` again$"):
        records.read_sweep(str(tmp_path))
    missing = tmp_path / "elsewhere"
    with pytest.raises(UsageError, match=r"sweep\.json: missing; run `python -m pipeline\.tune` first$") as raised:
        records.read_sweep(str(missing))
    assert str(raised.value).startswith(f"{missing / 'sweep.json'}: missing")


def test_the_table_labels_each_row_by_its_own_trial_failed_ones_included():
    rows = [records.table_row(t) for t in (finished_trial(56, "none", 0.3, 0.33), failed_trial(56, "B"))]
    assert rows[0][0] == "plain-56" and rows[1][:2] == ["ResNet-56 B", "failed"]
    assert len(rows[0]) == len(rows[1]) == len(records.TABLE_COLUMNS)


# --- from Tune's results and MLflow's runs ---------------------------------------------------------


def test_sweep_records_come_from_tunes_rows_and_each_trials_own_run(tmp_path):
    params = make_params(tmp_path)
    uri = params.mlflow.tracking_uri
    client = MlflowClient(uri)
    experiment = client.create_experiment("resnet")
    setup = tune.SweepSetup(
        params=params, sweep="sweep-x", tracking_uri=uri, parent_run_id="p", manifest_sha256="0" * 64,
        data_source="digits", git_commit="c", num_classes=10,
    )  # fmt: skip
    history = pd.DataFrame([epoch(n, val, loss).model_dump() for n, val, loss in [(0, 0.5, 1.2), (1, 0.0, 0.3), (2, 0.0, 0.05), (3, 0.0, 0.08)]])
    history["time_this_iter_s"] = 1.0  # Tune's own columns beside the workers'
    grid = []
    for shortcut in ("B", "A"):
        trial = Trial("cifar", 20, shortcut)
        run = client.create_run(experiment, tags={tracking.RUN_NAME_TAG: trial.run_name("sweep-x")}).info.run_id
        client.log_param(run, "num_params", 78042)
        client.set_tag(run, "best_checkpoint", f"/ckpt/{shortcut}")
        for step in range(4):
            client.log_metric(run, records.METRIC, 0.0, step=step)
        client.set_terminated(run)  # its trial wrote all it had to
        config = {"depth": 20, "shortcut": shortcut, "sweep": setup.model_dump(mode="json")}
        grid.append(SimpleNamespace(config=config, metrics_dataframe=history, error=None, path="/ray/x"))
    grid.append(SimpleNamespace(config={**config, "shortcut": "C"}, metrics_dataframe=None, error=RuntimeError("died"), path="/ray/c"))

    a, b, c = tune.records(grid, "sweep-x", tracking.Store(uri, budget_s=10), experiment, 4, None)
    assert [r.trial for r in (a, b, c)] == [Trial("cifar", 20, s) for s in ("A", "B", "C")]  # each names its own
    assert (a.best_epoch, a.best_val_top1_error, a.best_val_loss) == (2, 0.0, 0.05)  # epochs 1-3 tie on errors
    assert (a.checkpoint, b.checkpoint) == ("/ckpt/A", "/ckpt/B") and a.wall_time_s is None
    assert c == records.FailedTrial(arch="cifar", depth=20, shortcut="C", error="RuntimeError: died", error_file="/ray/c/error.txt")
