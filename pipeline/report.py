"""Stage `report`: pictures and a table of the sweep, beside the paper's numbers and claims.

    python -m pipeline.report [--params params.yaml]

Writes to `paths.reports`:
- `claims.json`: the paper's claims that a depth x shortcut sweep can test, each with its verdict
  (held, not held, or not tested) and the numbers behind it (`pipeline.claims`); a DVC metric;
- `curves.png`: training (dashed) and val (bold) error per epoch, plain nets in one panel and
  ResNets in another (one per shortcut option), one line per depth, on a linear axis from 0%:
  the layout of the paper's Figure 6;
- `final_errors.png`: each trial's final train error and best val error, grouped by depth, once
  with every net and once zoomed to the ResNets (a 70% bar beside a 0.3% one leaves the
  small ones unreadable), each bar labelled with its value, and the SVC baseline for the digits
  (fitted on their train split, scored on their test split);
- `results.md`: our table with the paper's number beside each comparable row (Table 6 for
  CIFAR-size nets, Tables 2 and 3 for ImageNet-size ones), the champion, and the claims;
- `trials.json`: each finished trial's best val and final train top-1 error under its name
  (`plain-20`, `resnet-56-A`), a DVC metric, so that `dvc exp show` compares every trial across
  experiments;
- `curves/<trial>.csv`: each finished trial's train and val top-1 error per epoch, the data of
  a DVC plot (dvc.yaml, top-level `plots:`), so that `dvc plots diff` overlays two revisions'
  curves.
All are logged to the sweep's MLflow run. A failed trial has no numbers to give: it is left out of trials.json and curves/, and named in results.md and claims.json.
Each file is written under a temporary name and then renamed, so DVC, Git or a reader never sees
half a file; none holds a path of this machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here or on cluster nodes
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from pipeline import artifacts, cli, files, tracking
from pipeline.artifacts import Artifact, Evaluation, Registration
from pipeline.claims import Claim, claims
from pipeline.params import Params
from pipeline.records import TABLE_COLUMNS, FailedTrial, Sweep, Trial, TrialRecord, read_sweep, table_row

# Paper, Table 6: CIFAR-10 test error (%) of the residual nets (option A).
PAPER_CIFAR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# Paper, Tables 2 and 3: ImageNet val top-1 error (%), 10-crop.
PAPER_IMAGENET = {
    (18, "none"): 27.94, (18, "A"): 27.88, (34, "none"): 28.54, (34, "A"): 25.03, (34, "B"): 24.52,
    (34, "C"): 24.19, (50, "B"): 22.85, (101, "B"): 21.75, (152, "B"): 21.43,
}  # fmt: skip
SHORTCUT_LABEL = {"none": "plain", "A": "ResNet A", "B": "ResNet B", "C": "ResNet C"}

PAPER_FIGURE6_NOTE = "cf. He et al. 2015, Fig. 6"


def paper_error(arch: str, depth: int, shortcut: str) -> str:
    if arch == "cifar":
        value = PAPER_CIFAR.get(depth) if shortcut == "A" else None
        return f"{value:.2f}% (CIFAR-10, Table 6)" if value else ""
    value = PAPER_IMAGENET.get((depth, shortcut))
    return f"{value:.2f}% (ImageNet 10-crop, Tables 2-3)" if value else ""


VERDICT = {True: "held", False: "**not held**", None: "not tested"}


def format_value(key: str, value: Any) -> str:
    """A number of the evidence as a reader wants it: errors and margins in %, counts with commas."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if "num_params" in key else str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if "ratio" in key else f"{value:.2%}"
    if isinstance(value, dict):
        return format_evidence(value)
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "; ".join(format_row(v) for v in value)
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def format_row(row: dict[str, object]) -> str:
    """One depth of a per-depth claim: `20 layers (plain best val error: 3.33%, ...)`."""
    rest = {k: v for k, v in row.items() if k != "depth"}
    return f"{row['depth']} layers ({format_evidence(rest)})" if "depth" in row else format_evidence(row)


def format_evidence(evidence: dict[str, object]) -> str:
    return ", ".join(f"{key.replace('_', ' ')}: {format_value(key, value)}" for key, value in evidence.items())


def claims_section(results: list[Claim]) -> str:
    lines = [
        "## The paper's claims, checked on this sweep",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    for c in results:
        evidence = {k: v for k, v in c.evidence.items() if k != "skipped_failed_trials"}
        lines.append(f"| {c.claim} | {VERDICT[c.held]} | {format_evidence(evidence)} |")
    held = sum(c.held is True for c in results)
    not_held = sum(c.held is False for c in results)
    lines += ["", f"{held} held, {not_held} not held, {len(results) - held - not_held} not tested."]
    failed = results[0].evidence.get("skipped_failed_trials") if results else None
    if failed:
        lines.append(f"Failed trials, left out of every claim: {', '.join(failed)}.")
    lines.append(
        "Errors are fractions of this data set's splits after this run's epochs; the paper's claims are "
        "about trends (deeper, residual, shortcut option), which is what is checked here, not its numbers."
    )
    return "\n".join(lines) + "\n"


# --- The baseline ----------------------------------------------------------------------------


def svc_baseline(params: Params) -> float | None:
    """scikit-learn's SVC, fitted on the digits' train split and scored on their test split (the
    split the champion's reported error comes from, metrics/eval.json): the non-deep baseline."""
    if params.data.source != "digits":
        return None
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from pipeline.sources import digits_split

    bunch = load_digits()
    train, _, test = digits_split(bunch.target, params.data.seed, params.data.val_fraction, params.data.test_fraction)
    svc = SVC(gamma=0.001).fit(bunch.data[train], bunch.target[train])
    return float((svc.predict(bunch.data[test]) != bunch.target[test]).mean())


# --- The pictures ----------------------------------------------------------------------------


def save_png(fig: plt.Figure, path: Path) -> None:
    """Save under a temporary name, flushed to disk, then rename, as the text outputs are
    (write_text_atomic). DVC caches the PNGs: where its cache.type links cached files into the
    workspace, writing here would go through the link into the cache; a rename replaces the link."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        fig.savefig(f, dpi=110, format="png")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def present_shortcuts(trials: list[TrialRecord]) -> list[str]:
    return [s for s in SHORTCUT_LABEL if any(t.shortcut == s for t in trials)]


def depth_colours(depths: list[int]) -> dict[int, Any]:
    # The same colour for a depth in every panel, so plain-56 and ResNet-56 are read as a pair.
    return {d: plt.cm.tab10(i % 10) for i, d in enumerate(depths)}


def percent_ceiling(values: list[float]) -> float:
    """The top of a linear % axis from 0: a bit above the largest value, so no line or bar
    leaves the plot; 1% when everything is 0, so a flat line still has an axis to sit on."""
    finite = [v for v in values if np.isfinite(v)]
    return max(max(finite, default=0.0) * 1.12, 1.0)


def plot_curves(trials: list[TrialRecord], path: Path) -> plt.Figure:
    """The paper's Figure 6: per epoch, train error dashed and val error bold (the paper's test
    error); plain nets left, ResNets right (one panel per shortcut option in the sweep), one
    line per depth; a linear axis from 0% shared by all panels."""
    trials = [t for t in trials if t.curve.epoch]
    shortcuts = present_shortcuts(trials) or ["none"]
    depths = sorted({t.depth for t in trials})
    colours = depth_colours(depths)
    top = percent_ceiling([100 * v for t in trials for v in (*t.curve.train_top1_error, *t.curve.val_top1_error)])
    # In a row as the paper's three panels; four (plain, A, B, C) as a 2 x 2 grid, not a strip.
    ncols = len(shortcuts) if len(shortcuts) <= 3 else 2
    nrows = -(-len(shortcuts) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 4 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(shortcuts) :]:
        ax.set_visible(False)
    for ax, shortcut in zip(axes.flat, shortcuts):
        for t in (t for t in trials if t.shortcut == shortcut):
            curve, colour = t.curve, colours[t.depth]
            epochs = [e + 1 for e in curve.epoch]
            # clip_on=False: a net at 0% error draws its line on the axis, not half under it.
            ax.plot(epochs, np.array(curve.train_top1_error) * 100, "--", color=colour, linewidth=1, clip_on=False)
            ax.plot(
                epochs,
                np.array(curve.val_top1_error) * 100,
                "-",
                color=colour,
                linewidth=2.2,
                label=t.trial.label,
                clip_on=False,
            )
        ax.set_title("plain" if shortcut == "none" else f"ResNet (option {shortcut})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, top)
        ax.grid(True, alpha=0.3)
        styles = [
            Line2D([], [], color="black", linestyle="--", linewidth=1, label="train (dashed)"),
            Line2D([], [], color="black", linestyle="-", linewidth=2.2, label="val (bold)"),
        ]
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + styles, fontsize=8)
    for row in axes:
        row[0].set_ylabel("top-1 error (%)")
    fig.suptitle(f"Training (dashed) and val (bold) error: plain vs ResNet ({PAPER_FIGURE6_NOTE})")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)  # out of pyplot's registry; the Figure stays readable
    return fig


SHORTCUT_COLOUR = {"none": "0.55", "A": "tab:blue", "B": "tab:orange", "C": "tab:green"}


def bar_panel(
    ax: plt.Axes, trials: list[TrialRecord], depths: list[int], shortcuts: list[str], key: str, extra: list[float]
) -> None:
    """Bars of one error per (depth, shortcut), each labelled with its value; `extra` values
    (the baseline) are kept inside the axis too."""
    width = 0.8 / len(shortcuts)
    shown = []
    for i, shortcut in enumerate(shortcuts):
        values = [
            next((100 * getattr(t, key) for t in trials if t.depth == d and t.shortcut == shortcut), np.nan)
            for d in depths
        ]
        bars = ax.bar(
            np.arange(len(depths)) + i * width,
            values,
            width,
            label=SHORTCUT_LABEL[shortcut],
            color=SHORTCUT_COLOUR[shortcut],
        )
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}%" for v in values], fontsize=7, padding=2)
        shown += values
    ax.set_xticks(np.arange(len(depths)) + width * (len(shortcuts) - 1) / 2, [f"{d} layers" for d in depths])
    # Room above the tallest bar for its label.
    ax.set_ylim(0, percent_ceiling(shown + [100 * v for v in extra]) * 1.08)
    ax.grid(True, axis="y", alpha=0.3)


def plot_final_errors(trials: list[TrialRecord], baseline: float | None, path: Path) -> plt.Figure:
    """Final train error (top row: degradation is a training-error effect, Sec. 4.1) and best
    val error (bottom row) of each trial. Left: every net on one linear axis; right, when the
    sweep has plain nets beside ResNets: the ResNets alone, on an axis scaled to them."""
    shortcuts = present_shortcuts(trials) or ["none"]
    residual = [s for s in shortcuts if s != "none"]
    depths = sorted({t.depth for t in trials})
    columns = [("plain and ResNets", shortcuts)]
    if residual and "none" in shortcuts:
        columns.append(("ResNets only (zoomed)", residual))
    rows = [("final_train_top1_error", "final train error"), ("best_val_top1_error", "best val error")]
    widths = [1.5 + 0.65 * max(len(depths), 1) * len(group) for _, group in columns]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(sum(widths), 7.5), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for r, (key, what) in enumerate(rows):
        for c, (title, group) in enumerate(columns):
            ax = axes[r][c]
            with_baseline = baseline is not None and key == "best_val_top1_error"
            bar_panel(ax, trials, depths, group, key, [baseline] if with_baseline else [])
            if with_baseline:
                ax.axhline(baseline * 100, color="black", linestyle=":", label=f"SVC baseline, test ({baseline:.2%})")
            ax.set_title(f"{what}: {title}")
            ax.set_ylabel(f"{what} (%)")
    # One legend for all panels, above them: inside a panel it would hide a tall bar.
    handles, labels = axes[-1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(labels), fontsize=8)
    fig.suptitle("Final errors of each trial: plain vs ResNet")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    save_png(fig, path)
    plt.close(fig)  # out of pyplot's registry; the Figure stays readable
    return fig


# --- For DVC: each trial's errors and curves, comparable across experiments ------------------

TRIALS_METRICS = "trials.json"
CURVES = "curves"


def trial_metrics(trials: list[TrialRecord]) -> dict[str, dict[str, float]]:
    """trials.json: `{"plain-20": {"best_val_error": ..., "final_train_error": ...}, ...}` for the
    finished trials, in the sweep's order, under their `Trial.key`. DVC flattens nested keys with
    dots, so `dvc exp show` has one column per trial and error (`plain-20.best_val_error`), and an
    experiment without a trial shows `-` there."""
    return {
        t.trial.key: {"best_val_error": t.best_val_top1_error, "final_train_error": t.final_train_top1_error}
        for t in trials
    }


def curve_csv(trial: TrialRecord) -> str:
    """One trial's curve as CSV: `epoch,train_error,val_error`, epochs counted from 1 as in
    curves.png (the sweep's records count them from 0). DVC plots read CSV by column names
    (https://dvc.org/doc/user-guide/experiment-management/visualizing-plots)."""
    curve = trial.curve
    rows = ["epoch,train_error,val_error"]
    rows += [
        f"{epoch + 1},{float(train)!r},{float(val)!r}"
        for epoch, train, val in zip(curve.epoch, curve.train_top1_error, curve.val_top1_error)
    ]
    return "\n".join(rows) + "\n"


def write_curves(out: Path, trials: list[TrialRecord]) -> None:
    """`out/curves/`, one CSV per finished trial with a curve, replaced as a whole: the new files
    are written into a staging folder that then takes the old one's place, so a trial that an
    earlier sweep had and this one has not leaves no file behind for `dvc plots` to draw."""
    final = out / CURVES
    staging = out / f"{CURVES}.tmp-{os.getpid()}"
    previous = out / f"{CURVES}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for t in trials:
        if t.curve.epoch:
            files.write_text_atomic(staging / f"{t.trial.key}.csv", curve_csv(t))
    # A folder cannot be renamed onto a folder that holds files: move the old one aside first.
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    files.fsync_dir(out)
    shutil.rmtree(previous, ignore_errors=True)


# --- The table -------------------------------------------------------------------------------


def results_table(
    params: Params,
    trials: list[TrialRecord | FailedTrial],
    evaluation: Evaluation | None,
    registry: Registration | None,
    baseline: float | None,
) -> str:
    lines = [
        f"# Sweep results: {params.data.source}, {params.model.arch}-style nets",
        "",
        "| " + " | ".join([*TABLE_COLUMNS, "paper"]) + " |",
        "|---" * (len(TABLE_COLUMNS) + 1) + "|",
    ]
    for t in trials:
        paper = "" if isinstance(t, FailedTrial) else paper_error(params.model.arch, t.depth, t.shortcut)
        lines.append("| " + " | ".join([*table_row(t), paper]) + " |")
    lines.append("")
    if evaluation:
        e = evaluation
        lines.append(
            f"Best trial ({Trial(params.model.arch, e.depth, e.shortcut).label}) on {e.num_samples} {e.split} images, "
            f"{e.crop} crop: top-1 error {e.top1_error:.2%}, top-5 error {e.top5_error:.2%}."
        )
        if e.ten_crop:
            lines.append(f"10-crop: top-1 error {e.ten_crop.top1_error:.2%}, top-5 error {e.ten_crop.top5_error:.2%}.")
    if baseline is not None:
        lines.append(
            f"SVC baseline (scikit-learn, gamma=0.001), fitted on the same train split, on the test split: "
            f"top-1 error {baseline:.2%}."
        )
    if registry:
        lines.append("")
        lines.append(f"Registry: {registry.registered_model} version {registry.version}; {registry.message}.")
    lines.append("")
    lines.append(
        "The paper's numbers are for its data sets (CIFAR-10 test set, ImageNet val), shown beside the "
        "rows of the same architecture: a guide to the trend across depth and shortcut, not a target "
        "for another data set."
    )
    lines.append("")
    lines.append(claims_section(claims(trials)))
    return "\n".join(lines).rstrip("\n") + "\n"


def read_optional(path: Path, model: type[Artifact]) -> Artifact | None:
    """An earlier stage's file, if it is there: the report draws the sweep without them."""
    return artifacts.read(str(path), model) if path.is_file() else None


OUTPUTS = ("claims.json", TRIALS_METRICS, "curves.png", "final_errors.png", "results.md")


def write_report(
    out: Path,
    params: Params,
    sweep: Sweep,
    evaluation: Evaluation | None,
    registry: Registration | None,
    baseline: float | None,
) -> list[Claim]:
    """Every output of the stage under `out`, from the records alone (no MLflow); the claims."""
    out.mkdir(parents=True, exist_ok=True)
    results = claims(sweep.trials)
    verdicts = [c.model_dump(mode="json") for c in results]
    files.write_text_atomic(out / "claims.json", json.dumps(verdicts, indent=1) + "\n")
    files.write_text_atomic(out / TRIALS_METRICS, json.dumps(trial_metrics(sweep.finished), indent=1) + "\n")
    write_curves(out, sweep.finished)
    plot_curves(sweep.finished, out / "curves.png")
    plot_final_errors(sweep.finished, baseline, out / "final_errors.png")
    files.write_text_atomic(out / "results.md", results_table(params, sweep.trials, evaluation, registry, baseline))
    return results


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("report", "Plots, tables and claims of the sweep, beside the paper's.", argv)
    sweep = read_sweep(params.paths.reports)
    out = Path(params.paths.reports)
    baseline = svc_baseline(params)
    evaluation = read_optional(Path(params.paths.metrics) / Evaluation.FILE, Evaluation)
    registry = read_optional(Path(params.paths.metrics) / Registration.FILE, Registration)
    results = write_report(out, params, sweep, evaluation, registry, baseline)

    store = tracking.store(params)
    for name in OUTPUTS:
        store.log_artifact(sweep.mlflow_run_id, str(out / name), artifact_path="report")
    store.log_artifacts(sweep.mlflow_run_id, str(out / CURVES), artifact_path=f"report/{CURVES}")
    store.log_metric(sweep.mlflow_run_id, "claims_held", sum(c.held is True for c in results))
    store.log_metric(sweep.mlflow_run_id, "claims_not_held", sum(c.held is False for c in results))
    if baseline is not None:
        store.log_metric(sweep.mlflow_run_id, "svc_baseline_test_top1_error", baseline)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join([*(str(out / name) for name in OUTPUTS), f"{out / CURVES}/"]))


if __name__ == "__main__":
    cli.run(main)
