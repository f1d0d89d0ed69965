"""The Ray Train driver: one training run as a `TorchTrainer`, and what is checked before it.

`fit` starts the workers (pipeline.worker) on the cluster `ray_init` joins or starts; before
that, `preflight` checks everything params and the manifest decide, so that a bad value is one
line on the driver rather than a traceback per worker per retry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline import loader, recipe, worker
from pipeline.errors import UsageError
from pipeline.files import project_path, ray_storage
from pipeline.manifest import Manifest
from pipeline.params import EXECUTION_KEYS, Params
from pipeline.records import CHECKPOINT_SCORE, Trial


def preflight(params: Params, manifest: Manifest) -> None:
    """Everything about a run that params and the manifest decide, checked on the driver before
    Ray starts: otherwise each fails in every Ray worker, after Ray's start-up, as a traceback
    per worker per retry, or only at the epoch whose shard order happens to expose it. An elastic
    run is checked at every world size it may take, with a line for each that cannot work.
    `manifest` is one `read_manifest` accepted."""
    problems, sizes = [], params.train.world_sizes
    for world_size in sizes:
        try:
            check_world_size(params, manifest, world_size)
        except UsageError as error:
            problems.append(
                f"with {world_size} of train.num_workers={list(params.train.num_workers)}: {error}"
                if len(sizes) > 1
                else str(error)
            )
    if problems:
        raise UsageError("\n".join(problems))


def check_world_size(params: Params, manifest: Manifest, world_size: int) -> None:
    splits, train = manifest.splits, params.train
    shares = loader.batch_shares(train.batch_size, world_size)
    check_train_batches(
        [s.num_samples for s in splits["train"].shards],
        world_size,
        train.loader_workers,
        train.batch_size,
        params.paths.shards,
    )
    check_val_shards([s.num_samples for s in splits["val"].shards], world_size, params.paths.shards)
    step = recipe.micro_batches(min(shares), train.max_worker_batch)[-1]  # a rank's smallest step
    for split in ("train", "val"):
        recipe.check_image_size(params.model.arch, split, splits[split].image_size, step, params.paths.shards)


def check_train_batches(
    counts: list[int], world_size: int, loader_workers: int, global_batch: int, shards: str
) -> None:
    """Every rank makes at least one full batch in every epoch, whatever the shard order
    (`loader.sure_worker_samples`); a rank without one would stop the run."""
    if len(counts) < world_size:
        raise UsageError(
            f"train: {len(counts)} shards in {shards} for train.num_workers={world_size} ranks, and every rank "
            "reads whole shards; reshard with a smaller shard.maxcount or lower train.num_workers"
        )
    batch = max(loader.batch_shares(global_batch, world_size))
    if sum(counts) < global_batch:
        raise UsageError(f"train.batch_size: {global_batch} is more than the {sum(counts)} train samples in {shards}")
    sure = loader.sure_worker_samples(counts, world_size, loader_workers)
    if sure < batch:
        raise UsageError(
            f"train.batch_size: {global_batch} makes batches of {batch} a rank (train.num_workers={world_size}), but "
            f"some epoch's shard order may leave a rank without one: a rank gets {len(counts) // world_size} of the "
            f"{len(counts)} train shards in {shards} ({min(counts)} to {max(counts)} samples each), and its busiest "
            f"loader worker (of {max(loader_workers, 1)}, train.loader_workers={loader_workers}) is sure of only "
            f"{sure} samples; lower train.batch_size or train.loader_workers, or reshard with a smaller shard.maxcount"
        )


def check_val_shards(counts: list[int], world_size: int, shards: str) -> None:
    """Evaluation reads every val sample once across the ranks, in batches of whatever is left
    (no full batch needed), but each rank reads whole shards, and the error rate needs a sample."""
    if len(counts) < world_size:
        raise UsageError(
            f"val: {len(counts)} shards in {shards} for train.num_workers={world_size} ranks, and every rank "
            "reads whole shards; reshard with a smaller shard.maxcount or lower train.num_workers"
        )
    if sum(counts) == 0:
        raise UsageError(f"val: no samples in {shards}; the val error needs at least one")


def absolute(path: str) -> str:
    """A local path made absolute (Ray needs one, and workers run elsewhere); a URL (s3://...)
    as it is."""
    return path if "://" in path else str(Path(path).resolve())


def fit(
    params: Params,
    run_name: str,
    mlflow_run_id: str,
    uri: str,
    callbacks: list | None = None,
    say_epochs: bool = True,
) -> ray.train.Result:
    """Train one configuration. A sweep's trials pass Tune's TuneReportCallback and leave the
    epoch lines to the sweep's driver, which prints one line per trial-epoch (say_epochs=False)."""
    setup = worker.RunSetup(params=params, mlflow_run_id=mlflow_run_id, tracking_uri=uri, say_epochs=say_epochs)
    storage_path, storage_filesystem = ray_storage(absolute(params.paths.ray_storage))
    trainer = TorchTrainer(
        worker.train_loop,
        train_loop_config=setup.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=params.train.num_workers,
            elastic_resize_monitor_interval_s=params.train.resize_check_seconds,
            use_gpu=params.train.use_gpu,
            resources_per_worker={"CPU": params.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(
                max_failures=params.train.max_failures,
                max_preemption_failures=params.train.max_preemption_failures,
            ),
            checkpoint_config=CheckpointConfig(
                num_to_keep=params.train.checkpoints_to_keep,
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="min",
            ),
            callbacks=callbacks,
            # Ray Train's INFO lines (each report, each checkpoint) drown the epoch lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if params.train.use_gpu else "gloo"),
    )
    return trainer.fit()


def absolute_paths(params: Params) -> Params:
    """Every path of params `absolute`: the outputs DVC tracks against the driver's directory,
    Ray's checkpoints against the project's (`files.project_path`: a queued DVC experiment's
    checkpoints must outlive its temporary copy)."""
    paths = {k: absolute(v) for k, v in params.paths.model_dump().items()}
    paths["ray_storage"] = project_path(params.paths.ray_storage)
    return params.model_copy(update={"paths": params.paths.model_copy(update=paths)})


def default_run_name(params: Params, manifest_sha: str) -> str:
    """Same config and data -> same name -> the same command resumes rather than restarts."""
    relevant = {
        "model": params.model.model_dump(),
        "train": params.train.model_dump(exclude=set(EXECUTION_KEYS["train"])),
        "manifest": manifest_sha,
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{Trial(params.model.arch, params.model.depth, params.model.shortcut).key}-{digest}"


# What a cluster that a stage starts on its own machine runs with (Ray 2.60's Train v2 settings).
LOCAL_CLUSTER_ENV = {
    # A worker's `ray.train.report` waits until the Train controller has taken its previous
    # report, and the controller looks every 2 s by default, longer than an epoch of the digits
    # takes, so each epoch waited up to 2 s more, and each run's end as long. Polling every 0.2 s
    # costs the training nothing measurable (BENCHMARKS.md).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Ray Train watches for spot-instance preemption; one machine started here is not preempted,
    # and the watcher's actor logs an error-level line at every run's start (Ray 2.60: "Actor with
    # class name: 'PreemptionWatcher' ... has constructor arguments in the object store"). On a
    # cluster that RAY_ADDRESS names, the cluster's setting holds: on, unless it says otherwise.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def ray_init() -> None:
    """Join the cluster RAY_ADDRESS names, else start a local one (dashboard on 127.0.0.1: Ray
    Train's placement-group cleaner asks its State API whether each run's controller lives, and
    logs a warning a second without it)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    env = {key: os.environ.get(key, value) for key, value in LOCAL_CLUSTER_ENV.items()}
    ray.init(log_to_driver=True, runtime_env={"env_vars": env})
