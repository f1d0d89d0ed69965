"""Stage `register`: the sweep's best model becomes a new version in the MLflow Model Registry.

    python -m pipeline.register [--params params.yaml]

The model is logged (pickle-free `pt2`) into the best trial's MLflow run and registered as a new
version of `mlflow.registered_model`, with tags a person or a script can filter on and a
description a person can read in the UI. The alias `mlflow.alias` moves to the new version only
when its val top-1 error beats the version holding the alias; otherwise the version stays
registered without it, and the stage says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
import yaml
from mlflow.exceptions import MlflowException

import resnet
from pipeline import cli, loader, tracking, trainer
from pipeline.cli import UsageError
from pipeline.evaluate import best_trial, read_sweep
from pipeline.params import Params
from pipeline.shard import write_json_atomic

ERROR_TAG = "top1_error"


def read_eval(metrics: str) -> dict[str, Any]:
    path = Path(metrics) / "eval.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; run `python -m pipeline.evaluate` first") from None


def shards_dvc_hash(shards: str) -> str:
    """The hash dvc.lock records for the shard stage's output, if the shards came from DVC."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return "unknown"
    outs = yaml.safe_load(lock.read_text()).get("stages", {}).get("shard", {}).get("outs", [])
    return next((o.get("md5", "unknown") for o in outs), "unknown")


def description(
    params: Params, trial: dict[str, Any], evaluation: dict[str, Any], manifest: dict[str, Any], side: int
) -> str:
    spec = resnet.spec_for(resnet.model_name(params.model.arch, trial["depth"]))
    kind = "plain" if trial["shortcut"] == "none" else f"residual, shortcut option {trial['shortcut']}"
    mean = ", ".join(f"{m:.4f}" for m in manifest["mean"])
    return (
        f"{spec.depth}-layer ResNet ({kind}) trained on the {manifest['source']} shards; "
        f"val top-1 error {evaluation['top1_error']:.2%}, top-5 {evaluation['top5_error']:.2%} on "
        f"{evaluation['num_samples']} images ({evaluation['crop']} crop).\n\n"
        f"Input: float32 (N, 3, {side}, {side}), RGB scaled to [0, 1] minus the training mean ({mean}); "
        f"`pipeline.transforms.prepare_batch` makes it from uint8 images.\n"
        f"Output: logits over {len(manifest['classes'])} classes, in the manifest's order: "
        f"{', '.join(manifest['classes'][:10])}{' ...' if len(manifest['classes']) > 10 else ''}."
    )


def champion_error(client: mlflow.MlflowClient, name: str, alias: str) -> tuple[str, float] | None:
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return version.version, float(version.tags.get(ERROR_TAG, "inf"))


def register(params: Params) -> dict[str, Any]:
    trial = best_trial(read_sweep(params.paths.reports))
    evaluation = read_eval(params.paths.metrics)
    manifest = loader.read_manifest(params.paths.shards)
    uri = tracking.tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    name, alias = params.mlflow.registered_model, params.mlflow.alias

    model = trainer.model_from_checkpoint(trial["checkpoint"])
    side = trainer.val_image_side(params, manifest)
    with mlflow.start_run(run_id=trial["mlflow_run_id"]):
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=torch.zeros(2, 3, side, side).numpy(), serialization_format="pt2"
        )
    tags = {
        "depth": str(trial["depth"]),
        "shortcut": trial["shortcut"],
        ERROR_TAG: repr(evaluation["top1_error"]),
        "top5_error": repr(evaluation["top5_error"]),
        "best_val_top1_error_in_training": repr(trial["best_val_top1_error"]),
        "manifest_sha256": tracking.manifest_sha256(params.paths.shards),
        "shards_dvc_md5": shards_dvc_hash(params.paths.shards),
        "git_commit": tracking.git_commit(),
        "num_params": str(trial["num_params"]),
    }
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.update_model_version(
        name, version.version, description=description(params, trial, evaluation, manifest, side)
    )

    current = champion_error(client, name, alias)
    new_error = evaluation["top1_error"]
    if current is None or new_error < current[1]:
        client.set_registered_model_alias(name, alias, version.version)
        verdict = f"alias '{alias}' -> version {version.version}" + (
            f" (val top-1 error {new_error:.2%} beats version {current[0]}'s {current[1]:.2%})" if current else ""
        )
        moved = True
    else:
        verdict = (
            f"version {version.version} registered without the alias: its val top-1 error {new_error:.2%} "
            f"does not beat version {current[0]}'s {current[1]:.2%}, which keeps '{alias}'"
        )
        moved = False
    champion = client.get_model_version_by_alias(name, alias)
    return {
        "registered_model": name,
        "version": int(version.version),
        "alias": alias,
        "alias_moved": moved,
        "champion_version": int(champion.version),
        "top1_error": new_error,
        "model_uri": f"models:/{name}/{version.version}",
        "message": verdict,
    }


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("register", "Register the sweep's best model in the MLflow Model Registry.", argv)
    result = register(params)
    print(f"registered {result['registered_model']} version {result['version']}: {result['message']}")
    out = Path(params.paths.metrics) / "registry.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
