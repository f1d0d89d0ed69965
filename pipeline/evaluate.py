"""Stage `evaluate`: the sweep's best trial on the val shards.

    python -m pipeline.evaluate [--params params.yaml]

Top-1 and top-5 error with the centre crop (CIFAR-size nets: the single original image, as
the paper tests them) and, for ImageNet-size nets, the paper's 10-crop as well. Writes
`${paths.metrics}/eval.json` (a DVC metric) and logs the figures into
the best trial's MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline import cli, loader, tracking, trainer, transforms
from pipeline.cli import UsageError
from pipeline.params import Params
from pipeline.shard import write_json_atomic


def read_sweep(reports: str) -> list[dict[str, Any]]:
    path = Path(reports) / "sweep.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; run `python -m pipeline.tune` first") from None


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    finished = [t for t in trials if "error" not in t and t.get("checkpoint")]
    if not finished:
        raise UsageError("the sweep has no finished trial with a checkpoint")
    return min(finished, key=lambda t: t["best_val_top1_error"])


def evaluate_checkpoint(params: Params, checkpoint: str, crop: str) -> dict[str, Any]:
    """Errors of a checkpoint's model on every val sample, in one process."""
    model = trainer.model_from_checkpoint(checkpoint)
    manifest = loader.read_manifest(params.paths.shards)
    batch_size = 64 if crop == "single" else 8
    val = manifest["splits"]["val"]
    trainer.check_val_shards([shard["num_samples"] for shard in val["shards"]], 1, params.paths.shards)
    trainer.check_image_size(params.model.arch, "val", val.get("image_size"), batch_size, params.paths.shards)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    batches = loader.make_loader(
        params.paths.shards,
        "val",
        transforms.eval_transform(params.model.arch, crop),
        batch_size=batch_size,
        num_workers=params.train.loader_workers,
        epoch=0,
        seed=0,
        train=False,
        manifest=manifest,
    )
    top1, top5, seen = trainer.evaluate(
        model, batches, device, manifest["mean"], torch.autocast(device.type, enabled=False)
    )
    return {"split": "val", "crop": crop, "top1_error": top1 / seen, "top5_error": top5 / seen, "num_samples": seen}


def crops(arch: str) -> list[str]:
    return ["single", "ten"] if arch == "imagenet" else ["single"]


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("evaluate", "Evaluate the sweep's best trial on the val shards.", argv)
    best = best_trial(read_sweep(params.paths.reports))
    params = params.model_copy(
        update={"model": params.model.model_copy(update={"depth": best["depth"], "shortcut": best["shortcut"]})}
    )
    # One object (DVC shows the figures of an object, not of a list): the centre crop, and for
    # ImageNet-size nets the 10-crop figures under "ten_crop".
    result: dict[str, Any] = {"model_uri": best["checkpoint"], "depth": best["depth"], "shortcut": best["shortcut"]}
    for crop in crops(params.model.arch):
        figures = evaluate_checkpoint(params, best["checkpoint"], crop)
        if crop == "single":
            result.update(figures)
        else:
            result["ten_crop"] = {k: figures[k] for k in ("top1_error", "top5_error", "num_samples")}
        print(
            f"{best['depth']}-layer, shortcut {best['shortcut']}, {crop} crop: top-1 error {figures['top1_error']:.2%}, "
            f"top-5 error {figures['top5_error']:.2%} on {figures['num_samples']} val images"
        )
    mlflow = tracking.client(tracking.tracking_uri(params))
    for prefix, figures in (("eval_single", result), ("eval_ten", result.get("ten_crop"))):
        if figures:
            mlflow.log_metric(best["mlflow_run_id"], f"{prefix}_top1_error", figures["top1_error"])
            mlflow.log_metric(best["mlflow_run_id"], f"{prefix}_top5_error", figures["top5_error"])
    out = Path(params.paths.metrics) / "eval.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
