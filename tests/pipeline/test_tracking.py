"""pipeline.tracking: tracking URIs shown without their passwords, and runs found again by any
name, against a real MLflow store (SQLite)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import socket
import sqlite3
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipeline import cli, tracking
from pipeline import params as params_module
from tests.helpers import attempts


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("postgresql+psycopg2://mlflow:s3cret@db/mlflow?sslmode=require", "postgresql+psycopg2://mlflow:***@db/mlflow?sslmode=require"),
        ("mysql://mlflow:s3%40cret@db/mlflow", "mysql://mlflow:***@db/mlflow"),
        # Generated passwords hold / + =, which SQLAlchemy takes unescaped.
        ("postgresql://mlflow:s3/cr+et==@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("http://admin:s3cret@mlflow.example.com:5000", "http://admin:***@mlflow.example.com:5000"),
        ("https://admin:s3c@ret@mlflow.example.com/prefix", "https://admin:***@mlflow.example.com/prefix"),
        ("https://admin:s3cret@[::1/prefix", "https://***"),  # unparseable: nothing of it shown
    ],
)  # fmt: skip
def test_a_password_in_a_uri_is_hidden(uri, shown):
    assert tracking.redacted(uri) == shown
    assert "s3" not in tracking.redacted(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/mlflow.db",
        "file:///tmp/mlruns",
        "./mlruns",
        "/abs/mlruns",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com/prefix",
        "https://admin@mlflow.example.com",  # a user name alone is no secret
        "postgresql://mlflow@db/mlflow",
        "databricks",
    ],
)
def test_a_uri_without_a_password_is_shown_as_it_is(uri):
    assert tracking.redacted(uri) == uri


@pytest.mark.parametrize(
    ("value", "literal"),
    [("plain", "'plain'"), ("it's", '"it\'s"'), ('say "hi"', "'say \"hi\"'"), ("back\\slash", "'back\\slash'")],
)
def test_quoted_takes_the_quote_the_value_lacks(value, literal):
    assert tracking.quoted(value) == literal


def test_a_value_with_both_quotes_cannot_be_quoted():
    with pytest.raises(ValueError, match="both"):
        tracking.quoted('it\'s "it"')


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tracking.Store:
    return tracking.Store(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}", budget_s=10)


def params_for(repo, uri: str = "sqlite:///mlflow.db") -> params_module.Params:
    return params_module.load(repo / "params.yaml", [f"mlflow.tracking_uri={uri}"])


# Names that differ from one another only where a quote, a backslash or a LIKE wildcard stands,
# so a search that treats those as wildcards (or drops an escape) would mix them up.
NAMES = [
    "o'brien-run",
    'the "big" run',
    'it\'s the "big" one',
    "it\"s the 'big' one",
    "it_s the _big_ one",
    "both ' and \" and \\",
    "both \" and ' and \\",
    "50%_done'\"",
    "trailing backslash\\",
]


def test_runs_are_found_again_by_names_with_quotes(repo, store):
    params = params_for(repo)
    client = store
    experiment = tracking.experiment_id(client, params.mlflow.experiment)
    created = {
        name: tracking.start_or_resume_run(store, params, name, {}, commit="c0ffee", source="pipeline.train")
        for name in NAMES
    }
    assert len(set(created.values())) == len(NAMES)
    for name, run_id in created.items():
        assert tracking.find_run(client, experiment, name) == run_id, name
        assert client.get_run(run_id).data.tags[tracking.RUN_NAME_TAG] == name
        # A rerun of the same command resumes the run instead of making a second one.
        assert tracking.start_or_resume_run(store, params, name, {}, commit="c0ffee", source="pipeline.train") == run_id
    assert tracking.find_run(client, experiment, 'it\'s "not" there') is None
    assert tracking.find_run(client, experiment, "not there") is None


def test_the_logged_params_hold_no_password(repo, store):
    params = params_for(repo, "postgresql://mlflow:s3cret@db:5432/mlflow")
    run_id = tracking.start_or_resume_run(
        store, params, "params without a password", {"extra": 1}, commit="c0ffee", source="pipeline.train"
    )
    logged = store.get_run(run_id).data.params
    assert logged["mlflow.tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert logged["mlflow.experiment"] == params.mlflow.experiment and logged["extra"] == "1"
    assert not [key for key, value in logged.items() if "s3cret" in value]


def test_a_run_records_the_commit_it_is_given_and_leaves_out_the_omitted_params(repo, store):
    params = params_for(repo)
    run_id = tracking.start_or_resume_run(
        store,
        params,
        "a sweep",
        {"sweep": "a sweep"},
        commit="0123abcd",
        source="pipeline.tune",
        omit=("model.depth", "model.shortcut"),
    )
    run = store.get_run(run_id)
    assert (
        run.data.tags["mlflow.source.git.commit"] == "0123abcd"
        and run.data.tags["mlflow.source.name"] == "pipeline.tune"
    )
    assert "model.depth" not in run.data.params and "model.shortcut" not in run.data.params
    assert (
        run.data.params["tune.depths"] == str(params.tune.depths) and run.data.params["model.arch"] == params.model.arch
    )


def test_the_shards_are_the_runs_dataset_once_whatever_the_resumes(repo, store, tmp_path):
    params = params_for(repo)
    run_id = tracking.start_or_resume_run(store, params, "a training run", {}, commit="c0ffee", source="pipeline.train")
    sha = "ab" * 32
    for _ in range(2):  # a resumed run logs it again
        tracking.log_shards_input(store, run_id, str(tmp_path / "shards"), sha, "digits")
    inputs = store.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "digits-shards" and sha.startswith(dataset.digest) and len(dataset.digest) == 36
    assert json.loads(dataset.source) == {"uri": str(tmp_path / "shards")}
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "training")]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: a store that is away."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_store_that_stays_away_costs_one_line_and_fails_after_its_budget():
    said = []
    store = tracking.Store(f"http://127.0.0.1:{closed_port()}", budget_s=3, say=said.append)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=r"did not answer for [34] s \(ConnectionRefusedError"):
        store.get_run("0" * 32)
    assert 3 <= time.monotonic() - started < 3 + tracking.MAX_WAIT_S
    assert len(said) == 1 and "is not answering (ConnectionRefusedError" in said[0]  # and not a line a retry
    assert store.best_effort(store.set_terminated, "0" * 32) is None  # a record a rerun writes: one line, no raise
    assert len(said) == 2 and said[1].startswith("not recorded in MLflow: set_terminated")


def test_a_real_error_is_raised_at_once_without_a_word(store):
    said = []
    quiet = tracking.Store(store.uri, budget_s=30, say=said.append)
    started = time.monotonic()
    with pytest.raises(MlflowException, match="not found"):
        quiet.get_run("0" * 32)
    assert time.monotonic() - started < 1 and not said


def test_a_locked_sqlite_store_is_waited_out(tmp_path):
    """SQLite's writer lock held past the driver's own 5 s wait: the call retries until it is free."""
    uri = f"sqlite:///{tmp_path / 'locked.db'}"
    said = []
    store = tracking.Store(uri, budget_s=60, say=said.append)
    experiment = tracking.experiment_id(store, "resnet")
    holder = sqlite3.connect(tmp_path / "locked.db", check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    releaser = threading.Timer(6, holder.rollback)
    releaser.start()
    try:
        run = store.create_run(experiment)
    finally:
        releaser.join()
        holder.close()
    assert store.get_run(run.info.run_id).info.experiment_id == experiment
    assert not said  # busy is not an outage: nothing to say


def test_what_counts_as_transient():
    locked = sqlite3.OperationalError("database is locked")
    unique = sqlite3.IntegrityError("UNIQUE constraint failed: datasets.name")
    assert tracking.failure_kind(locked, idempotent=False) == "busy"
    assert tracking.failure_kind(unique, idempotent=True) == "busy"
    assert tracking.failure_kind(unique, idempotent=False) is None  # a second create would make a second record
    assert tracking.failure_kind(sqlite3.OperationalError("no such table: runs"), idempotent=False) is None
    assert (
        tracking.failure_kind(MlflowException("API request to x failed with error code 503 != 200"), False) == "outage"
    )
    assert tracking.failure_kind(MlflowException("API request to x failed with error code 404 != 200"), False) is None
    assert tracking.failure_kind(MlflowException("Run 'x' not found"), False) is None
    broken = requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")  # killed mid-answer
    assert tracking.failure_kind(mlflow_wrapped(broken), False) == "outage"
    assert tracking.failure_kind(mlflow_wrapped(ConnectionResetError(104, "reset by peer")), False) == "outage"


def mlflow_wrapped(error: Exception) -> MlflowException:
    """`error` as MLflow's HTTP client raises it: an MlflowException raised while handling it."""
    wrapped = MlflowException(f"API request to http://127.0.0.1:5000/x failed with exception {error}")
    wrapped.__context__ = error
    return wrapped


def test_a_store_pickles_as_what_makes_it(store):
    """Tune saves the sweep's callbacks, which hold one, with the sweep's state."""
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.uri, copy.budget_s) == (store.uri, store.budget_s)
    assert copy.get_experiment_by_name("no such experiment") is None


def test_missing_epochs_are_named_as_the_console_counts_them():
    assert tracking.ranges([3, 4, 5, 8]) == "4..6, 9"
    assert tracking.ranges([0]) == "1"


def test_a_stage_whose_store_stays_away_fails_with_one_line(capsys):
    """register and the like exist to write MLflow: past the retries they stop, and say so."""
    store = tracking.Store(f"http://127.0.0.1:{closed_port()}", budget_s=1, say=lambda line: None)
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: store.get_registered_model("resnet-digits"))
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: MLflow at {store.uri} did not answer for") and line.endswith("and rerun")


def open_store_at_once(uri: str, barrier) -> None:
    barrier.wait()  # every process at the same instant, as two stages started together
    tracking.Store(uri, budget_s=30).search_experiments()


@pytest.mark.parametrize("attempt", attempts(5))
def test_stages_that_open_a_new_sqlite_store_at_once_all_open_it(tmp_path, attempt):
    """The first client of a new SQLite file creates MLflow's tables: seen failing, without a
    lock, as "table ... already exists" or a CircularDependencyError in the process that lost."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("fork")  # MLflow is imported already: each starts at once
    barrier = context.Barrier(3)
    processes = [context.Process(target=open_store_at_once, args=(uri, barrier)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0]


def test_a_restart_reads_the_steps_an_earlier_attempt_trained_past_its_checkpoint_and_logs_them(store):
    """An attempt marks 10 steps, its last checkpoint was at 6: the next start finds 4 steps
    trained again, and the seconds from the checkpoint to the last mark; a second restart is
    logged as number 1. A run no attempt marked is no restart."""
    experiment = store.call(store.create_experiment, f"restarts-{time.time()}")
    run_id = store.call(store.create_run, experiment).info.run_id
    fresh = []
    tracking.RunWriter(
        store, run_id, {}, system_metrics=False, restart=tracking.Restart(0, None, lambda *a: fresh.append(a))
    ).close()
    assert fresh == []

    first = tracking.RunWriter(store, run_id, {}, system_metrics=False)
    saved_at = time.time()
    for steps in range(7, 11):
        first.mark(steps)
        time.sleep(0.3)
    first.close()
    reached = max(store.get_metric_history(run_id, "trained_steps"), key=lambda m: m.step)
    assert reached.step == 10

    counted = []
    restart = tracking.Restart(6, saved_at, lambda steps, seconds: counted.append((steps, seconds)))
    tracking.RunWriter(store, run_id, {}, system_metrics=False, restart=restart).close()
    assert counted == [(4, pytest.approx(reached.timestamp / 1000 - saved_at, abs=1e-3))]
    again = tracking.Restart(10, time.time(), lambda steps, seconds: counted.append((steps, seconds)))
    tracking.RunWriter(store, run_id, {}, system_metrics=False, restart=again).close()
    assert counted[1] == (0, 0.0)
    logged = store.get_metric_history(run_id, "restart_redone_steps")
    assert sorted((m.step, m.value) for m in logged) == [(0, 4.0), (1, 0.0)]


def test_the_fluent_api_leaves_the_process_environment_as_it_was(monkeypatch, tmp_path):
    """mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI, which the stages read as the user's
    choice: a second run in the same process went to the first one's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.fluent(f"sqlite:///{tmp_path / 'a.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'a.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    with tracking.fluent(f"sqlite:///{tmp_path / 'b.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///mine.db"


# The query MLflow's SQL store makes for a run's metric history (`get_metric_history`).
HISTORY_QUERY = "SELECT * FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY timestamp, step, value"


def history_plan_of_a_new_stage(uri: str, run_id: str) -> str:
    """How a stage's MLflow client, in a process of its own, reads a run's metric history."""
    store = tracking.Store(uri, budget_s=10)
    assert len(store.get_metric_history(run_id, "a")) == 5
    engine = store._client._tracking_client.store.engine  # MLflow's own connections
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {HISTORY_QUERY}", (run_id, "a")).fetchall()
    return " ".join(row[3] for row in rows)


def test_a_stage_reads_a_run_history_through_the_run_index_whatever_the_store_held_before(tmp_path):
    """Without statistics SQLite reads one run's history through the metric name's rows of every
    run (found growing with the store by benchmarks/scale.py), and with statistics taken when the
    store was small, too; each new client takes them afresh, before MLflow connects."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.Store(uri, budget_s=10)
    experiment = tracking.experiment_id(first, "resnet")

    def add_run():
        run = first.create_run(experiment)
        first.log_batch(run.info.run_id, metrics=[Metric(key, 0.5, 0, step) for key in ("a", "b") for step in range(5)])
        return run.info.run_id

    add_run()
    tracking.refresh_query_statistics(str(tmp_path / "mlflow.db"))  # the statistics of a store of one run
    run_ids = [add_run() for _ in range(40)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as stage:
        plan = stage.submit(history_plan_of_a_new_stage, uri, run_ids[-1]).result()
    assert "USING INDEX index_metrics_run_uuid_key_step (run_uuid=? AND key=?)" in plan, plan
