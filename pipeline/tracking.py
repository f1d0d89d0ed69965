"""MLflow: where runs go, the one door every call to it goes through (`Store`, which retries
what a store that races or goes away makes fail), and the one run each training run writes
into (resumes included)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
import requests
import sqlalchemy.engine
import sqlalchemy.exc
from filelock import FileLock
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient  # only here: everything else asks a Store
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

from pipeline.errors import TrackingUnavailable
from pipeline.files import open_url, project_path
from pipeline.manifest import MANIFEST
from pipeline.params import Params
from pipeline.records import METRIC, RESTART_REDONE_S, RESTART_REDONE_STEPS, TRAINED_STEPS, EpochMetrics

T = TypeVar("T")

# MLflow's limits: a param value's length (longer is refused), params per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100

RUN_NAME_TAG = "pipeline.run_name"


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI wins over params; a relative SQLite path becomes absolute, in the
    project's folder (`files.project_path`), so that training workers in other directories, and
    DVC's queued experiments in a temporary copy, write to the project's one store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + project_path(uri[len(prefix) :])
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


# The retry schedule: waits double from FIRST_WAIT_S up to MAX_WAIT_S, for as long as
# `mlflow.retry_seconds` allows. A store that comes back is noticed within MAX_WAIT_S.
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0

# MLflow's HTTP client retries on its own (7 attempts over about 2 minutes, a warning line per
# attempt) and waits up to 120 s for an answer. The Store's schedule replaces the first, so that
# one schedule with one pair of outage lines covers every store; the second is cut to a minute,
# so that a server that hangs rather than refuses is retried sooner (a model's upload to the
# server fits in it on any link of 20 Mbit/s or more). Either can still be set in the environment.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}

# Calls that may run twice without doing anything twice: MLflow checks for the dataset, then
# inserts it, so two runs logging the same new dataset at once can collide on its unique key;
# the second attempt finds it.
IDEMPOTENT_CALLS = {"log_inputs"}

# The SQL store's words for a database that is busy or gone for a moment.
SQL_BUSY = ("database is locked", "database is busy", "could not connect", "connection refused", "server closed")


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def root_cause(error: BaseException) -> BaseException:
    """What went wrong at the bottom (ConnectionRefusedError, not MLflow's wrapper of a wrapper)."""
    return list(causes(error))[-1]


def causes(error: BaseException):
    """The error and what it was raised from or during (MLflow wraps the HTTP client's errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# What the HTTP client raises when the store does not answer: refused, reset or timed out, or gone
# in the middle of its answer (a server killed while it sends: "Connection broken: IncompleteRead",
# which requests raises as ChunkedEncodingError).
STORE_AWAY = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    ConnectionError,
)


def failure_kind(error: BaseException, idempotent: bool) -> str | None:
    """ "outage" (the store does not answer), "busy" (it answers, but a concurrent writer was in the
    way: retried without a word), or None (a real error: raised at once)."""
    chain = list(causes(error))
    if any(isinstance(c, STORE_AWAY) for c in chain):
        return "outage"  # however MLflow wrapped it
    for cause in chain:
        if isinstance(cause, sqlalchemy.exc.IntegrityError | sqlite3.IntegrityError):
            return "busy" if idempotent else None
        if isinstance(cause, sqlalchemy.exc.OperationalError | sqlite3.OperationalError):
            return "busy" if any(word in str(cause).lower() for word in SQL_BUSY) else None
        if isinstance(cause, MlflowException):
            message = str(cause)
            if re.search(r"failed with error code (429|50[0234])\b", message):
                return "outage"  # an HTTP answer, but from a proxy or a server that cannot serve now
            if cause.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"):
                return "outage"
            if any(word in message.lower() for word in SQL_BUSY):
                return "busy"  # a server whose own database was busy
    return None


def stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def new_client(uri: str) -> MlflowClient:
    """An MlflowClient of uri. The first client of a new SQLite file creates MLflow's tables, and
    MLflow's tracking store does so unlocked: of two stages started at once on a new file, one
    failed ("table ... already exists", or a CircularDependencyError). So the clients of one
    SQLite file are made one at a time, under a lock in the temporary folder (none beside the
    user's store)."""
    if not uri.startswith("sqlite:"):
        return MlflowClient(tracking_uri=uri)  # a server creates its tables when it starts
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"resnet-pipeline-mlflow-{digest}.lock"):
        refresh_query_statistics(sqlalchemy.engine.make_url(uri).database)  # before MLflow connects
        return MlflowClient(tracking_uri=uri)  # creates the tracking store, and so the tables


# Rows ANALYZE samples per index: its cost stays a few milliseconds however large the store grows.
ANALYSIS_LIMIT = 1000


def refresh_query_statistics(database: str | None) -> None:
    """Bring SQLite's statistics of the store's metrics table up to date (a sampled ANALYZE).

    Without them, SQLite reads a run's metric history (`WHERE run_uuid = ? AND key = ?`) through
    the primary key, which starts with the metric's name, and so goes through that metric's rows
    of every run in the store: 0.9 ms with 10 runs, 1.7 ms with 1,000 (`python -m
    benchmarks.scale --only registry`), a time that grows with the store. With statistics it
    takes MLflow's index on (run_uuid, key, step), in the same time whatever the store holds.
    Statistics gathered while the store was small lead the planner the old way, so each new
    client gathers them afresh, before its first connection, which reads them once. Only the
    metrics table's: with statistics of the runs and tags tables, SQLite finds a run by its name
    tag more slowly. They only steer the planner: a store too busy or read-only to take them, or
    one not made yet, is read as before."""
    if not database or not Path(database).is_file():
        return  # in memory, or made by MLflow in a moment
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=1)) as db:
            db.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
            db.execute("ANALYZE metrics")
            db.commit()
    except sqlite3.OperationalError:
        pass


class Store:
    """The project's one door to MLflow: every call a stage, trial or worker makes goes through
    `call` (or through an MlflowClient method of the same name, which `call`s it), and so through
    one retry schedule.

    A call that fails because the store is away (connection refused or reset, a timeout, HTTP
    429/5xx) or busy (SQLite locked, a create that raced another writer's) is tried again after
    waits of 1, 2, 4 ... 30 s, until it succeeds or the store has been away `budget_s` seconds:
    then `TrackingUnavailable`. Other errors are raised at once. An outage prints one line when
    it starts and one when it ends, however many calls and retries it spans."""

    def __init__(self, uri: str, budget_s: float, say: Callable[[str], None] = stdout_line):
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)  # read by MLflow at each request; see MLFLOW_HTTP_DEFAULTS
        self.uri, self.budget_s, self.say = uri, budget_s, say
        self._client = new_client(uri)
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def __reduce__(self):
        # Tune saves its callbacks with the sweep's state: a Store travels as what makes it.
        return Store, (self.uri, self.budget_s, self.say)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)  # not the client's: copy and pickle ask before __init__ has run
        method = getattr(self._client, name)
        return RetriedMethod(self, method) if callable(method) else method

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs), retried while the store is away or busy, for up to budget_s."""
        return self.call_while(lambda waited: waited < self.budget_s, fn, *args, **kwargs)

    def call_while(self, keep_trying: Callable[[float], bool], fn: Callable[..., T], *args, **kwargs) -> T:
        """`call`, retried for as long as keep_trying(seconds since the first failure) says."""
        fn = getattr(fn, "unretried", fn)  # store.log_batch passed in: retried here, not twice over
        idempotent = getattr(fn, "__name__", "") in IDEMPOTENT_CALLS
        wait, first_failure = FIRST_WAIT_S, None
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as error:
                kind = failure_kind(error, idempotent)
                if kind is None:
                    raise
                now = time.monotonic()
                first_failure = first_failure or now
                if kind == "outage":
                    self._outage_began(error)
                if not keep_trying(now - first_failure):
                    raise TrackingUnavailable(
                        f"MLflow at {redacted(self.uri)} did not answer for {now - first_failure:.0f} s "
                        f"({one_line(root_cause(error))})"
                    ) from error
                time.sleep(wait)
                wait = min(2 * wait, MAX_WAIT_S)
                continue
            self._outage_ended()
            return result

    def _outage_began(self, error: BaseException) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.say(
                    f"MLflow at {redacted(self.uri)} is not answering ({one_line(root_cause(error))}); retrying for up to "
                    f"{self.budget_s:.0f} s, and training goes on"
                )

    def _outage_ended(self) -> None:
        with self._lock:
            if self._down_since is not None:
                self.say(
                    f"MLflow at {redacted(self.uri)} answers again after {time.monotonic() - self._down_since:.0f} s"
                )
                self._down_since = None

    def best_effort(self, fn: Callable[..., T], *args, **kwargs) -> T | None:
        """`call`, but a store that stays away costs one line, not the run: for records that a
        rerun writes again (a run's end time, its status)."""
        try:
            return self.call(fn, *args, **kwargs)
        except TrackingUnavailable as e:
            self.say(f"not recorded in MLflow: {getattr(fn, '__name__', fn)} ({e})")
            return None


class RetriedMethod:
    """An MlflowClient method called through its Store's retries (`store.get_run(...)`)."""

    def __init__(self, store: Store, unretried: Callable):
        self.store, self.unretried = store, unretried
        self.__name__ = unretried.__name__

    def __call__(self, *args, **kwargs):
        return self.store.call(self.unretried, *args, **kwargs)


def store(params: Params, say: Callable[[str], None] = stdout_line) -> Store:
    return Store(tracking_uri(params), params.mlflow.retry_seconds, say)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts (the registry's models among them): for a
    store in a local file, the project's mlruns/ (`files.project_path`), as MLflow's default
    would be from the project's folder, but not inside a DVC experiment's temporary copy, which
    is deleted with them; a server decides for itself (None)."""
    return Path(project_path("mlruns")).as_uri() if uri.startswith(("sqlite:", "file:", "/", ".")) else None


def experiment_id(store: Store, name: str) -> str:
    """The experiment's id, made if missing. Another process may make it between the look and
    the make: then it is there to find."""
    experiment = store.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return store.create_experiment(name, artifact_location=artifact_location(store.uri))
    except MlflowException:
        experiment = store.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(tree: dict[str, object], prefix: str = "") -> dict[str, str]:
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
    with open_url(f"{shards.rstrip('/')}/{MANIFEST}", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def quoted(value: str) -> str:
    """`value` as a string in an MLflow search filter. The filter grammar has no escapes: a string
    is whatever stands between two single or two double quotes, so it takes the quote that
    `value` does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} cannot be quoted in an MLflow search filter: it holds both ' and \"")


def find_run(store: Store, experiment: str, run_name: str) -> str | None:
    if not ("'" in run_name and '"' in run_name):
        runs = store.search_runs([experiment], f"tags.`{RUN_NAME_TAG}` = {quoted(run_name)}", max_results=1)
        return runs[0].info.run_id if runs else None
    # A name with both quotes cannot be written in a filter. LIKE, with the one-character wildcard
    # in place of each quote (and of each backslash: LIKE's escape character on PostgreSQL and
    # MySQL), finds every run that could bear the name; the exact name then picks the one.
    pattern = "".join("_" if c in "'\"\\" else c for c in run_name)
    page_token = None
    while True:
        page = store.search_runs([experiment], f"tags.`{RUN_NAME_TAG}` LIKE '{pattern}'", page_token=page_token)
        for run in page:
            if run.data.tags.get(RUN_NAME_TAG) == run_name:
                return run.info.run_id
        page_token = page.token
        if not page_token:
            return None


def start_or_resume_run(
    store: Store,
    params: Params,
    run_name: str,
    extra_params: dict[str, str | int],
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
    experiment = experiment_id(store, params.mlflow.experiment)
    existing = find_run(store, experiment, run_name)
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
    run = store.create_run(experiment, run_name=display_name or run_name, tags=tags)
    config = {k: v for k, v in flatten(params.model_dump(mode="json")).items() if k not in omit}
    values = {**config, **{k: str(v) for k, v in extra_params.items()}}
    # Params are readable by everyone with access to the experiment, a password is not for them.
    values["mlflow.tracking_uri"] = redacted(params.mlflow.tracking_uri)
    items = [Param(k, v[:MAX_PARAM_VALUE]) for k, v in sorted(values.items())]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        store.log_batch(run.info.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    return run.info.run_id


def log_shards_input(store: Store, run_id: str, shards: str, manifest_sha: str, source: str) -> None:
    """The run's training data on its MLflow page (the Datasets column): the shards' location,
    with the manifest's sha256 as digest (cut to the 36 characters MLflow stores; the run's
    `manifest_sha256` param has it whole). Logging it again, on a resume, adds nothing.

    The dataset itself is one row per experiment, made by the first run that logs it: a sweep
    logs it on its own run before any trial starts, so that its trials, which start at once,
    only link to it (two first loggers race on its unique key: then `Store` tries again)."""
    with warnings.catch_warnings():
        # MLflow registers its local-files source under two names, then warns that a local path
        # "can be interpreted in multiple ways": the two are the same class.
        warnings.simplefilter("ignore", UserWarning)
        location = resolve_dataset_source(shards)
    dataset = MetaDataset(location, name=f"{source}-shards", digest=manifest_sha[:MAX_DATASET_DIGEST_SIZE])
    context = InputTag(MLFLOW_DATASET_CONTEXT, "training")
    store.log_inputs(run_id, [DatasetInput(Dataset(**dataset.to_dict()), [context])])


def epoch_metrics(epoch: int, metrics: dict[str, float], timestamp_ms: int) -> list[Metric]:
    return [Metric(key, float(value), timestamp_ms, epoch) for key, value in metrics.items()]


@contextlib.contextmanager
def fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.start_run`, `log_model`, `register_model`, ...) pointed at
    `uri` for a while. `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in this process's
    environment, which `tracking_uri` reads as the user's choice: it is put back as it was, so a
    later run in the same process (a notebook, a test, a benchmark) records where its params say."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset, as it was


def has_logged_model(store: Store, run_id: str) -> bool:
    run = store.get_run(run_id)
    with fluent(store.uri):
        models = store.call(
            mlflow.search_logged_models,
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = {quoted(run_id)}",
            output_format="list",
        )
    return bool(models)


def ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 8] -> "4..6, 9" (epochs counted from 1, as the console shows them)."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a + 1}" if a == b else f"{a + 1}..{b + 1}" for a, b in spans)


@dataclass
class Restart:
    """A run that starts again from a checkpoint (`run_steps` steps that count, taken at
    `saved_at`; None: from no checkpoint, the run's start), and what to do with the work it
    lost once the writer has read it (`counted(steps, seconds)`)."""

    run_steps: int
    saved_at: float | None
    counted: Callable[[int, float], None]


class RunWriter:
    """A training run's MLflow records, written by a thread of its own, so that the training
    step never waits on the store: `log_epoch` queues and returns. While the store is away the
    epochs wait in the queue (and in the checkpoint's history, whatever happens to this
    process); the thread retries with `Store`'s schedule, without giving up, until `close`.

    The thread first reads which epochs MLflow has (a resumed run's earlier attempt may have
    written some), so an epoch is written once, whatever the restarts. `close` waits for the
    queue to drain while the store's outage is shorter than its budget, and returns the epochs
    MLflow still lacks, which the same command writes when rerun (the checkpoint has them)."""

    STOP = None
    MARK_EVERY_S = 1.0

    def __init__(
        self,
        store: Store,
        run_id: str,
        tags: dict[str, str],
        system_metrics: bool = True,
        restart: Restart | None = None,
    ):
        self.store, self.run_id, self.restart = store, run_id, restart
        self.pending: queue.Queue[tuple[int, list[Metric]] | None] = queue.Queue()
        self.closing = threading.Event()
        self.unwritten: list[int] = []
        self.monitor: SystemMetricsMonitor | None = None
        self.reached: tuple[int, float] | None = None  # the latest `mark`
        self.marked: tuple[int, float] | None = None  # the latest written
        self.thread = threading.Thread(
            target=self._write, args=(tags, system_metrics), daemon=True, name="mlflow-writer"
        )
        self.thread.start()

    def log_epoch(self, metrics: EpochMetrics) -> None:
        self.pending.put((metrics.epoch, epoch_metrics(metrics.epoch, metrics.model_dump(), int(time.time() * 1000))))

    def mark(self, run_steps: int) -> None:
        """The run has trained `run_steps` steps that count. The latest is written at most every
        MARK_EVERY_S (TRAINED_STEPS): what a restart reads to tell how many it trains again."""
        self.reached = (run_steps, time.time())

    def waiting(self) -> int:
        """Epochs queued and not yet written: more than one while the store is away."""
        return self.pending.qsize()

    def close(self) -> list[int]:
        """Wait for what is queued to be written; the epochs MLflow lacks after all."""
        self.closing.set()
        self.pending.put(self.STOP)
        self.thread.join()
        return sorted(self.unwritten)

    def _keep_trying(self, waited: float) -> bool:
        return not self.closing.is_set() or waited < self.store.budget_s

    def _write(self, tags: dict[str, str], system_metrics: bool) -> None:
        try:
            logged = {
                m.step
                for m in self.store.call_while(self._keep_trying, self.store.get_metric_history, self.run_id, METRIC)
            }
            self.store.call_while(self._keep_trying, self.store.update_run, self.run_id, status="RUNNING")
            tags_logged = [RunTag(k, str(v)) for k, v in tags.items()]
            self.store.call_while(self._keep_trying, self.store.log_batch, self.run_id, tags=tags_logged)
            if system_metrics:
                self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.store.uri)
                self.monitor.start()
            if self.restart is not None:
                self._account(self.restart)
        except TrackingUnavailable:
            logged = None
        while True:
            try:
                item = self.pending.get(timeout=self.MARK_EVERY_S)
            except queue.Empty:
                item = ()
            if logged is not None and self.reached != self.marked:
                logged = self._log(logged, self._mark_metrics())
            if item is self.STOP:
                break
            if not item:
                continue
            epoch, metrics = item
            if logged is None:
                self.unwritten.append(epoch)
            elif epoch not in logged:
                logged = self._log(logged, metrics)
                if logged is not None:
                    logged.add(epoch)
                else:
                    self.unwritten.append(epoch)
        if self.monitor is not None:
            self.monitor.finish()

    def _log(self, logged: set[int], metrics: list[Metric]) -> set[int] | None:
        """Write `metrics`; None once the store has stayed away past its budget (the rest wait for a rerun)."""
        try:
            self.store.call_while(self._keep_trying, self.store.log_batch, self.run_id, metrics=metrics)
            return logged
        except TrackingUnavailable:
            return None

    def _mark_metrics(self) -> list[Metric]:
        self.marked = self.reached
        steps, when = self.reached
        return [Metric(TRAINED_STEPS, float(steps), int(when * 1000), steps)]

    def _account(self, restart: Restart) -> None:
        """This start's lost work: the steps an earlier attempt marked past the checkpoint this
        one resumes from, and the seconds they took, logged per restart (step: its number)."""
        marks = self.store.call_while(self._keep_trying, self.store.get_metric_history, self.run_id, TRAINED_STEPS)
        if not marks:
            return  # no earlier attempt trained a step that was marked
        reached = max(marks, key=lambda m: m.step)
        since = restart.saved_at
        if since is None:
            since = self.store.call_while(self._keep_trying, self.store.get_run, self.run_id).info.start_time / 1000
        redone_steps = max(reached.step - restart.run_steps, 0)
        redone_s = max(reached.timestamp / 1000 - since, 0.0) if redone_steps else 0.0
        number = len(
            self.store.call_while(self._keep_trying, self.store.get_metric_history, self.run_id, RESTART_REDONE_STEPS)
        )
        now = int(time.time() * 1000)
        restart_metrics = [
            Metric(RESTART_REDONE_STEPS, redone_steps, now, number),
            Metric(RESTART_REDONE_S, redone_s, now, number),
        ]
        self.store.call_while(self._keep_trying, self.store.log_batch, self.run_id, metrics=restart_metrics)
        restart.counted(redone_steps, redone_s)
