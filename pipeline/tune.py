"""Stage `tune`: a Ray Tune grid over network depth x shortcut type (the paper's Table 3, and its
plain-vs-residual comparisons), each trial a full distributed TorchTrainer run.

    python -m pipeline.tune [--params params.yaml] [--set tune.depths=[20]] ...

The pattern of Ray's train_tune_interop example: a driver function per trial builds and fits a
TorchTrainer whose Train RunConfig carries `TuneReportCallback`; the Train run is named after
the sweep and the trial (`records.Trial`), so a resumed sweep resumes each trial's own checkpoints. MLflow gets a
parent run for the sweep and one nested child run per trial. Rerunning an interrupted sweep
(same `tune.name`, by default derived from the config) restores it with `Tuner.restore`.
Writes `${paths.reports}/sweep.json` (`records.Sweep`): one record per trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import ray
import ray.tune
from pydantic import BaseModel, ConfigDict
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline import artifacts, checkpoints, cli, driver, tracking
from pipeline.files import ray_storage
from pipeline.manifest import Manifest, read_manifest
from pipeline.params import EXECUTION_KEYS, Params, check_sweep
from pipeline.records import (
    METRIC,
    STEPS_INTO_EPOCH,
    TABLE_COLUMNS,
    EpochMetrics,
    FailedTrial,
    RunFacts,
    Sweep,
    Trial,
    TrialRecord,
    best_epoch,
    epochs_of,
    in_sweep_order,
    sweep_finished,
    table_row,
    trial_record,
)
from resnet.summary import count_params

# MLflow params that would misdescribe a run: the parent run is the whole grid, not the one
# (model.depth, model.shortcut) of params.yaml; a trial is one point of it, not the grid.
SWEEP_OMITS = ("model.depth", "model.shortcut")
TRIAL_OMITS = ("tune.depths", "tune.shortcuts")


class EpochLines(ray.tune.Callback):
    """One console line per trial-epoch, printed by the sweep's driver: Tune's own tables and
    config boxes are off (verbose=0) and the trials' workers print nothing; Ray's logs and
    MLflow keep the detail."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if METRIC not in result:
            return
        print(
            f"{trial_of(trial.config)[0].label:<14} epoch {int(result['epoch']) + 1}/{self.epochs}"
            f"  train err {result['train_top1_error']:7.2%}  val err {result[METRIC]:7.2%}"
            f"  {result['images_per_s']:5.0f} img/s"
            + (f"  (MLflow away: {result['mlflow_waiting']} epochs wait)" if result.get("mlflow_waiting") else ""),
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"{trial_of(trial.config)[0].label:<14} failed; its traceback: {trial.error_file}", flush=True)


class EpochReports(TuneReportCallback):
    """What Tune sees of a trial: its epochs. A step checkpoint's report (`STEPS_INTO_EPOCH`) is
    Ray Train's alone: the trial resumes from it through its own Train run, and ASHA, the epoch
    lines and sweep.json count epochs."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if STEPS_INTO_EPOCH not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class TrialTimes(ray.tune.Callback):
    """What each trial costs beyond its epochs, as the sweep's driver sees it: `wall_time_s` from
    Tune starting the trial in its process to its end, and `overhead_s`, the part of it not spent
    in the epochs it reported (`epoch_time_s`: training and val): its MLflow run, the Train
    controller's and workers' processes starting and importing, checkpoints, Tune. (Tune starts
    the clock once the trial's own process is up: the first trials' fresh processes have spent
    seconds starting and importing by then; the others reuse theirs.) Logged to the trial's
    MLflow run, where the sweep's records read them. A trial that a rerun resumes is timed from
    its resumption, against the epochs it ran since."""

    clock = staticmethod(time.monotonic)

    def __init__(self, store: tracking.Store, experiment: str, sweep: str):
        self.store, self.experiment, self.sweep = store, experiment, sweep
        self.running: dict[str, list[float]] = {}  # trial id -> [started, seconds in epochs]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running[trial.trial_id] = [self.clock(), 0.0]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if trial.trial_id in self.running:
            self.running[trial.trial_id][1] += result.get("epoch_time_s", 0.0)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id not in self.running:
            return
        started, epoch_seconds = self.running.pop(trial.trial_id)
        wall = self.clock() - started
        try:
            run_id = tracking.find_run(self.store, self.experiment, trial_of(trial.config)[0].run_name(self.sweep))
        except tracking.TrackingUnavailable:
            return  # the time is a record, not a result: the sweep goes on without it
        if run_id:
            self.store.best_effort(self.store.log_metric, run_id, "wall_time_s", wall)
            self.store.best_effort(self.store.log_metric, run_id, "overhead_s", wall - epoch_seconds)


class SweepInterrupted(Exception):
    pass


class SweepSetup(BaseModel):
    """What every trial of a sweep is given beside its grid point (Tune's config: `sweep` in it)."""

    model_config = ConfigDict(frozen=True)
    params: Params
    sweep: str
    tracking_uri: str
    parent_run_id: str
    manifest_sha256: str
    data_source: str
    git_commit: str
    num_classes: int


def trial_params(params: Params, trial: Trial, run_name: str) -> Params:
    model = params.model.model_copy(update={"depth": trial.depth, "shortcut": trial.shortcut})
    train = params.train.model_copy(update={"run_name": run_name})
    return params.model_copy(update={"model": model, "train": train})


def trial_of(config: dict[str, Any]) -> tuple[Trial, SweepSetup]:
    """The trial a Tune config is for, and its sweep's setup."""
    setup = SweepSetup.model_validate(config["sweep"])
    return Trial(setup.params.model.arch, config["depth"], config["shortcut"]), setup


def open_trial_run(trial: Trial, setup: SweepSetup) -> tuple[Params, tracking.Store, str]:
    """A trial's params and its MLflow child run, found again on a retry or a resumed sweep.
    Every trial of a sweep does this at once: nothing here creates a record that another trial
    could be creating too (the sweep made the experiment and the dataset first)."""
    run_name = trial.run_name(setup.sweep)
    params = trial_params(setup.params, trial, run_name)
    store = tracking.Store(setup.tracking_uri, params.mlflow.retry_seconds)
    num_params = count_params(checkpoints.build_model(params, setup.num_classes))
    run_id = tracking.start_or_resume_run(
        store,
        params,
        run_name,
        {"num_params": num_params, "manifest_sha256": setup.manifest_sha256},
        commit=setup.git_commit,
        source="pipeline.tune",
        parent_run_id=setup.parent_run_id,
        display_name=trial.label,
        omit=TRIAL_OMITS,
    )
    tracking.log_shards_input(store, run_id, params.paths.shards, setup.manifest_sha256, setup.data_source)
    return params, store, run_id


def run_trial(config: dict[str, Any]) -> None:
    """Tune's trainable: one TorchTrainer run for (depth, shortcut), its own MLflow child run."""
    params, store, run_id = open_trial_run(*trial_of(config))
    result = driver.fit(
        params, params.train.run_name, run_id, store.uri, callbacks=[EpochReports()],
        say_epochs=False,
    )  # fmt: skip
    # The epoch sweep.json calls best (`records.best_epoch`): its checkpoint is the trial's model.
    kept = [
        (EpochMetrics.model_validate(metrics).rank, c)
        for c, metrics in result.best_checkpoints
        if STEPS_INTO_EPOCH not in metrics  # a step checkpoint: Ray keeps the latest, whatever its score
    ]
    best = min(kept, key=lambda k: k[0])[1] if kept else result.checkpoint
    try:
        store.set_tag(run_id, "best_checkpoint", checkpoints.checkpoint_uri(best))
        store.set_terminated(run_id, "FINISHED")
    except tracking.TrackingUnavailable:
        pass  # the trial has trained: the sweep's driver writes these when its store answers (complete_trial_run)


def complete_trial_run(store: tracking.Store, run_id: str, history: list[dict[str, Any]], filesystem: Any) -> None:
    """What a trial's MLflow run lacks, written by the sweep's driver from the trial's
    checkpoints: the epochs, best checkpoint and status of a trial whose store stayed away past
    `mlflow.retry_seconds` as it ended (or of one a scheduler stopped). Ray Train always keeps a
    run's latest checkpoint, whose history holds every epoch, and its best (`history`: Tune's
    rows for the trial, each epoch's with the path of its checkpoint)."""
    paths = {int(row["epoch"]): row["checkpoint_path"] for row in history if isinstance(row.get("checkpoint_path"), str)}
    uri = {epoch: checkpoints.checkpoint_uri(Checkpoint(path, filesystem)) for epoch, path in paths.items()}
    epochs = checkpoints.load(uri[max(uri)]).history
    best = best_epoch(epochs_of(epochs)).epoch
    writer = tracking.RunWriter(store, run_id, {"best_checkpoint": uri[best]}, system_metrics=False)
    for entry in epochs:
        writer.log_epoch(entry)
    if unwritten := writer.close():
        raise tracking.TrackingUnavailable(
            f"MLflow at {tracking.redacted(store.uri)} did not take epochs {tracking.ranges(unwritten)} of run {run_id}"
        )
    store.set_terminated(run_id, "FINISHED")


def sweep_name(params: Params, manifest_sha: str) -> str:
    """Same grid, recipe and data -> same name -> rerunning the sweep resumes it. Every param
    that changes a result is in it (params.EXECUTION_KEYS are not)."""
    relevant = {
        "model": params.model.model_dump(exclude={"depth", "shortcut"}),
        "train": params.train.model_dump(exclude=set(EXECUTION_KEYS["train"])),
        "tune": params.tune.model_dump(exclude=set(EXECUTION_KEYS["tune"])),
        "manifest": manifest_sha,
    }
    return "sweep-" + hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def concurrent_trials(params: Params) -> int:
    """As many trials as the cluster fits at once, each needing its most workers x their resources."""
    if params.tune.max_concurrent_trials:
        return params.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    workers = max(params.train.world_sizes)
    if params.train.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // workers)
    return max(1, int(resources.get("CPU", 1)) // (workers * params.train.cpus_per_worker))


def records(
    grid: ray.tune.ResultGrid, sweep: str, store: tracking.Store, experiment: str, planned_epochs: int, filesystem: Any
) -> list[TrialRecord | FailedTrial]:
    """sweep.json's records, from Tune's results and each trial's MLflow run, first completing
    any run its trial could not (`complete_trial_run`)."""
    out: list[TrialRecord | FailedTrial] = []
    for result in grid:
        (trial, _), history = trial_of(result.config), result.metrics_dataframe
        if result.error or history is None or METRIC not in history:
            cause = tracking.one_line(getattr(result.error, "cause", None) or result.error) if result.error else "no epoch"
            out.append(FailedTrial(**vars(trial), error=cause, error_file=f"{result.path}/error.txt"))
            continue
        run_id = tracking.find_run(store, experiment, trial.run_name(sweep))
        rows = history.to_dict("records")  # Tune's rows: a value a row lacks is NaN
        epochs = [EpochMetrics.model_validate(row) for row in rows if not math.isnan(row[METRIC])]
        run = store.get_run(run_id)
        if run.info.status != "FINISHED" or len(store.get_metric_history(run_id, METRIC)) < len(epochs_of(epochs)):
            complete_trial_run(store, run_id, rows, filesystem)
            run = store.get_run(run_id)
        facts = RunFacts(
            num_params=int(run.data.params["num_params"]),
            wall_time_s=run.data.metrics.get("wall_time_s"),  # TrialTimes: best effort
            overhead_s=run.data.metrics.get("overhead_s"),
            checkpoint=run.data.tags["best_checkpoint"],
            mlflow_run_id=run.info.run_id,
        )
        out.append(trial_record(trial, epochs, planned_epochs, facts))
    return in_sweep_order(out)


def finished(grid: ray.tune.ResultGrid, params: Params) -> bool:
    trial_epochs = [
        None if result.error else (int(result.metrics.get("epoch", -1)) + 1 if result.metrics else 0) for result in grid
    ]
    grid_size = len(params.tune.depths) * len(params.tune.shortcuts)
    return sweep_finished(trial_epochs, grid_size, params.train.epochs, params.tune.scheduler != "none")


def new_or_restored_tuner(
    params: Params, name: str, setup: SweepSetup, store: tracking.Store, experiment: str
) -> ray.tune.Tuner:
    """The grid's Tuner; the saved one when a sweep of this name was interrupted (with the
    callbacks it was made with)."""
    storage, filesystem = ray_storage(driver.absolute(params.paths.ray_storage))
    # The trial's driver only waits on its TorchTrainer, whose workers hold the CPUs and GPUs; it
    # asks for a token of memory because Tune refuses an empty request (1 CPU by default would
    # leave a 2-CPU machine one short for a 2-worker trial).
    trainable = ray.tune.with_resources(run_trial, {"memory": 1 << 20})
    path = f"{storage.rstrip('/')}/{name}"
    if ray.tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(f"resuming sweep {name} from {path}", flush=True)
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    scheduler = None
    if params.tune.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=params.train.epochs, grace_period=params.tune.grace_period
        )
    return ray.tune.Tuner(
        trainable,
        param_space={
            "depth": ray.tune.grid_search(params.tune.depths),
            "shortcut": ray.tune.grid_search(params.tune.shortcuts),
            "sweep": setup.model_dump(mode="json"),
        },
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode="min",
            scheduler=scheduler,
            max_concurrent_trials=concurrent_trials(params),
            # A trial that waits for a slot runs in the process of the trial that freed it, which
            # has imported torch, MLflow and Ray Train already (seconds a trial: BENCHMARKS.md). Not
            # after a scheduler stops a trial: its process is still inside TorchTrainer.fit and
            # cannot be reset, so Tune would fail the next trial it hands that process.
            reuse_actors=scheduler is None,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=filesystem,
            verbose=0,
            # A failed trial is started again; its Train run resumes from its latest checkpoint.
            failure_config=ray.tune.FailureConfig(max_failures=params.tune.max_failures),
            callbacks=[
                EpochLines(params.train.epochs),
                TrialTimes(store, experiment, name),
            ],
        ),
    )


def open_sweep_run(params: Params, manifest: Manifest, manifest_sha: str, name: str) -> tuple[tracking.Store, SweepSetup]:
    """The sweep's MLflow parent run, and the config every trial gets (`open_trial_run`). The
    records the trials would all make at once are made here, first: the experiment (with the
    parent run) and the shards' dataset."""
    store = tracking.store(params)
    commit = tracking.git_commit()
    parent = tracking.start_or_resume_run(
        store, params, name, {"manifest_sha256": manifest_sha, "sweep": name}, commit=commit, source="pipeline.tune", omit=SWEEP_OMITS
    )
    tracking.log_shards_input(store, parent, params.paths.shards, manifest_sha, manifest.source)
    setup = SweepSetup(
        params=params,
        sweep=name,
        tracking_uri=store.uri,
        parent_run_id=parent,
        manifest_sha256=manifest_sha,
        data_source=manifest.source,
        git_commit=commit,
        num_classes=len(manifest.classes),
    )
    return store, setup


def sweep(params: Params) -> Sweep:
    check_sweep(params)
    params = driver.absolute_paths(params)
    manifest = read_manifest(params.paths.shards)
    driver.preflight(params, manifest)  # every trial shares what it checks: only depth and shortcut vary
    manifest_sha = tracking.manifest_sha256(params.paths.shards)
    name = params.tune.name or sweep_name(params, manifest_sha)
    store, setup = open_sweep_run(params, manifest, manifest_sha, name)
    parent = setup.parent_run_id
    print(f"sweep {name}: MLflow run {parent} at {tracking.redacted(store.uri)}", flush=True)
    driver.ray_init()
    experiment = store.get_run(parent).info.experiment_id
    tuner = new_or_restored_tuner(params, name, setup, store, experiment)
    grid = tuner.fit()
    if not finished(grid, params):
        # Ctrl-C or a lost driver: Tune saved its state; a table of half a sweep would look done.
        raise SweepInterrupted(f"sweep {name} was interrupted; rerun the same command to resume it")
    _, filesystem = ray_storage(driver.absolute(params.paths.ray_storage))
    table = records(grid, name, store, experiment, params.train.epochs, filesystem)
    store.set_terminated(parent, "FINISHED")
    return Sweep(name=name, mlflow_run_id=parent, trials=table)


def format_table(trials: list[TrialRecord | FailedTrial]) -> str:
    """The sweep's table for the console: columns aligned, a failed trial's cause and the file
    with its traceback."""
    rows = [list(TABLE_COLUMNS), *map(table_row, trials)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for line, trial in zip(range(2, len(lines)), trials, strict=True):
        if isinstance(trial, FailedTrial):
            lines[line] = f"{lines[line].rstrip()}: {trial.error} (traceback: {trial.error_file})"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("tune", "Sweep depth x shortcut with Ray Tune over Ray Train runs.", argv)
    try:
        result = sweep(params)
    except SweepInterrupted as e:
        raise SystemExit(str(e)) from None
    out = Path(params.paths.reports) / Sweep.FILE
    artifacts.write(out, result)
    print(format_table(result.trials))
    print(f"wrote {out}")
    if result.failed:
        names = ", ".join(t.trial.label for t in result.failed)
        raise SystemExit(
            f"{len(result.failed)} of {len(result.trials)} trials failed ({names}); rerun the same command to retry them"
        )


if __name__ == "__main__":
    cli.run(main)
