"""Stage `train`: one configuration (`model.*`, `train.*`) trained on the shards with Ray Train.

    python -m pipeline.train [--params params.yaml] [--set train.epochs=2] ...

Runs on a laptop, a local Ray cluster or a multi-node GPU cluster with no code change:
RAY_ADDRESS picks the cluster (else a local one starts). Rerunning the same command continues
the same run from its latest checkpoint under `paths.ray_storage`, in the same MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import checkpoints, cli, driver, tracking
from pipeline.files import write_json_atomic
from pipeline.manifest import read_manifest
from pipeline.params import Params
from resnet.summary import count_params


def train(params: Params) -> dict:
    params = driver.absolute_paths(params)
    manifest = read_manifest(params.paths.shards)  # fail early, before Ray starts
    driver.preflight(params, manifest)  # and before an MLflow run is opened for it
    manifest_sha = tracking.manifest_sha256(params.paths.shards)
    run_name = params.train.run_name or driver.default_run_name(params, manifest_sha)
    store = tracking.store(params)
    num_params = count_params(checkpoints.build_model(params, len(manifest["classes"])))
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
    tracking.log_shards_input(store, run_id, params.paths.shards, manifest_sha, manifest["source"])
    print(f"run {run_name}: MLflow run {run_id} at {tracking.redacted(store.uri)}", flush=True)
    driver.ray_init()
    result = driver.fit(params, run_name, run_id, store.uri)
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
