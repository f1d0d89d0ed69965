"""Stage `train`: one configuration (`model.*`, `train.*`) trained on the shards with Ray Train.

    python -m pipeline.train [--params params.yaml] [--set train.epochs=2] ...

Runs on a laptop, a local Ray cluster or a multi-node GPU cluster with no code change:
RAY_ADDRESS picks the cluster (else a local one starts). Rerunning the same command continues
the same run from its latest checkpoint under `paths.ray_storage`, in the same MLflow run.
After the last epoch the run's servable model (`pipeline.serving`) is logged into it, once.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from pipeline import checkpoints, cli, driver, serving, tracking
from pipeline.errors import TrackingUnavailable
from pipeline.files import write_json_atomic
from pipeline.manifest import Manifest, read_manifest
from pipeline.params import Params
from resnet.summary import count_params


def log_final_model(store: tracking.Store, run_id: str, checkpoint: str, params: Params, manifest: Manifest) -> None:
    """The servable model of the last epoch's checkpoint (Ray Train keeps the latest, whatever its
    score), in the run at that epoch; once: a rerun of a finished run trains nothing and logs
    nothing new, but the model if the store was away when the run ended."""
    try:
        if tracking.has_logged_model(store, run_id):
            return
        net = checkpoints.model_from_checkpoint(checkpoint)
        with tracking.fluent(store.uri), store.call(mlflow.start_run, run_id=run_id):
            serving.log_run_model(store, net, params, manifest, step=params.train.epochs - 1)
    except TrackingUnavailable as e:
        print(f"the run's model is not in MLflow ({e}); rerunning the same command logs it", flush=True)


def train(params: Params) -> dict:
    params = driver.absolute_paths(params)
    manifest = read_manifest(params.paths.shards)  # fail early, before Ray starts
    driver.preflight(params, manifest)  # and before an MLflow run is opened for it
    manifest_sha = tracking.manifest_sha256(params.paths.shards)
    run_name = params.train.run_name or driver.default_run_name(params, manifest_sha)
    store = tracking.store(params)
    num_params = count_params(checkpoints.build_model(params, len(manifest.classes)))
    run_id = tracking.start_or_resume_run(
        store,
        params,
        run_name,
        {
            "num_params": num_params,
            "manifest_sha256": manifest_sha,
            "run_name": run_name,
        },
        commit=tracking.git_commit(),
        source="pipeline.train",
    )
    tracking.log_shards_input(store, run_id, params.paths.shards, manifest_sha, manifest.source)
    print(f"run {run_name}: MLflow run {run_id} at {tracking.redacted(store.uri)}", flush=True)
    driver.ray_init()
    result = driver.fit(params, run_name, run_id, store.uri)
    if result.checkpoint:
        log_final_model(store, run_id, checkpoints.checkpoint_uri(result.checkpoint), params, manifest)
    summary = {
        "run_name": run_name,
        "mlflow_run_id": run_id,
        "checkpoint": checkpoints.checkpoint_uri(result.checkpoint) if result.checkpoint else None,
        "metrics": result.metrics,
    }
    store.best_effort(store.set_terminated, run_id, "FINISHED")
    return summary


def main(argv: list[str] | None = None) -> None:
    params = cli.parse("train", "Train one ResNet configuration with Ray Train.", argv)
    summary = train(params)
    out = Path(params.paths.metrics) / "train.json"
    write_json_atomic(out, summary)
    m = summary["metrics"]
    print(f"done: val top-1 error {m['val_top1_error']:.2%} after {int(m['epoch']) + 1} epochs; wrote {out}")


if __name__ == "__main__":
    cli.run(main)
