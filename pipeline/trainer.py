"""One training run as a Ray Train `TorchTrainer`: the worker loop and the driver that fits it.

The worker loop runs on every rank: DDP (gloo on CPU, NCCL on GPU), the paper's recipe
(pipeline.recipe), a checkpoint and a `ray.train.report` per epoch. Rank 0 alone prints the
epoch line and writes MLflow. A rerun with the same run name, or Ray's restart after a worker
dies (`train.max_failures`), continues from the latest checkpoint; per-epoch seeds derive from
(train.seed, epoch, rank), so the resumed run draws the same random numbers it would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import mlflow
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution import context as train_context

import resnet
from pipeline import loader, recipe, serving, tracking, transforms
from pipeline.errors import UsageError
from pipeline.images import Conversion
from pipeline.manifest import read_manifest
from pipeline.params import EXECUTION_KEYS, Params

CHECKPOINT_FILE = "checkpoint.pt"
METRIC = "val_top1_error"  # what "best" means for checkpoints, trials and models


def say(line: str) -> None:
    """One line to the driver's console. (Ray Train routes print() both to its logger and to
    stdout, which shows every line twice.)"""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def build_model(params: Params, num_classes: int) -> torch.nn.Module:
    return resnet.build(
        resnet.model_name(params.model.arch, params.model.depth),
        shortcut=params.model.shortcut,
        num_classes=num_classes,
        bottleneck=params.model.bottleneck,
        zero_init_residual=params.model.zero_init_residual,
    )


def model_args(params: Params, num_classes: int) -> dict[str, Any]:
    """What `resnet.build` needs to rebuild the net from a checkpoint's weights."""
    return {
        "name": resnet.model_name(params.model.arch, params.model.depth),
        "shortcut": params.model.shortcut,
        "num_classes": num_classes,
        "bottleneck": params.model.bottleneck,
        "zero_init_residual": params.model.zero_init_residual,
    }


def load_checkpoint(uri: str | Path) -> dict[str, Any]:
    """A checkpoint's state from a local folder or a URL (s3://...); tensors and plain data only."""
    with fsspec.open(f"{str(uri).rstrip('/')}/{CHECKPOINT_FILE}", "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where a Ray checkpoint lives, as a path or URL others can open (Ray's own `path` drops
    the scheme of remote storage)."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def model_from_checkpoint(path: str | Path) -> torch.nn.Module:
    state = load_checkpoint(path)
    model = resnet.build(**state["model_args"])
    model.load_state_dict(state["model"])
    return model.eval()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return hash((seed, epoch, rank)) & 0x7FFFFFFF


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def run_epoch(model, batches, optimizer, device, mean, lighting, autocast, lr_at) -> tuple[float, float, int]:
    """One training epoch on this rank: (sum of losses, number of errors, samples). `lr_at`
    gives each step's lr from how far through the epoch it is (0..1]: a warm-up moves per step."""
    model.train()
    loss_sum, errors, seen, images = 0.0, 0, 0, None
    steps = len(batches)
    for step, (pixels, labels) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at((step + 1) / steps)
        # The last step's input buffer is reused: its backward pass is done.
        images = transforms.prepare_batch(pixels.to(device, non_blocking=True), mean, lighting, out=images)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        errors += (logits.argmax(1) != labels).sum().item()
        seen += len(labels)
    return loss_sum, errors, seen


class Scores(NamedTuple):
    """Sums over some images, so that ranks and batches add up: divide by `seen`."""

    top1: int  # top-1 errors
    top5: int  # top-5 errors
    loss_sum: float  # cross-entropy (nats): the val loss breaks ties between equal error counts
    seen: int  # images


@torch.no_grad()
def evaluate(model, batches, device, mean, autocast) -> Scores:
    """Errors and cross-entropy on this rank's share of a split's shards.
    A (N, 10, ...) batch of 10-crops is scored on the mean of its crops' softmax, and its loss is
    that mean's: -log of the label's mean probability (one crop: the plain cross-entropy)."""
    model.eval()
    top1, top5, loss_sum, seen, images = 0, 0, 0.0, 0, None
    for pixels, labels in batches:
        crops = pixels.shape[1] if pixels.dim() == 5 else 1
        images = transforms.prepare_batch(pixels.to(device, non_blocking=True), mean, lighting=False, out=images)
        labels = labels.to(device)
        with autocast:
            logits = model(images).float()
        # log of the crops' mean softmax, from log-probabilities: no log(0) for a confident net
        log_probs = torch.logsumexp(logits.log_softmax(1).view(len(labels), crops, -1), dim=1) - math.log(crops)
        best5 = log_probs.topk(min(5, log_probs.shape[1]), dim=1).indices
        top1 += (best5[:, 0] != labels).sum().item()
        top5 += (~(best5 == labels[:, None]).any(1)).sum().item()
        loss_sum -= log_probs.gather(1, labels[:, None]).sum().item()
        seen += len(labels)
    return Scores(top1, top5, loss_sum, seen)


def quiet_worker_logs() -> None:
    """Keep the console to the epoch lines; Ray's log files keep everything."""
    # Ray Train logs every `ray.train.report` at INFO, a whole TrainingReport a line, under a
    # logger named by its file's path: outside "ray.train", so LoggingConfig's level misses it.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # MLflow's system-metrics monitor says at INFO when it starts, stops, and that it skips GPUs.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function of the TorchTrainer."""
    quiet_worker_logs()
    params = Params.model_validate(config["params"])
    run_id: str = config["mlflow_run_id"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(params.train.cpus_per_worker)
    on_gpu = device.type == "cuda"

    manifest = read_manifest(params.paths.shards)
    num_classes, mean = len(manifest["classes"]), manifest["mean"]
    arch = params.model.arch
    flip = manifest["source"] != "digits"  # a mirrored digit is another symbol, or none

    torch.manual_seed(params.train.seed)  # the same initial weights on every rank
    net = build_model(params, num_classes)
    if on_gpu:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)  # moves to the device, wraps in DDP
    if params.train.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.base_lr(params),
        momentum=params.train.momentum,
        weight_decay=params.train.weight_decay,
    )
    schedule = recipe.schedule(params)
    batch = recipe.per_worker_batch(params.train.batch_size, world_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()

    history: list[dict[str, float]] = []
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, start_epoch = state["history"], state["epoch"] + 1

    # Where the ranks run, for the record (a multi-node run should show several nodes).
    nodes: list[str] = [ray.get_runtime_context().get_node_id()] * world_size
    if dist.is_initialized():
        dist.all_gather_object(nodes, nodes[0])

    mlflow_client = None
    if rank == 0:
        mlflow_client = tracking.client(config["tracking_uri"])
        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
        mlflow.set_tags({"ray.world_size": world_size, "ray.nodes": ",".join(sorted(set(nodes)))})
        # After a crash: an epoch checkpointed just before it may not have reached MLflow (log
        # it now), and one logged after the last checkpoint Ray registered will be trained
        # again (do not log it twice).
        logged = tracking.logged_steps(mlflow_client, run_id, METRIC)
        for entry in history:
            if int(entry["epoch"]) not in logged:
                tracking.log_epoch(mlflow_client, run_id, int(entry["epoch"]), entry, int(time.time() * 1000))
                logged.add(int(entry["epoch"]))
        if start_epoch:
            say(f"resuming {context.get_experiment_name()} at epoch {start_epoch + 1}")

    def epoch_batches(split: str, epoch: int) -> loader.Batches:
        train = split == "train"
        return loader.make_loader(
            params.paths.shards,
            split,
            transforms.train_transform(arch, flip) if train else transforms.eval_transform(arch),
            batch_size=batch,
            num_workers=params.train.loader_workers,
            epoch=epoch,
            seed=params.train.seed,
            train=train,
            manifest=manifest,
            pin_memory=on_gpu,
        )

    for epoch in range(start_epoch, params.train.epochs):
        torch.manual_seed(epoch_seed(params.train.seed, epoch, rank))
        lr = schedule.lr(epoch)  # at the epoch's end, for the record
        started = time.perf_counter()
        train_batches = epoch_batches("train", epoch)
        loss_sum, errors, seen = run_epoch(
            model, train_batches, optimizer, device, mean, arch == "imagenet", autocast, partial(schedule.lr, epoch)
        )
        train_seconds = time.perf_counter() - started
        loss_sum, errors, seen = all_reduce_sum([loss_sum, errors, seen], device)

        val_batches = epoch_batches("val", epoch)
        top1, top5, val_loss_sum, val_seen = all_reduce_sum(
            list(evaluate(getattr(model, "module", model), val_batches, device, mean, autocast)), device
        )
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_top1_error": errors / seen,
            "val_top1_error": top1 / val_seen,
            "val_top5_error": top5 / val_seen,
            "val_loss": val_loss_sum / val_seen,  # the registry's tie-break (pipeline.register)
            "lr": lr,
            "images_per_s": seen / train_seconds,
            "epoch_time_s": time.perf_counter() - started,
        }
        schedule.step(metrics["train_top1_error"], metrics["val_top1_error"])
        history.append(metrics)

        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                torch.save(
                    {
                        "model_args": model_args(params, num_classes),
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "mean": mean,
                    },
                    Path(directory) / CHECKPOINT_FILE,
                )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)

        if rank == 0 and epoch not in logged:
            tracking.log_epoch(mlflow_client, run_id, epoch, metrics, int(time.time() * 1000))
            logged.add(epoch)
        if rank == 0 and config["say_epochs"]:
            say(
                f"epoch {epoch + 1}/{params.train.epochs}  lr {lr:.4g}  train loss {metrics['train_loss']:.4f}"
                f"  train err {metrics['train_top1_error']:.2%}  val err {metrics['val_top1_error']:.2%}"
                f" (top-5 {metrics['val_top5_error']:.2%})  {metrics['images_per_s']:.0f} img/s"
                f"  {metrics['epoch_time_s']:.1f} s"
            )

    if history and start_epoch >= params.train.epochs:
        # Resumed after its last epoch was checkpointed but before whoever waits on this run took
        # the result (a Ctrl-C in between): say the final result again, or a sweep would see a
        # trial that never reported and count it unfinished.
        ray.train.report(history[-1])

    if rank == 0:
        # Once per run: a rerun of a finished run trains nothing and logs nothing new.
        if config["log_model"] and not tracking.has_logged_model(config["tracking_uri"], run_id):
            # The servable model (pipeline.serving), at the last epoch: it carries that epoch's metrics.
            setup = serving.setup_of(arch, manifest, Conversion.of(params.shard))
            examples = serving.example_images(params.paths.shards, manifest)
            serving.log_model(net, setup, examples, step=params.train.epochs - 1)
        mlflow.end_run()


def preflight(params: Params, manifest: dict[str, Any]) -> None:
    """Everything about a run that params and the manifest decide, checked on the driver before
    Ray starts: otherwise each fails in every Ray worker, after Ray's start-up, as a traceback
    per worker per retry, or only at the epoch whose shard order happens to expose it.
    `manifest` is one `read_manifest` accepted."""
    world_size = params.train.num_workers
    batch = recipe.per_worker_batch(params.train.batch_size, world_size)
    splits = manifest["splits"]
    check_train_batches(
        [s["num_samples"] for s in splits["train"]["shards"]],
        world_size,
        params.train.loader_workers,
        params.train.batch_size,
        params.paths.shards,
    )
    check_val_shards([s["num_samples"] for s in splits["val"]["shards"]], world_size, params.paths.shards)
    for split in ("train", "val"):
        check_image_size(params.model.arch, split, splits[split].get("image_size"), batch, params.paths.shards)


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
    batch = recipe.per_worker_batch(global_batch, world_size)
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


def check_image_size(arch: str, split: str, size: dict[str, Any] | None, batch: int, shards: str) -> None:
    """What the arch asks of a split's image sizes (manifest `image_size`; None: not recorded,
    or no images). ImageNet-size nets scale and crop every image to 224x224, from any size.
    CIFAR-size nets take each image whole (padded and cropped back to its own size), so a batch
    stacks images as they are and needs one size throughout; and the net halves the sides twice,
    so images of 4x4 or less reach its last stage as 1x1, where BatchNorm cannot train on a batch
    of one (one value per channel)."""
    if arch != "cifar" or size is None:
        return
    if size["uniform"] is None:
        raise UsageError(
            f"model.arch: cifar nets take images whole, so a batch needs one image size, but the {split} images in "
            f"{shards} have sides from {size['min_side']} to {size['max_side']} pixels; use model.arch=imagenet "
            "(224x224 crops of any size) or resize the images to one size"
        )
    width, height = size["uniform"]
    if split == "train" and batch == 1 and (width + 3) // 4 * ((height + 3) // 4) == 1:
        raise UsageError(
            f"train.batch_size: 1 image a rank of {width}x{height} pixels leaves the cifar net's BatchNorm one value "
            "per channel in its last stage; use at least 2 images a rank, or larger images"
        )


def storage_path(path: str) -> str:
    """Ray needs an absolute local path; URLs (s3://...) pass as they are."""
    return path if "://" in path else str(Path(path).resolve())


def fit(
    params: Params,
    run_name: str,
    mlflow_run_id: str,
    uri: str,
    log_model: bool = True,
    callbacks: list | None = None,
    say_epochs: bool = True,
) -> ray.train.Result:
    """Train one configuration. A sweep's trials pass Tune's TuneReportCallback, leave the
    model to the register stage (log_model=False) and the epoch lines to the sweep's driver,
    which prints one line per trial-epoch (say_epochs=False)."""
    config = {
        "params": params.model_dump(mode="json"),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": uri,
        "log_model": log_model,
        "say_epochs": say_epochs,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=params.train.num_workers,
            use_gpu=params.train.use_gpu,
            resources_per_worker={"CPU": params.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(params.paths.ray_storage),
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=params.train.checkpoints_to_keep,
                checkpoint_score_attribute=METRIC,
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
    """Local paths resolved against the driver's directory: workers run elsewhere."""
    paths = {k: (v if "://" in v else str(Path(v).resolve())) for k, v in params.paths.model_dump().items()}
    return params.model_copy(update={"paths": params.paths.model_copy(update=paths)})


def default_run_name(params: Params, manifest_sha: str) -> str:
    """Same config and data -> same name -> the same command resumes rather than restarts."""
    relevant = {
        "model": params.model.model_dump(),
        "train": params.train.model_dump(exclude=set(EXECUTION_KEYS["train"])),
        "manifest": manifest_sha,
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{resnet.model_name(params.model.arch, params.model.depth)}-{params.model.shortcut}-{digest}"


def ray_init() -> None:
    """Join the cluster RAY_ADDRESS names, else start a local one (dashboard on 127.0.0.1)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Train watches for spot-instance preemption; one machine started here is not preempted,
    # and the watcher's actor logs an error-level line at every run's start (Ray 2.60: "Actor with
    # class name: 'PreemptionWatcher' ... has constructor arguments in the object store").
    ray.init(log_to_driver=True, runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
