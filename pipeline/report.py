"""Stage `report`: pictures and a table of the sweep, beside the paper's numbers.

    python -m pipeline.report [--params params.yaml]

Writes to `paths.reports`:
- `curves.png`: training (dashed) and val (bold) error per epoch, one panel per shortcut type,
  one line per depth: plain nets beside residual ones, as in the paper's Figures 4 and 6;
- `final_errors.png`: each trial's best val error, grouped by depth (and the SVC baseline for
  the digits);
- `results.md`: our table with the paper's number beside each comparable row (Table 6 for
  CIFAR-size nets, Tables 2 and 3 for ImageNet-size ones) and the champion.
All three are logged to the sweep's MLflow run; dvc.yaml declares the PNGs as DVC plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here or on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from pipeline import cli, tracking
from pipeline.evaluate import read_sweep
from pipeline.params import Params

# Paper, Table 6: CIFAR-10 test error (%) of the residual nets (option A).
PAPER_CIFAR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# Paper, Tables 2 and 3: ImageNet val top-1 error (%), 10-crop.
PAPER_IMAGENET = {
    (18, "none"): 27.94, (18, "A"): 27.88, (34, "none"): 28.54, (34, "A"): 25.03, (34, "B"): 24.52,
    (34, "C"): 24.19, (50, "B"): 22.85, (101, "B"): 21.75, (152, "B"): 21.43,
}  # fmt: skip
SHORTCUT_LABEL = {"none": "plain", "A": "ResNet (A)", "B": "ResNet (B)", "C": "ResNet (C)"}


def paper_error(arch: str, depth: int, shortcut: str) -> str:
    if arch == "cifar":
        value = PAPER_CIFAR.get(depth) if shortcut == "A" else None
        return f"{value:.2f}% (CIFAR-10, Table 6)" if value else ""
    value = PAPER_IMAGENET.get((depth, shortcut))
    return f"{value:.2f}% (ImageNet 10-crop, Tables 2-3)" if value else ""


def svc_baseline(params: Params) -> float | None:
    """scikit-learn's SVC on the same digits split: the fair non-deep baseline."""
    if params.data.source != "digits":
        return None
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from pipeline.sources import digits_split

    bunch = load_digits()
    train, val = digits_split(bunch.target, params.data.seed, params.data.val_fraction)
    svc = SVC(gamma=0.001).fit(bunch.data[train], bunch.target[train])
    return float((svc.predict(bunch.data[val]) != bunch.target[val]).mean())


def plot_curves(trials: list[dict[str, Any]], path: Path) -> None:
    shortcuts = [s for s in SHORTCUT_LABEL if any(t["shortcut"] == s for t in trials)]
    depths = sorted({t["depth"] for t in trials})
    colours = dict(zip(depths, plt.cm.viridis(np.linspace(0.1, 0.85, len(depths)))))
    fig, axes = plt.subplots(1, len(shortcuts), figsize=(5 * len(shortcuts), 4), sharey=True, squeeze=False)
    for ax, shortcut in zip(axes[0], shortcuts):
        for t in (t for t in trials if t["shortcut"] == shortcut):
            curve, colour = t["curve"], colours[t["depth"]]
            epochs = [e + 1 for e in curve["epoch"]]
            ax.plot(epochs, np.array(curve["train_top1_error"]) * 100, "--", color=colour, linewidth=1)
            ax.plot(
                epochs,
                np.array(curve["val_top1_error"]) * 100,
                "-",
                color=colour,
                linewidth=2,
                label=f"{t['depth']}-layer",
            )
        ax.set_title(SHORTCUT_LABEL[shortcut])
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="bold: val, dashed: train")
    axes[0][0].set_ylabel("top-1 error (%)")
    fig.suptitle("Training and val error per epoch: plain vs residual nets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final_errors(trials: list[dict[str, Any]], baseline: float | None, path: Path) -> None:
    shortcuts = [s for s in SHORTCUT_LABEL if any(t["shortcut"] == s for t in trials)]
    depths = sorted({t["depth"] for t in trials})
    width = 0.8 / len(shortcuts)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(depths), 4))
    for i, shortcut in enumerate(shortcuts):
        values = [
            next(
                (t["best_val_top1_error"] * 100 for t in trials if t["depth"] == d and t["shortcut"] == shortcut),
                np.nan,
            )
            for d in depths
        ]
        bars = ax.bar(np.arange(len(depths)) + i * width, values, width, label=SHORTCUT_LABEL[shortcut])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    if baseline is not None:
        ax.axhline(baseline * 100, color="grey", linestyle=":", label=f"SVC baseline ({baseline:.2%})")
    ax.set_xticks(np.arange(len(depths)) + width * (len(shortcuts) - 1) / 2, [f"{d} layers" for d in depths])
    ax.set_ylabel("best val top-1 error (%)")
    ax.set_title("Best val error of each trial")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(
    params: Params, trials: list[dict[str, Any]], evaluation: dict | None, registry: dict | None, baseline: float | None
) -> str:
    lines = [
        f"# Sweep results: {params.data.source}, {params.model.arch}-style nets",
        "",
        "| depth | shortcut | params | best val top-1 | final train top-1 | epochs | wall time | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        if "error" in t:
            lines.append(f"| {t['depth']} | {t['shortcut']} | failed | | | | | |")
            continue
        lines.append(
            f"| {t['depth']} | {SHORTCUT_LABEL[t['shortcut']]} | {t['num_params']:,} | {t['best_val_top1_error']:.2%} "
            f"| {t['final_train_top1_error']:.2%} | {t['epochs']} | {t['wall_time_s']:.0f} s "
            f"| {paper_error(params.model.arch, t['depth'], t['shortcut'])} |"
        )
    if baseline is not None:
        lines.append(f"| | SVC (scikit-learn, gamma=0.001) | | {baseline:.2%} | | | | |")
    lines.append("")
    if evaluation:
        e = evaluation
        lines.append(
            f"Best trial ({e['depth']}-layer, shortcut {e['shortcut']}) on {e['num_samples']} val images, "
            f"{e['crop']} crop: top-1 error {e['top1_error']:.2%}, top-5 error {e['top5_error']:.2%}."
        )
        if "ten_crop" in e:
            lines.append(
                f"10-crop: top-1 error {e['ten_crop']['top1_error']:.2%}, top-5 error {e['ten_crop']['top5_error']:.2%}."
            )
    if registry:
        lines.append("")
        lines.append(f"Registry: {registry['registered_model']} version {registry['version']}; {registry['message']}.")
    lines.append("")
    lines.append(
        "The paper's numbers are for its data sets (CIFAR-10 test set, ImageNet val), shown beside the "
        "rows of the same architecture: a guide to the trend across depth and shortcut, not a target "
        "for another data set."
    )
    return "\n".join(lines) + "\n"


def read_optional(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("report", "Plots and tables of the sweep, beside the paper's numbers.", argv)
    trials = read_sweep(params.paths.reports)
    finished = [t for t in trials if "error" not in t]
    out = Path(params.paths.reports)
    baseline = svc_baseline(params)
    plot_curves(finished, out / "curves.png")
    plot_final_errors(finished, baseline, out / "final_errors.png")
    evaluation = read_optional(Path(params.paths.metrics) / "eval.json")
    registry = read_optional(Path(params.paths.metrics) / "registry.json")
    (out / "results.md").write_text(results_table(params, trials, evaluation, registry, baseline))

    mlflow = tracking.client(tracking.tracking_uri(params))
    if finished:
        parent = mlflow.get_run(finished[0]["mlflow_run_id"]).data.tags.get("mlflow.parentRunId")
        if parent:
            for name in ("curves.png", "final_errors.png", "results.md"):
                mlflow.log_artifact(parent, str(out / name), artifact_path="report")
            if baseline is not None:
                mlflow.log_metric(parent, "svc_baseline_val_top1_error", baseline)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'curves.png'}, {out / 'final_errors.png'}, {out / 'results.md'}")


if __name__ == "__main__":
    cli.run(main)
