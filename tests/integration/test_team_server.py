"""The team setup of infra/, for real on this machine: PostgreSQL, an S3-compatible server (moto)
and `mlflow server --app-name basic-auth` started by infra/mlflow/start-server.sh; the sweep,
evaluate and register stages run against them with shards read from s3://, Ray checkpoints
written to s3:// and MLflow artifacts landing in the bucket; checked through MLflow's REST API."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pipeline import params as params_module
from pipeline import shard
from pipeline.records import read_sweep
from tests.conftest import REPO, free_port, mlflow_answers

pytestmark = pytest.mark.slow


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's postgresql (.ci/run does)")
    return found


def as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root, which CI is.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL server on 127.0.0.1; yields the base URL for user mlflow."""
    # Outside pytest's root-only temporary tree: the postgres user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="resnet-pipeline-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    # A password as generated ones are: with characters a URI must percent-encode.
    port, password = free_port(), secrets.token_hex(8) + "%/@:"
    subprocess.run(as_postgres_user([postgres_binary("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]), check=True, capture_output=True)
    start = [
        postgres_binary("pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start",
    ]  # fmt: skip
    subprocess.run(as_postgres_user(start), check=True, capture_output=True)
    try:
        for statement in (
            f"CREATE USER mlflow WITH PASSWORD '{password}'",
            "CREATE DATABASE mlflow OWNER mlflow",
            "CREATE DATABASE mlflow_auth OWNER mlflow",
            # For a server of one test's own: the first start of the auth app fixes the admin's password.
            "CREATE DATABASE own OWNER mlflow",
            "CREATE DATABASE own_auth OWNER mlflow",
        ):
            subprocess.run(
                as_postgres_user([postgres_binary("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", statement]),
                check=True,
                capture_output=True,
            )
        yield f"postgresql://mlflow:{urllib.parse.quote(password, safe='')}@127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres_user([postgres_binary("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def started_team_server(postgres: str, s3_server: str, log: Path, database: str = "mlflow") -> Iterator[dict]:
    """infra/mlflow/start-server.sh in a session of its own, up and answering; stopped after."""
    import s3fs

    s3fs.S3FileSystem().makedirs("mlflow-artifacts", exist_ok=True)
    port, admin_password = free_port(), secrets.token_urlsafe(12)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_BACKEND_STORE_URI": f"{postgres}/{database}",
        "MLFLOW_AUTH_DATABASE_URI": f"{postgres}/{database}_auth",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts/mlartifacts",
        "MLFLOW_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_PORT": str(port),
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
    }
    with log.open("w") as out:
        server = subprocess.Popen(["sh", str(REPO / "infra" / "mlflow" / "start-server.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not mlflow_answers(url):
        os.killpg(server.pid, signal.SIGKILL)  # the script and whatever it started
        raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
    try:
        yield {"url": url, "admin": ("admin", admin_password), "process": server}
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have stopped it already
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def team_server(postgres, s3_server, tmp_path_factory) -> Iterator[dict]:
    with started_team_server(postgres, s3_server, tmp_path_factory.mktemp("mlflow") / "server.log") as server:
        yield server


def session_processes(session: int) -> dict[int, str]:
    """pid -> command line (arguments joined by spaces) of every process in the session."""
    found = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The fields after the command name, which is in parentheses and may hold spaces.
            fields = stat_file.read_text().rpartition(")")[2].split()
            if int(fields[3]) == session:
                arguments = (stat_file.parent / "cmdline").read_bytes().split(b"\0")
                found[int(stat_file.parent.name)] = b" ".join(arguments).decode()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return found


def environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def test_no_secret_on_a_command_line_and_the_auth_config_private_while_it_lasts(postgres, s3_server, tmp_path):
    with started_team_server(postgres, s3_server, tmp_path / "server.log", database="own") as server:
        script = server["process"]
        running = session_processes(script.pid)
        commands = "\n".join(running.values())
        assert "mlflow server" in commands and "uvicorn" in commands, commands
        encoded_password = urllib.parse.urlsplit(postgres).password
        for secret in (encoded_password, urllib.parse.unquote(encoded_password), server["admin"][1]):
            assert secret not in commands, "a secret on a command line, readable by any local user"

        config = Path(next(p for p in (environment_of(pid).get("MLFLOW_AUTH_CONFIG_PATH") for pid in running) if p))
        assert stat.S_IMODE(config.stat().st_mode) == 0o600 and config.stat().st_uid == os.geteuid()
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        assert encoded_password.replace("%", "%%") in config.read_text()  # the auth DB's URI, for configparser
        assert server["admin"][1] not in config.read_text()  # the admin's password travels in the environment

        # What `docker stop` and Kubernetes do: SIGTERM to the container's first process alone.
        script.send_signal(signal.SIGTERM)
        script.wait(timeout=60)
        deadline = time.monotonic() + 30
        while session_processes(script.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not session_processes(script.pid), "the server outlived its script"
        assert not config.parent.exists()


def api(server: dict, method: str, path: str, auth=None, **kw) -> requests.Response:
    return requests.request(method, f"{server['url']}/api/2.0/mlflow/{path}", auth=auth, timeout=30, **kw)


def test_the_server_demands_credentials(team_server):
    assert api(team_server, "GET", "experiments/search", params={"max_results": 1}).status_code == 401
    assert api(team_server, "GET", "experiments/search", auth=("admin", "wrong"), params={"max_results": 1}).status_code == 401
    default = ("admin", "password1234")  # MLflow's documented default: must not be the one in use
    assert api(team_server, "GET", "experiments/search", auth=default, params={"max_results": 1}).status_code == 401
    assert api(team_server, "GET", "experiments/search", auth=team_server["admin"], params={"max_results": 1}).status_code == 200


def test_the_pipeline_against_the_team_server_and_s3(team_server, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    local = tmp_path / "shards"
    shard.shard(params_module.load(REPO / "params.yaml", [f"paths.shards={local}"]))
    fs.makedirs("resnet-data", exist_ok=True)  # the session's S3 server is shared by the tests
    fs.put(str(local), "resnet-data/shards", recursive=True)

    user, password = team_server["admin"]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)},
        "MLFLOW_TRACKING_URI": team_server["url"],
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    overrides = [
        "paths.shards=s3://resnet-data/shards",
        "paths.ray_storage=s3://resnet-data/ray",
        f"paths.reports={tmp_path / 'reports'}",
        f"paths.metrics={tmp_path / 'metrics'}",
        "train.epochs=2",
        "train.batch_size=64",
        "tune.depths=[8]",
        "tune.shortcuts=[A]",
        "mlflow.registered_model=resnet-team",
    ]
    args = ["--params", str(REPO / "params.yaml"), *[a for o in overrides for a in ("--set", o)]]
    for stage in ("tune", "evaluate", "register"):
        done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{stage}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    trials = read_sweep(str(tmp_path / "reports")).finished
    assert trials[0].checkpoint.startswith("s3://resnet-data/ray/")
    assert fs.ls("resnet-data/ray")  # Ray's checkpoints are in the bucket

    admin = team_server["admin"]
    experiment = api(team_server, "GET", "experiments/get-by-name", auth=admin, params={"experiment_name": "resnet"}).json()
    runs = api(team_server, "POST", "runs/search", auth=admin, json={"experiment_ids": [experiment["experiment"]["experiment_id"]]}).json()["runs"]
    child = next(r for r in runs if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", [])))
    history = api(team_server, "GET", "metrics/get-history", auth=admin, params={"run_id": child["info"]["run_id"], "metric_key": "val_top1_error"}).json()
    assert [m["step"] for m in history["metrics"]] == [0, 1]
    alias = api(team_server, "GET", "registered-models/alias", auth=admin, params={"name": "resnet-team", "alias": "champion"})
    assert alias.status_code == 200 and alias.json()["model_version"]["version"] == "1"
    assert fs.find("mlflow-artifacts/mlartifacts")  # the logged model's files landed in S3

    # A user with read permission (the server's default) cannot register a version.
    reader = ("reader", secrets.token_urlsafe(12))
    created = api(team_server, "POST", "users/create", auth=admin, json={"username": reader[0], "password": reader[1]})
    assert created.status_code == 200, created.text
    assert api(team_server, "GET", "registered-models/get", auth=reader, params={"name": "resnet-team"}).status_code == 200
    denied = api(team_server, "POST", "model-versions/create", auth=reader, json={"name": "resnet-team", "source": "s3://mlflow-artifacts/x"})
    assert denied.status_code == 403


def test_shards_go_through_the_dvc_s3_remote(s3_server, tmp_path):
    """`dvc push` the shards once to the project's S3 remote (.dvc/config: `s3`), `dvc pull` them
    on another machine (here: a second clone), where they are on disk once too."""
    import s3fs

    from tests.integration.conftest import run

    s3fs.S3FileSystem().makedirs("resnet-data", exist_ok=True)
    first, second = tmp_path / "first", tmp_path / "second"
    for target in (first, second):
        subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    run(["dvc", "repro", "shard"], first)
    run(["dvc", "push", "-r", "s3", "shard"], first)
    (second / "dvc.lock").write_text((first / "dvc.lock").read_text())
    run(["dvc", "pull", "-r", "s3", "shard"], second)
    assert run(["dvc", "status", "shard"], second).strip().endswith("up to date.")
    manifest = (second / "data" / "shards" / "manifest.json").read_text()
    assert manifest == (first / "data" / "shards" / "manifest.json").read_text()
    pulled = [path for path in (second / "data" / "shards").rglob("*") if path.is_file()]
    assert all(path.stat().st_nlink == 2 for path in pulled)  # linked from the cache, on disk once
