"""Two sweeps compared trial by trial with real DVC, using the commands README.md shows.

In a fresh clone holding this checkout's pipeline, the report stage runs through DVC on hand-made
inputs (a sweep's records with curves, the test-split evaluation and the registry's answer, as
the stages before it write them): once for a sweep at depths 20 and 56, committed as README says,
and once more as an experiment on a sweep at depth 20 only. `dvc exp show --md` must then table
each trial's errors for both, and `dvc plots diff` overlay both revisions' curves. No training
and no Ray: the hand-made records stand for what the tune stage would have written.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow.pyfunc
import pytest
from mlflow.tracking import MlflowClient

from pipeline import artifacts
from pipeline.artifacts import Evaluation, Registration
from pipeline.records import Trial
from tests.conftest import REPO
from tests.helpers import failed_trial, finished_trial, sweep_of
from tests.integration.conftest import run

pytestmark = pytest.mark.slow

# (depth, shortcut): (final train error, best val error); numbers with at most 5 decimals, which
# `dvc exp show` prints as they are.
BASELINE = {(20, "none"): (0.05, 0.08), (20, "A"): (0.02, 0.05), (56, "none"): (0.3, 0.33), (56, "A"): (0.01, 0.04)}
DEPTH_20 = {(20, "none"): (0.04, 0.0725), (20, "A"): (0.015, 0.0375)}


def readme_commands() -> list[str]:
    """The lines of README's fenced block that compares experiments, found by its content."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (REPO / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    (block,) = [b for b in blocks if "dvc exp show" in b]
    return [line for line in block.splitlines() if line.strip()]


def shell(command: str, repo: Path) -> str:
    """A command line, run as a reader would paste it into a shell."""
    return run(["bash", "-c", command], repo)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def mlflow_runs(repo: Path, trials: list[tuple[int, str]]) -> tuple[str, dict[tuple[int, str], str]]:
    """MLflow runs as pipeline.tune leaves them: a sweep's parent run, with a child per trial. The
    report logs its files into the parent."""
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.create_experiment("resnet", artifact_location=(repo / "mlartifacts").as_uri())
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    children = {trial: client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id for trial in trials}
    return parent, children


def write_inputs(repo: Path, errors: dict, runs: tuple[str, dict], failed_trials: list[tuple[int, str]] = ()) -> None:
    """What the stages before report leave for it: reports/sweep.json, metrics/eval.json and
    metrics/registry.json."""
    parent, children = runs
    trials = [finished_trial(d, s, *errors[(d, s)], mlflow_run_id=children[(d, s)]) for d, s in errors]
    trials += [failed_trial(d, s) for d, s in failed_trials]
    sweep = sweep_of(trials, parent)
    best = sweep.best_trial()
    evaluation = Evaluation(
        mlflow_run_id=best.mlflow_run_id, checkpoint_name="checkpoint_000003", depth=best.depth, shortcut=best.shortcut,
        split="test", crop="single", top1_error=0.0083, top5_error=0.0, loss=0.05, num_samples=360,
    )  # fmt: skip
    registry = Registration(
        registered_model="resnet-digits", version=1, alias="champion", alias_moved=True, champion_version=1,
        val_top1_error=best.best_val_top1_error, val_loss=best.best_val_loss, test_top1_error=0.0083,
        test_top5_error=0.0, model_uri="models:/resnet-digits/1", message="the first version is the champion",
    )  # fmt: skip
    for path, content in (
        (repo / "reports" / "sweep.json", sweep),
        (repo / "metrics" / "eval.json", evaluation),
        (repo / "metrics" / "registry.json", registry),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write(path, content)


def markdown_table(text: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """`dvc exp show --md`'s table: its columns, and each row's cells by column, the rows by
    their first cell (the commit's or experiment's name)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return header, {row[header[0]]: row for row in rows}


def errors_shown(row: dict[str, str]) -> dict[str, tuple[str, str]]:
    """A row's (best val error, final train error) per trial, as printed; `-`: no such trial."""
    trials = [column.removesuffix(".best_val_error") for column in row if column.endswith(".best_val_error")]
    return {t: (row[f"{t}.best_val_error"], row[f"{t}.final_train_error"]) for t in trials if row[f"{t}.best_val_error"] != "-"}


def errors_written(errors: dict) -> dict[str, tuple[str, str]]:
    """`errors` as errors_shown reads them from the table."""
    return {Trial("cifar", depth, shortcut).key: (str(val), str(train)) for (depth, shortcut), (train, val) in errors.items()}


def plotted(data: list[dict], rev: str, field: str) -> list[tuple[int, float]]:
    """(epoch, error) of one revision's line in `dvc plots diff --json`'s data (values as strings)."""
    return [(int(p["epoch"]), float(p[field])) for p in data if p["rev"] == rev and p["field"] == field]


def test_exp_show_and_plots_diff_compare_two_sweeps_trial_by_trial(clone):
    commit, exp_show, plots_diff, metrics_show, plots_show = readme_commands()  # in README's order
    assert commit.startswith("git add dvc.lock ") and "&& git commit" in commit
    assert exp_show.startswith("dvc exp show --md")
    assert (metrics_show, plots_show) == ("dvc metrics show", "dvc plots show")
    baseline_rev, experiment = re.fullmatch(r"dvc plots diff (\S+) (\S+)", plots_diff).groups()

    # The clone holds this checkout's pipeline (conftest's `clone`) and .gitignore, committed.
    shutil.copy2(REPO / ".gitignore", clone / ".gitignore")
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "--allow-empty", "-m", "this checkout's pipeline")  # empty when all is committed

    runs = mlflow_runs(clone, list(BASELINE))  # the experiment's sweep reuses the first four
    write_inputs(clone, BASELINE, runs, failed_trials=[(56, "B")])
    # -s: the report stage alone; the hand-made inputs stand for the stages before it.
    assert "Running stage 'report'" in run(["dvc", "repro", "-s", "report"], clone)
    shell(commit, clone)
    # Git keeps the per-trial results, not sweep.json (its checkpoints' paths) nor the PNGs (DVC's
    # cache keeps them); the failed ResNet-56 (B) has no curve.
    committed = git(clone, "ls-files", "reports", "metrics").split()
    assert sorted(committed) == [
        "reports/curves/plain-20.csv", "reports/curves/plain-56.csv",
        "reports/curves/resnet-20-A.csv", "reports/curves/resnet-56-A.csv", "reports/trials.json",
    ]  # fmt: skip
    assert "dvc.lock" in git(clone, "show", "--name-only", "--format=", "HEAD").split()

    # The experiment: another sweep (depth 20 only, other numbers), the report rerun by DVC on it.
    write_inputs(clone, DEPTH_20, runs)
    assert "Running stage 'report'" in run(["dvc", "exp", "run", "-n", experiment, "-s", "report"], clone)

    columns, rows = markdown_table(shell(exp_show, clone))
    # The name, each trial's two errors (the baseline's trials: the experiment has fewer), the grid.
    trial_columns = [f"{t}.{error}" for t in errors_written(BASELINE) for error in ("best_val_error", "final_train_error")]
    assert columns == ["Experiment", *trial_columns, "tune.depths", "tune.shortcuts"]
    branch = git(clone, "rev-parse", "--abbrev-ref", baseline_rev).strip()
    (experiment_row,) = [row for name, row in rows.items() if name.endswith(f"[{experiment}]")]
    assert errors_shown(rows[branch]) == errors_written(BASELINE)
    assert errors_shown(experiment_row) == errors_written(DEPTH_20)
    assert errors_shown(rows["workspace"]) == errors_written(DEPTH_20)

    # Both revisions' curves of each trial, in one plot per trial.
    shell(plots_diff, clone)
    assert (clone / "dvc_plots" / "index.html").is_file()
    assert git(clone, "check-ignore", "dvc_plots/index.html").strip() == "dvc_plots/index.html"
    result = json.loads(shell(f"{plots_diff} --json", clone))
    assert "errors" not in result  # every plot of both revisions found (the PNGs in DVC's cache)
    plots = result["data"]
    assert [p["revisions"] for p in plots["reports/curves.png"]] == [[baseline_rev], [experiment]]
    plain_20 = plots["reports/curves/plain-20.csv"][0]
    assert set(plain_20["revisions"]) == {baseline_rev, experiment}
    data = plain_20["content"]["data"]["values"]
    assert plotted(data, baseline_rev, "val_error") == [(1, 0.9), (2, 0.6), (3, (0.6 + 0.08) / 2), (4, 0.08)]
    assert plotted(data, experiment, "val_error") == [(1, 0.9), (2, 0.6), (3, (0.6 + 0.0725) / 2), (4, 0.0725)]
    assert plotted(data, experiment, "train_error")[-1] == (4, 0.04)
    # A trial only the baseline has: drawn for the baseline alone.
    plain_56 = plots["reports/curves/plain-56.csv"][0]
    assert plain_56["revisions"] == [baseline_rev]
    assert plotted(plain_56["content"]["data"]["values"], baseline_rev, "val_error")[-1] == (4, 0.33)

    assert "plain-20" in shell(metrics_show, clone)
    shell(plots_show, clone)


def test_queued_experiments_keep_their_records_in_the_projects_store(clone):
    """`dvc exp run --queue` runs each experiment in a temporary copy of the repository, which
    DVC deletes after: the MLflow runs, the registry's versions and the checkpoints must land in
    the project's own store and storage (params' relative paths resolved in DVC_ROOT), and the
    experiments' metrics in `dvc exp show`."""
    shutil.copy2(REPO / ".gitignore", clone / ".gitignore")
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "--allow-empty", "-m", "this checkout's pipeline")
    tiny = "-S train.epochs=2 -S train.batch_size=64 -S 'tune.depths=[8]'"
    for name, shortcut in (("queued-a", "A"), ("queued-plain", "none")):
        shell(f"dvc exp run --queue -n {name} {tiny} -S 'tune.shortcuts=[{shortcut}]'", clone)
    shell("dvc exp run --run-all --jobs 2", clone)  # side by side, on the one project store

    _, rows = markdown_table(shell("dvc exp show --md", clone))
    shown = {name.split("[")[-1].rstrip("]"): errors_shown(row) for name, row in rows.items() if "[" in name}
    assert set(shown["queued-a"]) == {"resnet-8-A"} and set(shown["queued-plain"]) == {"plain-8"}

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resnet").experiment_id])
    sweeps = {r.data.tags["pipeline.run_name"] for r in runs if "mlflow.parentRunId" not in r.data.tags}
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(sweeps) == 2 and sorted(r.data.params["model.shortcut"] for r in trials) == ["A", "none"]
    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'resnet-digits'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    for version in versions:  # the model files outlived the copy they were logged from
        assert mlflow.pyfunc.load_model(f"models:/resnet-digits/{version.version}") is not None
    assert {p.name for p in (clone / "data" / "ray").iterdir()} >= sweeps  # each sweep's checkpoints, kept
