"""A run outlives its tracking store: a real `mlflow server` on 127.0.0.1, SIGKILLed in the
middle of a `pipeline.train` run and of a 2-trial sweep, started again on the same backend 90 s
later (or not until the runs are over: a run and a sweep then share the server, as a team's do).
Nothing is mocked: the stages run as a user runs them."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import files, shard
from pipeline.records import read_sweep
from tests.conftest import REPO, free_port, mlflow_answers
from tests.helpers import make_params

pytestmark = pytest.mark.slow

OUTAGE_S = 90
# Words of the lines that may speak of an outage: ours, and MLflow's and urllib3's own.
OUTAGE_WORDS = re.compile(r"not answering|answers again|Retrying|Connection refused|Max retries|did not answer")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over one SQLite backend, which outlives the process: it can
    be killed (SIGKILL, no goodbye) and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1",
        ]  # fmt: skip
        with (self.root / "server.log").open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if not mlflow_answers(self.url):
            raise RuntimeError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # the server and its workers, at once
        self.process.wait()


@pytest.fixture
def server(tmp_path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("outages")
    shard.shard(make_params(tmp))
    return tmp / "shards"


class Console:
    """A stage's console, read line by line as it comes, each line with when it came."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, line)) for _, line in self.lines) < count:
            assert self.process.poll() is None or self.reader.is_alive(), self.text()
            assert time.monotonic() < deadline, f"no {count} lines matching {pattern!r}:\n{self.text()}"
            time.sleep(0.2)

    def finish(self, timeout: float = 900) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def stage(name: str, tmp_path: Path, shards: Path, uri: str, *overrides: str) -> Console:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = uri
    sets = [
        f"paths.shards={shards}", f"paths.ray_storage={tmp_path / 'ray'}", f"paths.metrics={tmp_path / 'metrics'}",
        f"paths.reports={tmp_path / 'reports'}", "model.depth=8", "train.checkpoints_to_keep=1", *overrides,
    ]  # fmt: skip
    return Console([sys.executable, "-m", f"pipeline.{name}", *[a for s in sets for a in ("--set", s)]], env)


def epoch_history(uri: str, run_id: str) -> list[tuple[int, int]]:
    """(epoch, when it was logged, ms) of every val error MLflow holds for the run."""
    return sorted((m.step, m.timestamp) for m in MlflowClient(uri).get_metric_history(run_id, "val_top1_error"))


def outage_lines(console: Console) -> list[str]:
    return [line for _, line in console.lines if OUTAGE_WORDS.search(line)]


def epoch_gaps(console: Console, start: float, end: float) -> list[float]:
    """Seconds between consecutive epoch lines, for the epochs whose line came in [start, end]."""
    arrivals = [when for when, line in console.lines if re.search(r"\bepoch \d+/", line)]
    return [b - a for a, b in itertools.pairwise(arrivals) if start <= b <= end]


def epochs_said(console: Console) -> list[int]:
    """The epoch numbers of a stage's epoch lines (`epoch 3/8 ...`), counted from 1."""
    return [int(n) for n in re.findall(r"\bepoch (\d+)/", console.text())]


def trial_runs(uri: str) -> list:
    """The MLflow runs of a sweep's trials (children of its parent run) on the server."""
    client = MlflowClient(uri)
    runs = client.search_runs(client.get_experiment_by_name("resnet").experiment_id)
    return [run for run in runs if "mlflow.parentRunId" in run.data.tags]


def test_a_training_run_goes_on_at_full_speed_through_a_90_s_outage(server, shards, tmp_path):
    epochs = 80
    run = stage("train", tmp_path, shards, server.url, f"train.epochs={epochs}", "train.num_workers=1")
    run.wait_for(r"epoch 5/")
    server.kill()
    killed = time.monotonic()
    time.sleep(OUTAGE_S)
    server.start()
    assert run.finish() == 0, run.text()

    before = epoch_gaps(run, 0, killed)[-3:]
    during = epoch_gaps(run, killed, killed + OUTAGE_S)
    figures = {"epoch_s_before": before, "epoch_s_during_outage": during, "outage_s": OUTAGE_S}
    if os.environ.get("OUTAGE_RESULTS"):  # benchmarks: BENCHMARKS.md records these
        Path(os.environ["OUTAGE_RESULTS"]).write_text(json.dumps(figures, indent=1) + "\n")
    assert len(during) >= 10, figures  # it trained through the outage
    assert sum(during) / len(during) <= 2 * sum(before) / len(before), figures
    assert max(during) <= 2 * max(before) + 1, figures  # no epoch waited on the store
    lines = outage_lines(run)
    assert len(lines) == 2 and "not answering" in lines[0] and "answers again" in lines[1], lines

    run_id = re.search(r"MLflow run (\w+)", run.text()).group(1)
    assert [epoch for epoch, _ in epoch_history(server.url, run_id)] == list(range(epochs))  # every epoch, once


def test_a_sweep_goes_on_through_a_90_s_outage(server, shards, tmp_path):
    epochs = 30
    sweep = stage(
        "tune", tmp_path, shards, server.url, f"train.epochs={epochs}", "tune.depths=[8]", "tune.shortcuts=[none,A]",
        "train.num_workers=1",
    )  # fmt: skip
    sweep.wait_for(r"epoch 2/", count=2)  # both trials are training
    server.kill()
    time.sleep(OUTAGE_S)
    server.start()
    assert sweep.finish() == 0, sweep.text()
    trials = trial_runs(server.url)
    assert len(trials) == 2
    for trial in trials:
        assert [epoch for epoch, _ in epoch_history(server.url, trial.info.run_id)] == list(range(epochs))
    assert len(outage_lines(sweep)) <= 2, outage_lines(sweep)
    assert "MLflow away" in sweep.text()  # the epoch lines said the records were waiting


def test_a_run_and_a_sweep_whose_store_stays_away_end_and_their_reruns_fill_the_gap(server, shards, tmp_path):
    """Past the retry budget. The training run ends with exit 0, saying which epochs MLflow lacks.
    A sweep cannot write its records (sweep.json names each trial's MLflow run): its trials
    train to the end, the stage exits 1 with one line. Each rerun trains nothing again and writes
    every epoch MLflow lacks, once."""
    sweep_epochs, train_epochs = 40, 8
    budget = ("mlflow.retry_seconds=5", "train.num_workers=1")
    grid = ("tune.depths=[8]", "tune.shortcuts=[none,A]", "tune.max_failures=1")
    sweep_overrides = (f"train.epochs={sweep_epochs}", *grid, *budget)
    train_overrides = (f"train.epochs={train_epochs}", *budget)
    sweep = stage("tune", tmp_path / "sweep", shards, server.url, *sweep_overrides)
    sweep.wait_for(r"epoch 1/", count=2)
    run = stage("train", tmp_path / "train", shards, server.url, *train_overrides)
    run.wait_for(r"epoch 3/")
    server.kill()
    assert run.finish() == 0, run.text()
    missing = re.search(r"MLflow lacks epochs (\d+)\.\.(\d+) of run (\w+)", run.text())
    assert missing and int(missing.group(2)) == train_epochs, run.text()
    assert sweep.finish() == 1, sweep.text()
    # Ray forwards the workers' lines (`(RayTrainWorker pid=...) ...`) late: the driver's own end with the error.
    driver_lines = [line for _, line in sweep.lines if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", line)]
    assert driver_lines[-1].startswith(f"error: MLflow at {server.url} did not answer"), sweep.text()
    assert "Traceback" not in sweep.text()
    assert epochs_said(sweep).count(sweep_epochs) >= 2, sweep.text()  # both trials trained to the end

    server.start()
    rerun = stage("train", tmp_path / "train", shards, server.url, *train_overrides)
    sweep_rerun = stage("tune", tmp_path / "sweep", shards, server.url, *sweep_overrides)
    assert rerun.finish() == 0, rerun.text()
    assert sweep_rerun.finish() == 0, sweep_rerun.text()
    # Nothing trained again (a resumed trial that had ended may say its last epoch once more).
    assert not [n for n in epochs_said(rerun) + epochs_said(sweep_rerun) if n not in (train_epochs, sweep_epochs)]
    run_id = missing.group(3)
    assert [epoch for epoch, _ in epoch_history(server.url, run_id)] == list(range(train_epochs))  # each once
    assert MlflowClient(server.url).get_run(run_id).info.status == "FINISHED"
    trials = trial_runs(server.url)
    assert len(trials) == 2  # one run per trial, resumed
    for trial in trials:
        assert [epoch for epoch, _ in epoch_history(server.url, trial.info.run_id)] == list(range(sweep_epochs))
        assert trial.info.status == "FINISHED"
    written = read_sweep(str(tmp_path / "sweep" / "reports"))
    assert len(written.finished) == 2 and not written.failed


def test_an_object_store_that_stops_mid_run_costs_nothing_of_the_curve(s3_server, s3_process, shards, tmp_path):
    """Shards read from and checkpoints written to the suite's S3 server, stopped (SIGSTOP: it
    takes connections and answers nothing) for longer than a request's timeout, mid-run, then
    let go on. The run ends, and its curve is that of a run beside it on the same shards, on
    local disk, which nothing interrupts."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.makedirs("blips", exist_ok=True)
    fs.put(str(shards), "blips/shards", recursive=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ("train.epochs=8", "train.num_workers=1")

    on_s3 = ("paths.shards=s3://blips/shards", "paths.ray_storage=s3://blips/ray", "train.run_name=blipped")
    blipped = stage("train", tmp_path, shards, uri, *common, *on_s3)
    calm = stage("train", tmp_path / "calm", shards, uri, *common, "train.run_name=calm")
    blipped.wait_for(r"epoch 3/")
    s3_process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(files.S3_TIMEOUT_S + 10)
    finally:
        s3_process.send_signal(signal.SIGCONT)
    assert blipped.finish() == 0, blipped.text()
    assert calm.finish() == 0, calm.text()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resnet").experiment_id
    curves = {}
    for name in ("blipped", "calm"):
        (run,) = client.search_runs([experiment], f"tags.`pipeline.run_name` = '{name}'")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
        assert [step for step, _ in history] == list(range(8)), name  # every epoch, once
        curves[name] = [loss for _, loss in history]
    assert curves["blipped"] == pytest.approx(curves["calm"], rel=1e-6)
