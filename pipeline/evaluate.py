"""Stage `evaluate`: the sweep's best trial on the test shards.

    python -m pipeline.evaluate [--params params.yaml]

The val split chose the trial (and, in training, its best epoch); the figures reported here
come from the test split, which chose nothing, so they are not flattered by the choosing (the
paper's protocol: He et al. 2015, Sec. 4.2, selects on a val split held out of training and
reports the test set). Top-1 and top-5 error with the centre crop (CIFAR-size nets: the single
original image, as the paper tests them) and, for ImageNet-size nets, the paper's 10-crop as
well. Writes `${paths.metrics}/eval.json` (a DVC metric, `"split": "test"`) and logs the
figures into the best trial's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import artifacts, checkpoints, cli, loader, recipe, scoring, tracking, transforms
from pipeline.artifacts import Evaluation, Scores
from pipeline.errors import UsageError
from pipeline.manifest import read_manifest
from pipeline.params import Params
from pipeline.records import read_sweep

# Images a batch: a 10-crop batch is ten times the pixels of a single-crop batch of as many images.
EVAL_BATCH = {"single": 64, "ten": 8}


def evaluate_checkpoint(params: Params, checkpoint: str, crop: str, split: str = "test") -> Scores:
    """Errors of a checkpoint's model on every sample of a split, in one process."""
    model = checkpoints.model_from_checkpoint(checkpoint)
    manifest = read_manifest(params.paths.shards)
    batch_size = EVAL_BATCH[crop]
    info = manifest.splits[split]
    if info.num_samples == 0:
        raise UsageError(f"{split}: no samples in {params.paths.shards}; the {split} error needs at least one")
    recipe.check_image_size(params.model.arch, split, info.image_size, batch_size, params.paths.shards)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    batches = loader.make_loader(
        params.paths.shards,
        split,
        transforms.eval_transform(params.model.arch, crop),
        batch_size=batch_size,
        num_workers=params.train.loader_workers,
        epoch=0,
        seed=0,
        train=False,
        manifest=manifest,
    )
    scores = scoring.score(model, batches, device, manifest.mean, torch.autocast(device.type, enabled=False))
    return Scores(
        top1_error=scores.top1 / scores.seen,
        top5_error=scores.top5 / scores.seen,
        loss=scores.loss_sum / scores.seen,
        num_samples=scores.seen,
    )


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("evaluate", "Evaluate the sweep's best trial on the test shards.", argv)
    best = read_sweep(params.paths.reports).best_trial()
    params = params.model_copy(
        update={"model": params.model.model_copy(update={"depth": best.depth, "shortcut": best.shortcut})}
    )
    crops = {crop: evaluate_checkpoint(params, best.checkpoint, crop, "test") for crop in recipe.PROFILES[params.model.arch].test_crops}
    for crop, scores in crops.items():
        print(
            f"{best.trial.label}, {crop} crop: top-1 error {scores.top1_error:.2%}, top-5 error {scores.top5_error:.2%} "
            f"on {scores.num_samples} test images (chosen on val: {best.best_val_top1_error:.2%})"
        )
    result = Evaluation(
        mlflow_run_id=best.mlflow_run_id,
        checkpoint_name=Path(best.checkpoint).name,
        depth=best.depth,
        shortcut=best.shortcut,
        split="test",
        crop="single",
        ten_crop=crops.get("ten"),
        **crops["single"].model_dump(),
    )
    # At the step of the checkpoint's epoch: the model register logs there carries them too.
    store = tracking.store(params)
    for prefix, scores in (("test_single", crops["single"]), ("test_ten", crops.get("ten"))):
        if scores:
            store.log_metric(best.mlflow_run_id, f"{prefix}_top1_error", scores.top1_error, step=best.best_epoch)
            store.log_metric(best.mlflow_run_id, f"{prefix}_top5_error", scores.top5_error, step=best.best_epoch)
    out = Path(params.paths.metrics) / Evaluation.FILE
    artifacts.write(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
