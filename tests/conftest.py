from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


def mlflow_answers(url: str, timeout: float = 120) -> bool:
    """Whether an MLflow server at `url` answers its health check within `timeout` seconds."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or starting slowly on a busy machine
            time.sleep(0.5)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_process(s3_server) -> subprocess.Popen:
    """The process of `s3_server`: a test may stop it (SIGSTOP) and let it go on (SIGCONT)."""
    return S3_PROCESSES[s3_server]


S3_PROCESSES: dict[str, subprocess.Popen] = {}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1; yields its endpoint URL.

    Clients find it through AWS_ENDPOINT_URL, as they would a MinIO or Ceph endpoint."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    S3_PROCESSES[endpoint] = process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("moto server did not start")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(autouse=True)
def isolated_mlflow_uri() -> Iterator[None]:
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which the stages honour: keep one
    test's store from leaking into the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def run_stage(monkeypatch, capsys) -> Callable[..., subprocess.CompletedProcess]:
    """`python -m pipeline.<stage> --params params.yaml ARGS` from the repository root, run in
    this process as the stage's `__main__` runs it (`cli.run` over `main`): its exit code and
    what it printed, without a new interpreter's seconds of imports."""
    from pipeline import cli

    def run(stage: str, *args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(REPO)
        argv = [*([] if "--params" in args else ["--params", str(REPO / "params.yaml")]), *args]
        main = importlib.import_module(f"pipeline.{stage}").main
        capsys.readouterr()
        try:
            cli.run(lambda: main(argv))
            code = 0
        except SystemExit as ended:
            code = ended.code if isinstance(ended.code, int) else 1
        printed = capsys.readouterr()
        return subprocess.CompletedProcess([stage, *argv], code, printed.out, printed.err)

    return run


SERVER_FIXTURES = {"s3_server", "s3_process"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a server is slow, wherever it lives: `make test-fast` starts none."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
