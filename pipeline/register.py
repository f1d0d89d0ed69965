"""Stage `register`: the sweep's best model becomes a new version in the MLflow Model Registry.

    python -m pipeline.register [--params params.yaml]

The model (`pipeline.serving`: encoded images in, classes out, the pt2 network inside) is logged
into the best trial's MLflow run at its best epoch, so the logged model carries that epoch's
metrics and the test figures, and registered as a new version of `mlflow.registered_model`, with
tags a person or a script can filter on and a description a person can read in the UI. The
trial's run keeps its start and end times. The sweep's parent run gets the result: the best
trial, its val and test errors, and the registered version.

Two splits, two roles. The decision uses val, the split that already chose the trial's best
epoch and the best trial (`reports/sweep.json`); the test figures (`metrics/eval.json`, from a
split that chose nothing) are recorded, never compared, so the figure reported stays honest.
Tags: `val_top1_error`, `val_top5_error`, `val_loss` (the best epoch's) and `test_top1_error`,
`test_top5_error`; the description says which is which.

The alias `mlflow.alias` moves to the new version only when it beats the version holding the
alias, in this order (`pipeline.records.val_rank`):
1. the lower val top-1 error wins;
2. on equal val top-1 errors, the lower val cross-entropy loss at the best epoch wins (a few
   hundred val images can all be right: with the error alone, a champion at 0 errors could
   never be replaced);
3. equal on both: the champion keeps the alias.
Otherwise the new version stays registered without the alias, and the stage says so. A version
without these tags (registered by hand, or by another tool) ranks last.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from pipeline import artifacts, checkpoints, cli, serving, tracking
from pipeline.artifacts import Evaluation, Registration
from pipeline.errors import UsageError
from pipeline.images import Conversion
from pipeline.manifest import Manifest, read_manifest
from pipeline.params import Params
from pipeline.records import METRIC, TrialRecord, read_sweep, val_rank

VAL_ERROR_TAG = METRIC
VAL_LOSS_TAG = "val_loss"


def read_eval(metrics: str, trial: TrialRecord) -> Evaluation:
    """eval.json, checked to be the test figures of this trial's checkpoint."""
    path = Path(metrics) / Evaluation.FILE
    evaluation = artifacts.read(str(path), Evaluation)
    if evaluation.split != "test":
        raise UsageError(
            f"{path}: measured on the {evaluation.split!r} split, expected 'test'; rerun `python -m pipeline.evaluate`"
        )
    measured = (evaluation.mlflow_run_id, evaluation.checkpoint_name)
    best = (trial.mlflow_run_id, Path(trial.checkpoint).name)
    if measured != best:
        raise UsageError(
            f"{path}: figures of run {measured[0]} {measured[1]}, not of the sweep's best trial (run {best[0]} "
            f"{best[1]}); rerun `python -m pipeline.evaluate`"
        )
    return evaluation


def shards_dvc_hash() -> str:
    """The hash dvc.lock records for the shard stage's output, if the shards came from DVC."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return "unknown"
    outs = yaml.safe_load(lock.read_text()).get("stages", {}).get("shard", {}).get("outs", [])
    return next((o.get("md5", "unknown") for o in outs), "unknown")


def description(params: Params, trial: TrialRecord, evaluation: Evaluation, manifest: Manifest) -> str:
    setup = serving.setup_of(params.model.arch, manifest, Conversion.of(params.shard))
    kind = "plain" if trial.shortcut == "none" else f"residual, shortcut option {trial.shortcut}"
    return (
        f"{trial.trial.label}: a {trial.depth}-layer ResNet ({kind}) trained on the {manifest.source} shards.\n\n"
        f"Val (the split that chose its best epoch, its trial and whether it takes the alias): top-1 error "
        f"{trial.best_val_top1_error:.2%}, top-5 {trial.best_val_top5_error:.2%}, loss {trial.best_val_loss:.4f} on "
        f"{manifest.splits['val'].num_samples} images.\n"
        f"Test (a split that chose nothing: the figure to report): top-1 error {evaluation.top1_error:.2%}, "
        f"top-5 {evaluation.top5_error:.2%} on {evaluation.num_samples} images ({evaluation.crop} crop).\n\n"
        f"{setup.describe()}\n"
        f"Classes, in the order of `probabilities`: "
        f"{', '.join(manifest.classes[:10])}{' ...' if len(manifest.classes) > 10 else ''}."
    )


def version_rank(tags: dict[str, str]) -> tuple[float, float]:
    """A registered version's val_rank, from its tags; one without them ranks last."""
    return val_rank(float(tags.get(VAL_ERROR_TAG, "inf")), float(tags.get(VAL_LOSS_TAG, "nan")))


def champion_rank(store: tracking.Store, name: str, alias: str) -> tuple[str, tuple[float, float]] | None:
    """(version, its val_rank) of the version holding the alias; None when no version holds it."""
    try:
        version = store.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return version.version, version_rank(version.tags)


def decide(new: tuple[float, float], current: tuple[str, tuple[float, float]] | None) -> tuple[bool, str]:
    """(whether the new version takes the alias, why): the tie rule of the module's docstring."""
    if current is None:
        return True, "no version held it"
    version, (error, loss) = current
    new_error, new_loss = new
    if math.isinf(error) and not math.isinf(new_error):
        return True, f"version {version}, which held it, has no val figures"
    if new_error < error:
        return True, f"val top-1 error {new_error:.2%} beats version {version}'s {error:.2%}"
    if new_error > error:
        return False, f"its val top-1 error {new_error:.2%} does not beat version {version}'s {error:.2%}"
    shown = lambda value: "unrecorded" if math.isinf(value) else f"{value:.4g}"
    tie = f"its val top-1 error {new_error:.2%} ties version {version}'s, and its val loss {shown(new_loss)}"
    if new_loss < loss:
        return True, f"{tie} beats {shown(loss)}"
    return False, f"{tie} does not beat version {version}'s {shown(loss)}"


def settle_alias(store: tracking.Store, name: str, alias: str, version: str) -> tuple[bool, str]:
    """Move the alias to a newly registered version if it beats the version holding it, both
    ranked from their registry tags; (whether it moved, the stage's one-line verdict)."""
    moved, why = decide(version_rank(store.get_model_version(name, version).tags), champion_rank(store, name, alias))
    if moved:
        store.set_registered_model_alias(name, alias, version)
        return True, f"alias '{alias}' -> version {version} ({why})"
    return False, f"version {version} registered without the alias: {why}, which keeps '{alias}'"


@contextmanager
def keeping_times(store: tracking.Store, run_id: str):
    """Reopening a finished run (to log a model into it) moves its end time: put it back after,
    so the run's duration stays its training's."""
    info = store.get_run(run_id).info
    try:
        yield
    finally:
        store.set_terminated(run_id, info.status, end_time=info.end_time)


def log_model_unmoved(store: tracking.Store, trial: TrialRecord, params: Params, manifest: Manifest):
    """The trial's best checkpoint as the servable model, in the trial's run at its best epoch:
    MLflow copies the run's metrics of that step (train and val, and the test figures evaluate
    logged there) onto the logged model."""
    net = checkpoints.model_from_checkpoint(trial.checkpoint)
    with keeping_times(store, trial.mlflow_run_id), store.call(mlflow.start_run, run_id=trial.mlflow_run_id):
        return serving.log_run_model(store, net, params, manifest, step=trial.best_epoch)


def record_on_parent_run(store: tracking.Store, trial: TrialRecord, evaluation: Evaluation, model: str) -> None:
    """The sweep's result on the sweep's own run, the one a person opens first. (Metrics and tags
    do not reopen a run: its times stay.)"""
    child = store.get_run(trial.mlflow_run_id)
    parent = child.data.tags.get("mlflow.parentRunId")
    if parent is None:  # a run trained by `pipeline.train`, outside a sweep
        return
    for key, value in (("best_val_top1_error", trial.best_val_top1_error), ("test_top1_error", evaluation.top1_error)):
        store.log_metric(parent, key, value)
    summary = (
        f"Best trial: [{child.info.run_name}](#/experiments/{child.info.experiment_id}/runs/{child.info.run_id}), "
        f"val top-1 error {trial.best_val_top1_error:.2%} (it chose the trial), test top-1 error "
        f"{evaluation.top1_error:.2%}; registered as {model}."
    )
    for key, value in {
        "best_trial": child.info.run_name,
        "best_trial_run_id": child.info.run_id,
        "registered_model_version": model,
        "mlflow.note.content": summary,
    }.items():
        store.set_tag(parent, key, value)


def register(params: Params) -> Registration:
    trial = read_sweep(params.paths.reports).best_trial()
    evaluation = read_eval(params.paths.metrics, trial)
    manifest = read_manifest(params.paths.shards)
    store = tracking.store(params)
    name, alias = params.mlflow.registered_model, params.mlflow.alias
    tags = {
        "depth": str(trial.depth),
        "shortcut": trial.shortcut,
        VAL_ERROR_TAG: repr(trial.best_val_top1_error),
        "val_top5_error": repr(trial.best_val_top5_error),
        VAL_LOSS_TAG: repr(trial.best_val_loss),
        "test_top1_error": repr(evaluation.top1_error),
        "test_top5_error": repr(evaluation.top5_error),
        "manifest_sha256": tracking.manifest_sha256(params.paths.shards),
        "shards_dvc_md5": shards_dvc_hash(),
        "git_commit": tracking.git_commit(),
        "num_params": str(trial.num_params),
    }
    with tracking.fluent(store.uri):
        info = log_model_unmoved(store, trial, params, manifest)
        version = store.call(mlflow.register_model, info.model_uri, name, tags=tags)
    store.update_model_version(
        name, version.version, description=description(params, trial, evaluation, manifest)
    )
    record_on_parent_run(store, trial, evaluation, f"models:/{name}/{version.version}")

    moved, verdict = settle_alias(store, name, alias, str(version.version))
    champion = store.get_model_version_by_alias(name, alias)
    return Registration(
        registered_model=name,
        version=int(version.version),
        alias=alias,
        alias_moved=moved,
        champion_version=int(champion.version),
        val_top1_error=trial.best_val_top1_error,
        val_loss=trial.best_val_loss,
        test_top1_error=evaluation.top1_error,
        test_top5_error=evaluation.top5_error,
        model_uri=f"models:/{name}/{version.version}",
        message=verdict,
    )


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("register", "Register the sweep's best model in the MLflow Model Registry.", argv)
    result = register(params)
    print(f"registered {result.registered_model} version {result.version}: {result.message}")
    out = Path(params.paths.metrics) / Registration.FILE
    artifacts.write(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
