"""The registered champion as a consumer uses it: real digits (scikit-learn's 8x8 images, as PNG)
through `mlflow.pyfunc` and through `mlflow models serve` over HTTP, with README's commands run
verbatim. The model is trained for real by the project's own epoch function (no Ray: Ray Train's
path is tested elsewhere), then the real `evaluate` and `register` stages log and register it."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from pipeline import (
    artifacts,
    checkpoints,
    loader,
    recipe,
    records,
    scoring,
    serving,
    sources,
    tracking,
    transforms,
    worker,
)
from pipeline import params as params_module
from pipeline.artifacts import Evaluation
from pipeline.manifest import read_manifest
from pipeline.records import EpochMetrics, Trial, read_sweep
from tests.conftest import REPO
from tests.readme import bash, new_user_env, readme_block

pytestmark = pytest.mark.slow

EPOCHS = 20


def stage(name: str, root: Path, overrides: list[str]) -> None:
    args = ["--params", str(REPO / "params.yaml"), *[a for o in overrides for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-m", f"pipeline.{name}", *args], cwd=root, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def train_trial(params, root: Path, uri: str) -> tuple[records.TrialRecord, str]:
    """CIFAR ResNet-20 (A) trained by worker.run_epoch, checkpointed as Ray Train's workers do,
    with a parent and a child MLflow run as a sweep makes them; its sweep.json record, and the
    parent run."""
    manifest = read_manifest(params.paths.shards)
    torch.manual_seed(0)
    net = checkpoints.build_model(params, len(manifest.classes))
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe.base_lr(params), momentum=0.9, weight_decay=1e-4)
    schedule = recipe.schedule(params)
    store = tracking.Store(uri, budget_s=30)
    parent = tracking.start_or_resume_run(store, params, "sweep-served", {}, commit="test", source="pipeline.tune", omit=("model.depth", "model.shortcut"))
    child = tracking.start_or_resume_run(store, params, "sweep-served-resnet-20-A", {"num_params": 0}, commit="test", source="pipeline.tune", parent_run_id=parent)
    client = MlflowClient(uri)
    history = []
    for epoch in range(EPOCHS):
        started = time.perf_counter()
        batches = loader.make_loader(
            params.paths.shards, "train", transforms.train_transform("cifar", flip=False),
            batch_size=params.train.batch_size, num_workers=0, epoch=epoch, seed=0, train=True, manifest=manifest,
        )  # fmt: skip
        sums = worker.run_epoch(
            net, batches, optimizer, torch.device("cpu"), manifest.mean, False, nullcontext(), partial(schedule.lr, epoch),
            worker.EpochSums(), worker.StepShape(1, params.train.batch_size),
        )  # fmt: skip
        loss_sum, errors, seen = sums.loss_sum, sums.errors, sums.seen
        val = loader.make_loader(
            params.paths.shards, "val", transforms.eval_transform("cifar"),
            batch_size=64, num_workers=0, epoch=0, seed=0, train=False, manifest=manifest,
        )  # fmt: skip
        scores = scoring.score(net, val, torch.device("cpu"), manifest.mean, nullcontext())
        metrics = EpochMetrics(
            epoch=epoch, train_loss=loss_sum / seen, train_top1_error=errors / seen,
            val_top1_error=scores.top1 / scores.seen, val_top5_error=scores.top5 / scores.seen,
            val_loss=scores.loss_sum / scores.seen, lr=schedule.lr(epoch), images_per_s=seen / 1.0,
            epoch_time_s=time.perf_counter() - started, world_size=1, steps_s=1.0, goodput=0.5, redone_steps=0,
        )  # fmt: skip
        history.append(metrics)
        client.log_batch(child, metrics=tracking.epoch_metrics(epoch, metrics.model_dump(exclude={"epoch"}), int(time.time() * 1000)))
    best = EPOCHS - 1  # the last epoch's weights are the ones kept
    checkpoint = root / "ray" / "sweep-served-resnet-20-A" / f"checkpoint_{best:06d}"
    checkpoint.mkdir(parents=True)
    checkpoints.save(
        checkpoint,
        checkpoints.CheckpointState(
            model_args=checkpoints.ModelArgs.of(params, 10), model=net.state_dict(), optimizer={}, schedule={},
            epoch=best, history=history, mean=manifest.mean,
        ),
    )  # fmt: skip
    for run in (child, parent):
        client.set_terminated(run, "FINISHED")
    facts = records.RunFacts(
        num_params=sum(p.numel() for p in net.parameters()), wall_time_s=None, overhead_s=None,
        checkpoint=str(checkpoint), mlflow_run_id=child,
    )  # fmt: skip
    # The record of the last epoch as the best: the weights saved are that epoch's.
    record = records.trial_record(Trial("cifar", 20, "A"), history, EPOCHS, facts)
    last = history[-1]
    record = record.model_copy(update={
        "best_epoch": best, "best_val_top1_error": last.val_top1_error, "best_val_top5_error": last.val_top5_error,
        "best_val_loss": last.val_loss,
    })  # fmt: skip
    return record, parent


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder after `dvc repro`: shards, one trial, evaluated and registered for real."""
    root = tmp_path_factory.mktemp("served")
    overrides = [
        f"paths.shards={root / 'data' / 'shards'}", f"paths.reports={root / 'reports'}",
        f"paths.metrics={root / 'metrics'}", f"paths.ray_storage={root / 'ray'}",
        "mlflow.tracking_uri=sqlite:///mlflow.db", "model.depth=20", "model.shortcut=A", f"train.epochs={EPOCHS}",
    ]  # fmt: skip
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the quick start's
    stage("shard", root, overrides)
    params = params_module.load(REPO / "params.yaml", overrides)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    trial, parent = train_trial(params, root, uri)
    artifacts.write(root / "reports" / records.Sweep.FILE, records.Sweep(name="sweep-served", mlflow_run_id=parent, trials=[trial]))
    client = MlflowClient(uri)
    times = {r: (client.get_run(r).info.start_time, client.get_run(r).info.end_time) for r in (trial.mlflow_run_id,)}
    stage("evaluate", root, overrides)
    stage("register", root, overrides)
    assert {r: (client.get_run(r).info.start_time, client.get_run(r).info.end_time) for r in times} == times
    return root


def real_digits(split_seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """The test split's digits as a consumer has them: the 8x8 images, 17 grey levels as 0..255."""
    bunch = load_digits()
    _, _, test = sources.digits_split(bunch.target, split_seed, 0.2, 0.2)
    arrays = [np.round(bunch.images[i] * 255 / 16).astype(np.uint8) for i in test]
    return serving.images_from_arrays(arrays), bunch.target[test]


def test_the_champion_classifies_real_digits_in_python(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/resnet-digits@champion")
    images, labels = real_digits()
    predicted = model.predict(pd.DataFrame({"image": images}))
    assert (predicted["class"].to_numpy() == labels).mean() >= 0.98
    assert list(predicted["label"][:5]) == [str(c) for c in predicted["class"][:5]]
    assert np.allclose([sum(p) for p in predicted["probabilities"]], 1, atol=1e-4)
    # README's Python lines, as written, on one digit.
    (project / "digit.png").write_bytes(images[0])
    result = bash(f".venv/bin/python - <<'EOF'\n{readme_block('mlflow.pyfunc.load_model')}\nEOF", project)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1].split()[1] == str(labels[0])  # the row: index, class, label, ...


def test_the_registered_version_and_the_runs_tell_the_truth(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("resnet-digits", "champion")
    assert "Input: a DataFrame column `image` of encoded images" in version.description
    (trial,) = read_sweep(str(project / "reports")).trials
    evaluation = artifacts.read(str(project / "metrics" / Evaluation.FILE), Evaluation)
    assert evaluation.checkpoint_name == f"checkpoint_{trial.best_epoch:06d}" and str(project) not in evaluation.model_dump_json()
    # The logged model carries the metrics of the epoch it was saved at, and the test figures.
    model = client.get_logged_model(version.source.removeprefix("models:/"))  # the version's logged model
    metrics = {m.key: (m.step, m.value) for m in model.metrics}
    assert metrics["val_top1_error"] == (trial.best_epoch, trial.best_val_top1_error)
    assert metrics["test_single_top1_error"] == (trial.best_epoch, evaluation.top1_error)
    # The sweep's run shows the result.
    parent = client.get_run(client.get_run(trial.mlflow_run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["best_trial_run_id"] == trial.mlflow_run_id
    assert parent.data.tags["registered_model_version"] == f"models:/resnet-digits/{version.version}"
    assert parent.data.metrics["test_top1_error"] == evaluation.top1_error
    assert trial.mlflow_run_id in parent.data.tags["mlflow.note.content"]


def post(port: int, images: list[bytes]) -> tuple[int, dict]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode()] for i in images]}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def first_json_line(process: subprocess.Popen, timeout: float) -> str:
    """README's curl prints the server's answer once the server is up: the first line that is JSON.
    Read with os.read, not readline: a buffered reader can hold the answer that arrived in the
    same chunk as the server's log line while select() waits on an empty pipe."""
    deadline, buffer = time.monotonic() + timeout, b""
    fd = process.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        buffer += chunk
        for line in buffer.decode(errors="replace").splitlines(keepends=True):
            if line.startswith("{") and line.endswith("\n"):
                return line
    raise AssertionError("no answer from README's curl:\n" + buffer.decode(errors="replace")[-3000:])


def test_the_served_champion_answers_real_digits_over_http(project):
    images, labels = real_digits()
    (project / "digit.png").write_bytes(images[0])
    port = 5001  # README's
    server = subprocess.Popen(
        ["bash", "-c", readme_block("mlflow models serve")],
        cwd=project, env=new_user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        answer = json.loads(first_json_line(server, timeout=300))["predictions"][0]
        assert answer["class"] == labels[0] and answer["label"] == str(labels[0]) and len(answer["probabilities"]) == 10
        status, body = post(port, images)
        assert status == 200
        predicted = np.array([p["class"] for p in body["predictions"]])
        assert (predicted == labels).mean() >= 0.98
        # MLflow's server puts a preview of the input (pandas' truncated table) before the model's
        # own one line: bounded, whatever the number of images.
        status, body = post(port, [*images[:50], b"this is not an image", *images[50:]])
        assert status == 400 and body["message"].endswith("\nError: image[50]: not an image")
        assert len(body["message"]) < 2000, body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
