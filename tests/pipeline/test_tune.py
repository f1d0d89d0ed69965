"""The tune stage's pure parts: the sweep's name (same experiment, same name: a rerun resumes it;
another experiment, another name), a trial's params and label, the console table."""

from __future__ import annotations

import copy
import multiprocessing
import re
from types import SimpleNamespace

import pytest

from pipeline import checkpoints, tracking, tune
from pipeline import params as params_module
from pipeline.manifest import read_manifest
from pipeline.params import EXECUTION_KEYS
from pipeline.records import EpochMetrics, Trial
from tests.conftest import REPO
from tests.helpers import attempts, failed_trial, finished_trial, make_params

SHA = "a" * 64


def name_with(*overrides: str, manifest_sha: str = SHA) -> str:
    return tune.sweep_name(params_module.load(REPO / "params.yaml", list(overrides)), manifest_sha)


# One changed value for every param of the sections the name reads (model, train, tune) that is
# neither how the trials run (EXECUTION_KEYS) nor varied by the grid (model.depth, shortcut).
RESULT_OVERRIDES = {
    "model.arch": ("model.arch=imagenet", "model.depth=18"),  # the depth follows: depth alone never renames it
    "model.bottleneck": ("model.bottleneck=v1.5",),
    "model.zero_init_residual": ("model.zero_init_residual=true",),
    "train.epochs": ("train.epochs=3",),
    "train.batch_size": ("train.batch_size=64",),
    "train.lr": ("train.lr=0.05",),
    "train.momentum": ("train.momentum=0.5",),
    "train.weight_decay": ("train.weight_decay=5.0e-4",),
    "train.seed": ("train.seed=1",),
    "train.milestones": ("train.milestones=[0.5]",),
    "train.plateau_patience": ("train.plateau_patience=5",),
    "train.warmup_depth": ("train.warmup_depth=56",),
    "train.warmup_epochs": ("train.warmup_epochs=2",),
    "train.flip": ("train.flip=true",),
    "tune.depths": ("tune.depths=[20]",),
    "tune.shortcuts": ("tune.shortcuts=[none, A]",),
    "tune.scheduler": ("tune.scheduler=asha",),
    "tune.grace_period": ("tune.grace_period=2",),
}


def test_every_param_that_changes_a_result_has_an_override_here():
    sections = {"model": params_module.Model, "train": params_module.Train, "tune": params_module.Tune}
    result_keys = {
        f"{section}.{key}"
        for section, schema in sections.items()
        for key in schema.model_fields
        if key not in EXECUTION_KEYS.get(section, ()) and f"{section}.{key}" not in ("model.depth", "model.shortcut")
    }
    assert set(RESULT_OVERRIDES) == result_keys


@pytest.mark.parametrize("key", RESULT_OVERRIDES)
def test_a_param_that_changes_a_result_renames_the_sweep(key):
    default = params_module.load(REPO / "params.yaml")
    changed = params_module.load(REPO / "params.yaml", list(RESULT_OVERRIDES[key]))
    section, field = key.split(".")
    assert getattr(getattr(changed, section), field) != getattr(getattr(default, section), field)
    assert name_with(*RESULT_OVERRIDES[key]) != name_with()


EXECUTION_OVERRIDES = {
    "num_workers": "2", "use_gpu": "true", "cpus_per_worker": "2", "loader_workers": "2", "compile": "true",
    "max_failures": "0", "checkpoints_to_keep": "5", "run_name": "mine", "max_concurrent_trials": "1", "name": "mine",
    "workers": "4", "checkpoint_every_steps": "5", "preemption_check_steps": "5", "max_preemption_failures": "3",
    "async_upload": "false", "max_worker_batch": "8", "resize_check_seconds": "5",
}  # fmt: skip


@pytest.mark.parametrize("section, key", [(s, k) for s, keys in EXECUTION_KEYS.items() for k in keys])
def test_how_and_where_trials_run_does_not_rename_the_sweep(section, key):
    override = f"{section}.{key}={EXECUTION_OVERRIDES[key]}"
    changed = getattr(params_module.load(REPO / "params.yaml", [override]), section)
    assert getattr(changed, key) != getattr(getattr(params_module.load(REPO / "params.yaml"), section), key)
    assert name_with(override) == name_with()


def test_the_grid_varies_depth_and_shortcut_so_they_do_not_rename_it_but_the_data_does():
    assert name_with("model.depth=56", "model.shortcut=C") == name_with()
    assert name_with(manifest_sha="b" * 64) != name_with()
    assert name_with() == name_with() and name_with().startswith("sweep-")


def test_the_sweep_name_is_the_same_for_the_same_experiment_however_its_params_were_given():
    # The order of the overrides, and a value given as params.yaml already has it, change nothing.
    a = name_with("train.lr=0.05", "train.epochs=3")
    assert (
        a
        == name_with("train.epochs=3", "train.lr=0.05")
        == name_with("train.lr=0.05", "train.epochs=3", "train.seed=0")
    )
    assert re.fullmatch(r"sweep-[0-9a-f]{8}", a)  # a Ray storage folder and an MLflow run name
    # The paths, the data section (the manifest stands for the data) and MLflow's names are no part of it.
    assert name_with("paths.reports=/elsewhere", "paths.ray_storage=/tmp/ray", "mlflow.experiment=other") == name_with()


def test_a_trials_params_are_the_sweeps_but_for_depth_shortcut_and_run_name():
    sweep_params = params_module.load(REPO / "params.yaml", ["train.lr=0.05", "model.bottleneck=v1.5"])
    before = sweep_params.model_dump(mode="json")
    trial = tune.trial_params(sweep_params, Trial("cifar", 56, "none"), "sweep-x-plain-56")
    assert sweep_params.model_dump(mode="json") == before  # the sweep's params are left as they were
    expected = copy.deepcopy(before)
    expected["model"] |= {"depth": 56, "shortcut": "none"}
    expected["train"]["run_name"] = "sweep-x-plain-56"
    assert trial.model_dump(mode="json") == expected
    assert isinstance(trial, params_module.Params)


def test_a_tune_config_names_its_trial_and_carries_the_sweeps_setup(tmp_path):
    setup = sweep_setup(make_params(tmp_path))
    trial, carried = tune.trial_of({"depth": 56, "shortcut": "B", "sweep": setup.model_dump(mode="json")})
    assert trial == Trial("cifar", 56, "B") and carried == setup


def test_the_console_table_has_a_row_a_trial_and_names_a_failure():
    table = tune.format_table([finished_trial(20, "A", 0.02, 0.05), failed_trial(56, "B")]).splitlines()
    assert table[0].split()[:2] == ["trial", "params"] and len(table) == 4
    assert table[2].split()[:2] == ["ResNet-20", "A"] and "5.00%" in table[2] and "2.00%" in table[2]
    assert table[3].split()[:3] == ["ResNet-56", "B", "failed:"]


def test_the_console_table_aligns_its_columns_and_gives_a_failures_cause_and_its_traceback_file():
    trials = [finished_trial(20, "none", 0.5, 0.55), finished_trial(110, "C", 0.0, 0.0123, num_params=1_734_000)]
    header, rule, *rows = tune.format_table([*trials, failed_trial(56, "A")]).splitlines()
    assert len(header) == len(rule) == len(rows[0]) == len(rows[1]) and set(rule) == {"-"}
    assert rows[1].split() == ["ResNet-110", "C", "1,734,000", "1.23%", "0.00%", "1.23%", "4", "12", "s", "3", "s", "50%", "0"]
    # Right-aligned: each finished row's cells end where the header's columns end.
    assert rows[0].index("plain-20") + len("plain-20") == header.index("trial") + len("trial")
    assert rows[2].endswith("failed: RayTaskError: worker died (traceback: /ray/sweep/trial-56-A/error.txt)")


def test_a_trials_times_reach_its_mlflow_run_wall_and_what_its_epochs_did_not_take(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.Store(uri, budget_s=10)
    experiment = tracking.experiment_id(client, "resnet")
    trial = Trial("cifar", 20, "A")
    run_id = client.create_run(experiment, tags={tracking.RUN_NAME_TAG: trial.run_name("sweep-1")}).info.run_id
    config = {"depth": 20, "shortcut": "A", "sweep": sweep_setup(make_params(tmp_path), "sweep-1").model_dump(mode="json")}
    times, tune_trial = tune.TrialTimes(client, experiment, "sweep-1"), SimpleNamespace(trial_id="t1", config=config)
    times.clock = iter([100.0, 130.5]).__next__  # the driver's clock at the trial's start and end
    times.on_trial_start(0, [], tune_trial)
    for seconds in (10.0, 12.0):
        times.on_trial_result(0, [], tune_trial, {"epoch_time_s": seconds, "val_top1_error": 0.1})
    times.on_trial_result(0, [], tune_trial, {"done": True})  # Tune's own final result has no epoch
    times.on_trial_complete(0, [], tune_trial)
    assert client.get_run(run_id).data.metrics == {"wall_time_s": 30.5, "overhead_s": 8.5}


def test_the_driver_completes_a_trial_run_its_trial_could_not_from_the_trials_checkpoints(tmp_path):
    """A trial whose store stayed away as it ended left MLflow without its last epochs, its best
    checkpoint and its status; the sweep's driver writes them, each epoch once."""
    store = tracking.Store(f"sqlite:///{tmp_path}/mlflow.db", budget_s=10)
    run_id = store.create_run(tracking.experiment_id(store, "resnet")).info.run_id
    errors = [0.5, 0.2, 0.2, 0.3]
    losses = [1.0, 0.6, 0.4, 0.7]  # epochs 1 and 2 tie on error; 2 has the lower loss
    history = [
        EpochMetrics(
            epoch=e, train_loss=1.0 - e / 10, train_top1_error=0.1, val_top1_error=errors[e], val_top5_error=0.0,
            val_loss=losses[e], lr=0.1, images_per_s=100.0, epoch_time_s=1.0, world_size=1, steps_s=1.0, goodput=0.5, redone_steps=0,
        )
        for e in range(4)
    ]  # fmt: skip
    net = checkpoints.ModelArgs(name="cifar_resnet8", shortcut="A", num_classes=10, bottleneck="v1", zero_init_residual=False)
    rows = []
    for epoch in range(4):
        folder = tmp_path / f"checkpoint_{epoch}"
        folder.mkdir()
        state = checkpoints.CheckpointState(
            model_args=net, model={}, optimizer={}, schedule={}, epoch=epoch, history=history[: epoch + 1], mean=[0.5] * 3
        )
        checkpoints.save(folder, state)
        rows.append({**history[epoch].model_dump(), "checkpoint_path": str(folder), "trial_id": "t1"})
    rows.append({**history[3].model_dump(), "checkpoint_path": None})  # a resumed trial's report again, without one
    for entry in history[:2]:  # what the trial wrote before its store went away
        store.log_batch(run_id, metrics=tracking.epoch_metrics(entry.epoch, entry.model_dump(exclude={"epoch"}), 0))

    tune.complete_trial_run(store, run_id, rows, None)
    tune.complete_trial_run(store, run_id, rows, None)  # a rerun finds nothing left to write

    run = store.get_run(run_id)
    assert (run.info.status, run.data.tags["best_checkpoint"]) == ("FINISHED", str(tmp_path / "checkpoint_2"))
    assert [m.step for m in store.get_metric_history(run_id, "val_loss")] == [0, 1, 2, 3]


# Trials that start at once on a new store: each opens its MLflow run (tune.open_trial_run) in a
# process of its own, all released by one barrier, as Tune starts them. Forked, so that no
# process but the trials' touches the store (the test's own process never opens it).
TRIALS_AT_ONCE = 4


SHORTCUTS_AT_ONCE = ["none", "A", "B", "C"]


def sweep_setup(params, name: str = "sweep-x") -> tune.SweepSetup:
    return tune.SweepSetup(
        params=params, sweep=name, tracking_uri=params.mlflow.tracking_uri, parent_run_id="p",
        manifest_sha256="0" * 64, data_source="digits", git_commit="test", num_classes=10,
    )  # fmt: skip


def open_trial_when_released(trial: Trial, setup: tune.SweepSetup, barrier, results) -> None:
    barrier.wait()
    try:
        tune.open_trial_run(trial, setup)
        results.put((trial.key, "opened"))
    except Exception as e:  # noqa: BLE001 (the test reports whichever failed, and how)
        results.put((trial.key, tracking.one_line(e)))


def sweep_config(params, name: str, log_dataset_first: bool, results) -> None:
    """The sweep's driver, up to where Tune starts the trials; or, without the dataset made
    first, what the sweep did before (so the trials race to make it, and `Store` must cope)."""
    manifest = read_manifest(params.paths.shards)
    sha = tracking.manifest_sha256(params.paths.shards)
    if log_dataset_first:
        results.put(tune.open_sweep_run(params, manifest, sha, name)[1])
        return
    store = tracking.store(params)
    parent = tracking.start_or_resume_run(store, params, name, {}, commit="test", source="pipeline.tune")
    setup = sweep_setup(params, name).model_copy(
        update={"tracking_uri": store.uri, "parent_run_id": parent, "manifest_sha256": sha, "data_source": manifest.source}
    )
    results.put(setup)


@pytest.mark.parametrize("log_dataset_first", [True, False], ids=["as-the-sweep-does", "racing-for-the-dataset"])
@pytest.mark.parametrize("attempt", attempts(5))
def test_trials_that_start_at_once_on_a_new_store_all_open_their_runs(
    tmp_path, digit_shards, log_dataset_first, attempt
):
    fork = multiprocessing.get_context("fork")
    params = make_params(
        tmp_path, f"paths.shards={digit_shards}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'new.db'}", "model.depth=8"
    )
    results = fork.Queue()
    driver = fork.Process(target=sweep_config, args=(params, f"sweep-{attempt}", log_dataset_first, results))
    driver.start()
    setup = results.get(timeout=120)
    driver.join()
    barrier = fork.Barrier(len(SHORTCUTS_AT_ONCE))
    trials = [
        fork.Process(target=open_trial_when_released, args=(Trial("cifar", 8, shortcut), setup, barrier, results))
        for shortcut in SHORTCUTS_AT_ONCE
    ]
    for trial in trials:
        trial.start()
    outcomes = dict(results.get(timeout=120) for _ in trials)
    for trial in trials:
        trial.join()
    assert outcomes == {Trial("cifar", 8, s).key: "opened" for s in SHORTCUTS_AT_ONCE}
    store = tracking.Store(setup.tracking_uri, budget_s=10)
    runs = store.search_runs([store.get_experiment_by_name("resnet").experiment_id])
    assert len(runs) == len(SHORTCUTS_AT_ONCE) + 1  # the trials' and the sweep's, each once
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == setup.parent_run_id]
    assert [len(r.inputs.dataset_inputs) for r in trial_runs] == [1] * len(SHORTCUTS_AT_ONCE)
    assert {(i.dataset.name, i.dataset.digest) for r in runs for i in r.inputs.dataset_inputs} == {
        ("digits-shards", setup.manifest_sha256[:36])
    }
