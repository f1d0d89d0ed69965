"""MLflow: where runs go, and the one run each training run writes into (resumes included)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import fsspec
import mlflow
import sqlalchemy.engine
import sqlalchemy.exc
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

from pipeline.manifest import MANIFEST
from pipeline.params import Params

# MLflow's limits: a param value's length (longer is refused), params per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100

RUN_NAME_TAG = "pipeline.run_name"


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params; a relative SQLite path becomes absolute, so that
    training workers in other directories write to the same file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def redacted(uri: str) -> str:
    """`uri` fit to print or log: any password in it becomes ***. For showing only: connect with
    `uri` as it is.

    The SQL store reads a database URI the SQLAlchemy way, where a password may hold an unescaped
    / ? or #; an HTTP client reads an http(s) URI the URL way, where it may hold an unescaped @.
    Whichever way a reader would find the password, it is hidden."""
    try:
        if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
            try:
                database = sqlalchemy.engine.make_url(uri)
            except (sqlalchemy.exc.ArgumentError, ValueError):
                database = None  # not a database URI
            if database is not None and database.password is not None:
                uri = database.render_as_string(hide_password=True)
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        # Unparseable (a broken IPv6 host): where a password would be is unknown, so show none of it.
        return uri.partition("://")[0] + "://***"
    if parts.password is None:
        return uri
    user_info, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user_info.partition(':')[0]}:***@{host}"))


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow: MlflowClient, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else mlflow.create_experiment(name)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def git_commit() -> str:
    """The commit of the code that runs: GIT_COMMIT when set (a Ray job's upload has no .git)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def manifest_sha256(shards: str) -> str:
    with fsspec.open(f"{shards.rstrip('/')}/{MANIFEST}", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def quoted(value: str) -> str:
    """`value` as a string in an MLflow search filter. The filter grammar has no escapes: a string
    is whatever stands between two single or two double quotes, so it takes the quote that
    `value` does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} cannot be quoted in an MLflow search filter: it holds both ' and \"")


def find_run(mlflow: MlflowClient, experiment: str, run_name: str) -> str | None:
    if not ("'" in run_name and '"' in run_name):
        runs = mlflow.search_runs([experiment], f"tags.`{RUN_NAME_TAG}` = {quoted(run_name)}", max_results=1)
        return runs[0].info.run_id if runs else None
    # A name with both quotes cannot be written in a filter. LIKE, with the one-character wildcard
    # in place of each quote (and of each backslash: LIKE's escape character on PostgreSQL and
    # MySQL), finds every run that could bear the name; the exact name then picks the one.
    pattern = "".join("_" if c in "'\"\\" else c for c in run_name)
    page_token = None
    while True:
        page = mlflow.search_runs([experiment], f"tags.`{RUN_NAME_TAG}` LIKE '{pattern}'", page_token=page_token)
        for run in page:
            if run.data.tags.get(RUN_NAME_TAG) == run_name:
                return run.info.run_id
        page_token = page.token
        if not page_token:
            return None


def start_or_resume_run(
    uri: str,
    params: Params,
    run_name: str,
    extra_params: dict[str, Any],
    commit: str,
    source: str,
    parent_run_id: str | None = None,
    display_name: str | None = None,
    omit: tuple[str, ...] = (),
) -> str:
    """The MLflow run of this training run: found by its name if an earlier attempt made it,
    else created with the resolved config as params (less the keys in `omit`), `source` (the
    command that made it, e.g. "pipeline.tune") and `commit`, the code's git commit, which the
    stage's driver reads (`git_commit`): Ray's workers and Tune's trials run in folders without
    the repository. (MLflow's UI shows the commit beside the source, and only with one.)"""
    mlflow_client = client(uri)
    experiment = experiment_id(mlflow_client, params.mlflow.experiment)
    existing = find_run(mlflow_client, experiment, run_name)
    if existing:
        return existing
    tags = {
        RUN_NAME_TAG: run_name,
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment, run_name=display_name or run_name, tags=tags)
    config = {k: v for k, v in flatten(params.model_dump(mode="json")).items() if k not in omit}
    values = {**config, **{k: str(v) for k, v in extra_params.items()}}
    # Params are readable by everyone with access to the experiment, a password is not for them.
    values["mlflow.tracking_uri"] = redacted(params.mlflow.tracking_uri)
    items = [Param(k, v[:MAX_PARAM_VALUE]) for k, v in sorted(values.items())]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mlflow_client.log_batch(run.info.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    return run.info.run_id


def log_shards_input(uri: str, run_id: str, shards: str, manifest_sha: str, source: str) -> None:
    """The run's training data on its MLflow page (the Datasets column): the shards' location,
    with the manifest's sha256 as digest (cut to the 36 characters MLflow stores; the run's
    `manifest_sha256` param has it whole). Logging it again, on a resume, adds nothing."""
    with warnings.catch_warnings():
        # MLflow registers its local-files source under two names, then warns that a local path
        # "can be interpreted in multiple ways": the two are the same class.
        warnings.simplefilter("ignore", UserWarning)
        location = resolve_dataset_source(shards)
    dataset = MetaDataset(location, name=f"{source}-shards", digest=manifest_sha[:MAX_DATASET_DIGEST_SIZE])
    context = InputTag(MLFLOW_DATASET_CONTEXT, "training")
    client(uri).log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [context])])


def logged_steps(mlflow: MlflowClient, run_id: str, key: str) -> set[int]:
    return {m.step for m in mlflow.get_metric_history(run_id, key)}


def log_epoch(mlflow: MlflowClient, run_id: str, epoch: int, metrics: dict[str, float], timestamp_ms: int) -> None:
    mlflow.log_batch(
        run_id,
        metrics=[Metric(key, float(value), timestamp_ms, epoch) for key, value in metrics.items()],
    )


def has_logged_model(uri: str, run_id: str) -> bool:
    mlflow.set_tracking_uri(uri)
    run = client(uri).get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = {quoted(run_id)}", output_format="list"
    )
    return bool(models)
