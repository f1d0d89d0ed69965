"""The whole pipeline, for real: `dvc repro` in a fresh clone (tiny params), the registry's alias
rule, the champion loaded back from the registry, and an interrupted sweep resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import checkpoints
from pipeline.manifest import read_manifest
from pipeline.records import FailedTrial, read_sweep
from tests.integration.conftest import run

pytestmark = pytest.mark.slow

TINY = {
    "train": {"epochs": 4, "batch_size": 64, "checkpoints_to_keep": 1},
    "tune": {"depths": [8], "shortcuts": ["none", "A"]},
}


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def champion_error_on(split: str, repo: Path, uri: str) -> float:
    """The registered champion as a consumer uses it: encoded images in, classes out."""
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/resnet-digits@champion")
    shards = str(repo / "data" / "shards")
    manifest = read_manifest(shards)
    images, labels = [], []
    for url, _ in manifest.shard_list(shards, split):
        with tarfile.open(url) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith(".jpg"):
                    images.append(tar.extractfile(member).read())
                elif member.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(member).read()))
    predicted = model.predict(pd.DataFrame({"image": images}))["class"].to_numpy()
    return float((predicted != np.array(labels)).mean())


def console_of(cmd: list[str], repo: Path) -> str:
    """What a person sees: stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}"
    return result.stdout


def test_dvc_repro_runs_the_pipeline_and_the_registry_keeps_the_better_champion(clone):
    set_params(clone, TINY)
    out = console_of(["dvc", "repro"], clone)
    for stage in ("shard", "verify", "tune", "evaluate", "register", "report"):
        assert f"Running stage '{stage}'" in out
    # The sweep's console: one line per trial-epoch from the driver, and the final table; no
    # Tune tables or config dumps, no Ray Train report lines, no error-level lines.
    sweep = out[out.index("Running stage 'tune'") : out.index("Running stage 'evaluate'")].splitlines()
    for label in ("plain-8", "ResNet-8 A"):
        for epoch in range(1, 5):
            assert len([line for line in sweep if line.startswith(f"{label} ") and f" epoch {epoch}/4 " in line]) == 1
    for noise in ("Current best trial", "Trial status", "config", "Reporting training result", "PreemptionWatcher", " E "):
        assert not [line for line in sweep if noise in line], noise
    assert len(sweep) <= 2 * 4 + 30, "\n".join(sweep)
    trials = read_sweep(str(clone / "reports")).trials
    assert [(t.depth, t.shortcut) for t in trials] == [(8, "none"), (8, "A")]
    for t in trials:
        assert 0 < t.overhead_s < t.wall_time_s  # pipeline.tune.TrialTimes
        assert t.best_val_loss > 0
        assert checkpoints.load(t.checkpoint).epoch == t.best_epoch  # the weights are the best epoch's
    # The val split chose the trial; the figures reported are the test split's.
    evaluation = json.loads((clone / "metrics" / "eval.json").read_text())
    assert evaluation["split"] == "test" and evaluation["crop"] == "single" and evaluation["num_samples"] == 360
    registry = json.loads((clone / "metrics" / "registry.json").read_text())
    assert registry["version"] == 1 and registry["alias_moved"] and registry["champion_version"] == 1
    for picture in ("curves.png", "final_errors.png"):
        assert (clone / "reports" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SVC" in (clone / "reports" / "results.md").read_text()

    assert "Running stage" not in run(["dvc", "repro"], clone)  # a second repro does nothing
    assert "top1_error" in run(["dvc", "metrics", "show"], clone)

    uri = f"sqlite:///{clone / 'mlflow.db'}"
    assert champion_error_on("test", clone, uri) == pytest.approx(evaluation["top1_error"])
    client = MlflowClient(uri)
    # MLflow pages that tell the truth: the commit on every run, the shards as every training
    # run's dataset, and the sweep's run described by its grid rather than by one trial.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()
    runs = client.search_runs([client.get_experiment_by_name("resnet").experiment_id])
    assert len(runs) == 3 and all(r.data.tags["mlflow.source.git.commit"] == commit for r in runs)
    assert {r.data.tags["mlflow.source.name"] for r in runs} == {"pipeline.tune"}  # the UI shows the commit beside it
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["tune.depths"] == "[8]" and "model.depth" not in parent.data.params
    for trial_run in (r for r in runs if r is not parent):
        (dataset,) = [i.dataset for i in trial_run.inputs.dataset_inputs]
        assert dataset.name == "digits-shards" and trial_run.data.params["manifest_sha256"].startswith(dataset.digest)
    version = client.get_model_version("resnet-digits", "1")
    assert version.tags["depth"] == "8" and len(version.tags["manifest_sha256"]) == 64
    best = min(trials, key=lambda t: (t.best_val_top1_error, t.best_val_loss))
    assert float(version.tags["val_top1_error"]) == best.best_val_top1_error == registry["val_top1_error"]
    assert float(version.tags["val_loss"]) == best.best_val_loss
    assert float(version.tags["test_top1_error"]) == evaluation["top1_error"] == registry["test_top1_error"]
    assert float(version.tags["test_top5_error"]) == evaluation["top5_error"]
    assert "Val (the split that chose" in version.description and "Test (a split that chose nothing" in version.description
    assert version.tags["shards_dvc_md5"] != "unknown" and version.description

    # A worse model (one epoch) gets registered, but the champion alias stays where it was.
    exp = run(["dvc", "exp", "run", "-S", "train.epochs=1", "-S", "tune.shortcuts=[A]"], clone)
    assert "Running stage 'tune'" in exp
    worse = json.loads((clone / "metrics" / "registry.json").read_text())
    assert worse["version"] == 2 and not worse["alias_moved"] and worse["champion_version"] == 1
    assert "does not beat version 1" in worse["message"]
    assert str(client.get_model_version_by_alias("resnet-digits", "champion").version) == "1"


def sweep_in(folder: Path, *overrides: str) -> tuple[dict[str, str], list[str]]:
    """The environment and arguments of a stage run on a tiny sweep with its outputs in `folder`
    (on a local cluster and MLflow store of its own), the digits already sharded there."""
    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    overrides = (
        f"paths.shards={folder / 'shards'}",
        f"paths.ray_storage={folder / 'ray'}",
        f"paths.reports={folder / 'reports'}",
        f"paths.metrics={folder / 'metrics'}",
        f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
        "train.batch_size=64",
        "tune.depths=[8]",
        *overrides,
    )
    args = ["--params", str(REPO / "params.yaml"), *[a for o in overrides for a in ("--set", o)]]
    subprocess.run([sys.executable, "-m", "pipeline.shard", *args], env=env, cwd=folder, check=True, capture_output=True)
    return env, args


def epochs_said(console: str) -> dict[str, list[int]]:
    """Each trial's epoch lines on a sweep's console: label -> the epochs, counted from 1."""
    said: dict[str, list[int]] = {}
    for label, epoch in re.findall(r"^(.+?)\s+epoch (\d+)/", console, re.MULTILINE):
        said.setdefault(label, []).append(int(epoch))
    return said


def interrupted_sweep(args: list[str], env: dict[str, str], folder: Path, stop: str, after: str) -> str:
    """Start the sweep, and at its first console line matching `after`: Ctrl-C (SIGINT to the
    whole command) or kill -9 (the tune driver alone). What it said until then."""
    sweep = subprocess.Popen(
        [sys.executable, "-u", "-m", "pipeline.tune", *args],
        env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    seen = []
    for line in sweep.stdout:
        seen.append(line)
        if re.search(after, line):
            if stop == "ctrl-c":
                os.killpg(sweep.pid, signal.SIGINT)
            else:
                os.kill(sweep.pid, signal.SIGKILL)
            break
    deadline = time.monotonic() + 180
    while sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    if sweep.poll() is None:
        os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    return "".join(seen)


def test_an_interrupted_sweep_resumes_without_training_an_epoch_twice(tmp_path):
    """Ctrl-C mid-sweep; the rerun resumes, and its driver is killed (-9) in turn; the next rerun
    ends the sweep. No epoch trained twice, one MLflow run per trial."""
    env, args = sweep_in(tmp_path, "train.epochs=6", "tune.shortcuts=[none, A]")
    consoles = [interrupted_sweep(args, env, tmp_path, "ctrl-c", after=r"epoch 2/6")]
    assert not (tmp_path / "reports" / "sweep.json").exists()
    consoles.append(interrupted_sweep(args, env, tmp_path, "kill-9", after=r"epoch \d/6"))  # once it trains again
    assert "resuming sweep" in consoles[-1]
    assert not (tmp_path / "reports" / "sweep.json").exists()

    last = subprocess.run([sys.executable, "-u", "-m", "pipeline.tune", *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert last.returncode == 0, last.stdout[-4000:] + last.stderr[-4000:]
    assert "resuming sweep" in last.stdout
    consoles.append(last.stdout)
    trials = read_sweep(str(tmp_path / "reports")).trials
    assert [(t.shortcut, t.epochs) for t in trials] == [("none", 6), ("A", 6)]
    assert all(0 < t.overhead_s < t.wall_time_s for t in trials)  # timed from the resumption
    last_said: dict[str, int] = {}  # no epoch an earlier run finished is trained again
    for console in consoles:
        for label, epochs in epochs_said(console).items():
            assert min(epochs) > last_said.get(label, 0), (label, epochs, last_said)
            last_said[label] = max(epochs)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resnet")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2  # no duplicate runs after the resumes
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_top1_error")]
        assert steps == list(range(6))


def test_an_asha_sweep_stops_poor_trials_and_records_them_as_stopped_early(tmp_path):
    env, args = sweep_in(
        tmp_path, "train.epochs=6", "tune.scheduler=asha", "tune.grace_period=1", "tune.shortcuts=[none, A, B, C]"
    )
    done = subprocess.run([sys.executable, "-m", "pipeline.tune", *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    trials = read_sweep(str(tmp_path / "reports")).trials
    assert [t.shortcut for t in trials] == ["none", "A", "B", "C"] and not [t for t in trials if isinstance(t, FailedTrial)]
    stopped = [t for t in trials if t.stopped_early]
    assert stopped and all(1 <= t.epochs < 6 for t in stopped)
    assert all(t.epochs == 6 for t in trials if not t.stopped_early)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial in trials:  # each record names its own trial
        run = client.get_run(trial.mlflow_run_id)
        assert run.data.params["model.shortcut"] == trial.shortcut, trial
        assert len(client.get_metric_history(run.info.run_id, "val_top1_error")) == trial.epochs
    assert "(stopped early)" in done.stdout

    report = subprocess.run([sys.executable, "-m", "pipeline.report", *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert report.returncode == 0, report.stdout[-4000:] + report.stderr[-4000:]
    claims = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert all(len(c["evidence"]["skipped_stopped_early_trials"]) == len(stopped) for c in claims)


def test_trials_that_wait_for_a_slot_run_in_a_reused_trial_process_each_in_its_own_mlflow_run(tmp_path):
    """One trial at a time: Tune hands each next trial the previous one's process (reuse_actors)."""
    env, args = sweep_in(tmp_path, "train.epochs=1", "tune.shortcuts=[none, A, B]", "tune.max_concurrent_trials=1")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.tune", *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    trials = read_sweep(str(tmp_path / "reports")).trials
    assert [t.shortcut for t in trials] == ["none", "A", "B"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial in trials:
        run = client.get_run(trial.mlflow_run_id)
        assert run.data.params["model.shortcut"] == trial.shortcut
        assert run.info.run_name == trial.trial.label and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1_error")] == [0]
        assert 0 < trial.overhead_s < trial.wall_time_s
    assert len({t.mlflow_run_id for t in trials}) == 3 and len({t.checkpoint for t in trials}) == 3
