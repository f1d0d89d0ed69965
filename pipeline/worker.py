"""The Ray Train worker: one rank of a training run.

Every rank runs `train_loop`: DDP (gloo on CPU, NCCL on GPU), the paper's recipe
(pipeline.recipe), and per epoch a checkpoint and a `ray.train.report`. Rank 0 alone prints the
epoch line and writes MLflow, from a thread of its own (`tracking.RunWriter`): a store that is
slow or away never holds up a step. A rerun with the same run name, or Ray's restart after a worker
dies (`train.max_failures`), continues from the latest checkpoint; per-epoch seeds derive from
(train.seed, epoch, rank), so the resumed run draws the same random numbers it would have.

With `train.checkpoint_every_steps`, every rank also stops every that many steps for a step
checkpoint: the epoch's sums so far, and every rank's random state and loader position. A run
resumed from one goes on mid-epoch with the batches, crops and lr an uninterrupted run would have
had (`loader.Resume`), so a lost node costs the steps since it rather than the epoch.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from ray.train import Checkpoint, CheckpointConsistencyMode, CheckpointUploadMode

from pipeline import checkpoints, loader, recipe, tracking, transforms
from pipeline.manifest import Manifest, read_manifest
from pipeline.params import Params
from pipeline.records import CHECKPOINT_SCORE, STEPS_INTO_EPOCH, EpochMetrics, val_rank_score
from pipeline.scoring import score


def say(line: str) -> None:
    """One line to the driver's console. (Ray Train routes print() both to its logger and to
    stdout, which shows every line twice.)"""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class EpochSums:
    """A training epoch's running sums on this rank (a resumed epoch's rank 0 starts from those
    of every rank at the step checkpoint)."""

    loss_sum: float = 0.0
    errors: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0  # in steps: waiting for the batch and training on it (not checkpoints)


@dataclass(frozen=True)
class StepShape:
    """How a rank trains on its share of a step's global batch: in pieces of at most
    `max_piece` samples (None: whole), each piece's mean loss weighted by its part of the global
    batch times the world size, since DDP averages the ranks' gradients. The step's gradient is
    then that of the global batch's mean loss, whatever the world size, shares or pieces."""

    world_size: int
    global_batch: int
    max_piece: int | None = None

    def weight(self, samples: int) -> float:
        return samples * self.world_size / self.global_batch  # 1.0 exactly for an equal, whole share


def run_epoch(
    model: torch.nn.Module,
    batches: loader.EpochBatches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    mean: list[float],
    lighting: bool,
    autocast: AbstractContextManager,
    lr_at: Callable[[float], float],
    sums: EpochSums,
    shape: StepShape,
    at_step: Callable[[int], None] = lambda steps: None,
) -> EpochSums:
    """One training epoch on this rank, from the batch `batches` resumes at, added to `sums`.
    `lr_at` gives each step's lr from how far through the epoch it is (0..1]: a warm-up moves
    per step. `at_step(steps)` is called after each step (a step checkpoint's chance)."""
    model.train()
    images = None
    steps = len(batches)
    # Gradients of all but a step's last piece stay on the rank (DDP's no_sync), then sum in one all-reduce.
    keep_local = getattr(model, "no_sync", nullcontext)
    clock = time.perf_counter()
    for step, (pixels, labels) in enumerate(batches, start=batches.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at((step + 1) / steps)
        # The last step's input buffer is reused: its backward pass is done.
        images = transforms.prepare_batch(pixels.to(device, non_blocking=True), mean, lighting, out=images)
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        pieces = recipe.micro_batches(len(labels), shape.max_piece)
        start = 0
        for i, size in enumerate(pieces):
            piece = slice(start, start + size)
            start += size
            with keep_local() if i < len(pieces) - 1 else nullcontext():
                with autocast:
                    logits = model(images[piece])
                    loss = F.cross_entropy(logits, labels[piece])
                weight = shape.weight(size)
                (loss if weight == 1.0 else loss * weight).backward()
            sums.loss_sum += loss.item() * size
            sums.errors += (logits.argmax(1) != labels[piece]).sum().item()
            sums.seen += size
        optimizer.step()
        sums.seconds += time.perf_counter() - clock
        at_step(step + 1)
        clock = time.perf_counter()
    return sums


RAY_TRAIN_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def quiet_worker_logs() -> None:
    """Keep the console to the epoch lines; Ray's log files keep everything."""
    # Ray Train (2.60) logs every `ray.train.report` at INFO, a whole TrainingReport a line, under
    # a logger named by its source file's path: outside "ray.train", so LoggingConfig's level
    # misses it, and no public API names it. The module's spec gives the path without importing it.
    spec = importlib.util.find_spec(RAY_TRAIN_REPORT_LOGGER_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    # MLflow's system-metrics monitor says at INFO when it starts, stops, and that it skips GPUs,
    # and warns at every sample it cannot send while the store is away (the outage has its lines).
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)


class RunSetup(BaseModel):
    """What every rank is given (`pipeline.driver.fit`): the run's params, and where it records."""

    model_config = ConfigDict(frozen=True)
    params: Params
    mlflow_run_id: str
    tracking_uri: str
    say_epochs: bool  # False in a sweep: its driver prints one line per trial-epoch


@dataclass
class RankState:
    """One rank's part of a run: what it trains, on what, and what it has done so far."""

    params: Params
    setup: RunSetup
    rank: int
    world_size: int
    device: torch.device
    manifest: Manifest
    net: torch.nn.Module  # the bare net: its weights are what checkpoints and models hold
    model: torch.nn.Module  # what trains: the net in DDP, perhaps compiled
    optimizer: torch.optim.Optimizer
    schedule: recipe.Schedule
    history: list[EpochMetrics] = field(default_factory=list)
    start_epoch: int = 0
    progress: checkpoints.EpochProgress | None = None  # into start_epoch, from a step checkpoint
    noticed: bool = False  # a preemption notice came, and its step checkpoint was taken
    attempt: str = ""  # this start of the run, the same on every rank (the batch log's)
    run_steps: int = 0  # steps that count, over the run
    started_at: float = field(default_factory=time.time)  # the run's start: its first attempt's
    lost: checkpoints.LostWork = field(default_factory=checkpoints.LostWork)  # what restarts cost, so far
    resumed_from: tuple[int, float] | None = None  # the checkpoint's run steps and time, if any
    writer: tracking.RunWriter | None = None  # rank 0's

    @property
    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


def set_up(setup: RunSetup) -> RankState:
    """The net (the same initial weights on every rank), its DDP wrapper and the optimizer."""
    params = setup.params
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.set_num_threads(params.train.cpus_per_worker)
    manifest = read_manifest(params.paths.shards)
    torch.manual_seed(params.train.seed)
    net = checkpoints.build_model(params, len(manifest.classes))
    if device.type == "cuda":
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
    return RankState(
        params, setup, context.get_world_rank(), context.get_world_size(), device, manifest, net, model, optimizer,
        recipe.schedule(params),
    )  # fmt: skip


def restore(state: RankState) -> None:
    """Continue from the latest checkpoint Ray Train hands this run, if any."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return
    with checkpoint.as_directory() as directory:
        saved = checkpoints.load(directory)
    state.net.load_state_dict(saved.model)
    state.optimizer.load_state_dict(saved.optimizer)
    state.schedule.load_state_dict(saved.schedule)
    state.history, state.start_epoch, state.progress = saved.history, saved.epoch + 1, saved.progress
    state.run_steps, state.started_at, state.lost = saved.run_steps, saved.started_at, saved.lost
    state.resumed_from = (saved.run_steps, saved.saved_at)


def start_tracking(state: RankState) -> None:
    """Rank 0 opens the run's MLflow writer, tags where the ranks run, and queues the epochs the
    checkpoint has: an epoch checkpointed just before a crash, or while the store was away, may
    not have reached MLflow (the writer skips those MLflow has, and one logged after the last
    checkpoint Ray registered is trained again, and not logged twice)."""
    mine = (ray.get_runtime_context().get_node_id(), f"{time.time():.3f}")
    everyone = [mine] * state.world_size
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)  # every rank takes part
    nodes = [node for node, _ in everyone]
    state.attempt = everyone[0][1]  # rank 0's start: this attempt's name in the batch logs
    if state.rank != 0:
        return
    # In a sweep the driver's epoch lines say when a trial's MLflow records wait (`mlflow_waiting`),
    # once for all trials, rather than every trial's worker saying so.
    outage_lines = say if state.setup.say_epochs else lambda line: None
    store = tracking.Store(state.setup.tracking_uri, state.params.mlflow.retry_seconds, outage_lines)
    tags = {"ray.world_size": str(state.world_size), "ray.nodes": ",".join(sorted(set(nodes)))}
    restart = None
    if state.start_epoch < state.params.train.epochs:  # not a rerun of a run already done
        run_steps, saved_at = state.resumed_from or (0, None)
        restart = tracking.Restart(run_steps, saved_at, partial(count_restart, state))
    state.writer = tracking.RunWriter(store, state.setup.mlflow_run_id, tags, restart=restart)
    for entry in state.history:
        state.writer.log_epoch(entry)
    if state.start_epoch or state.progress:
        step = f", step {state.progress.steps + 1}" if state.progress else ""
        say(f"resuming {ray.train.get_context().get_experiment_name()} at epoch {state.start_epoch + 1}{step}")


def count_restart(state: RankState, redone_steps: int, redone_s: float) -> None:
    """Rank 0's writer has read what this start lost (`tracking.Restart`): the run's totals
    carry it, and the console says it."""
    lost = state.lost
    state.lost = checkpoints.LostWork(
        restarts=lost.restarts + 1, redone_steps=lost.redone_steps + redone_steps, redone_s=lost.redone_s + redone_s
    )
    if state.setup.say_epochs:
        say(f"restart {state.lost.restarts}: {redone_steps} steps trained again, {redone_s:.1f} s of work lost")


def finish_tracking(state: RankState) -> None:
    """Rank 0 waits for its writer; what MLflow still lacks is said, and left to a rerun."""
    if state.writer is None:
        return
    unwritten = state.writer.close()
    if unwritten:
        say(
            f"MLflow lacks epochs {tracking.ranges(unwritten)} of run {state.setup.mlflow_run_id}: its store at "
            f"{tracking.redacted(state.writer.store.uri)} did not answer; the checkpoint keeps them, and rerunning the "
            "same command writes them"
        )


def batch_log(state: RankState) -> loader.BatchLog | None:
    """Where this rank logs its train batches, if $RESNET_BATCH_LOG names a folder
    (`loader.Batches`): to check that a resumed run trains on the batches it would have."""
    folder = os.environ.get(loader.BATCH_LOG_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return loader.BatchLog(Path(folder) / f"rank-{state.rank}.txt", state.attempt)


def epoch_batches(state: RankState, split: str, epoch: int, resume: loader.Resume | None = None) -> loader.EpochBatches:
    params, arch = state.params, state.params.model.arch
    train = split == "train"
    return loader.make_loader(
        params.paths.shards,
        split,
        transforms.train_transform(arch, params.train.flip) if train else transforms.eval_transform(arch),
        batch_size=loader.batch_shares(params.train.batch_size, state.world_size)[state.rank],
        global_batch=params.train.batch_size,
        num_workers=params.train.loader_workers,
        epoch=epoch,
        seed=params.train.seed,
        train=train,
        manifest=state.manifest,
        pin_memory=state.device.type == "cuda",
        resume=resume,
        log=batch_log(state) if train else None,
    )


def resumed_batches(state: RankState, epoch: int) -> tuple[loader.EpochBatches, EpochSums]:
    """The epoch's train batches and the sums to add to: from a step checkpoint's progress into
    it, if the run resumes there, with the random state the ranks had then."""
    torch.manual_seed(loader.epoch_seed(state.params.train.seed, epoch, state.rank))
    progress, state.progress = state.progress, None  # only the first epoch resumes mid-way
    if progress is None:
        return epoch_batches(state, "train", epoch), EpochSums()
    if not progress.replayed and progress.deal == (state.world_size, state.params.train.loader_workers):
        batches = epoch_batches(state, "train", epoch, loader.Resume(progress.steps, progress.loader_rng[state.rank]))
        torch.set_rng_state(progress.rank_rng[state.rank])
        if state.device.type == "cuda":
            torch.cuda.set_rng_state(progress.rank_cuda_rng[state.rank], state.device)
    else:  # another world size: the rest of the epoch as it was dealt, each sample once
        batches = epoch_batches(state, "train", epoch, loader.Resume(progress.steps, replay_deal=progress.deal))
    # The sums were summed over the ranks at the checkpoint: one rank carries them on.
    sums = (
        EpochSums(progress.loss_sum, progress.errors, progress.seen, progress.steps_s)
        if state.rank == 0
        else EpochSums()
    )
    return batches, sums


def after_step(state: RankState, epoch: int, batches: loader.EpochBatches, sums: EpochSums, steps: int) -> None:
    """A step checkpoint every `train.checkpoint_every_steps` steps, and at once on a preemption
    notice, which every rank asks Ray Train for every `train.preemption_check_steps` steps (not at
    the epoch's end: it has its own checkpoint)."""
    train = state.params.train
    state.run_steps += 1
    if state.writer is not None:
        state.writer.mark(state.run_steps)
    if steps == len(batches):
        return
    due = bool(train.checkpoint_every_steps) and steps % train.checkpoint_every_steps == 0
    if train.preemption_check_steps and steps % train.preemption_check_steps == 0 and not state.noticed:
        notice = ray.train.get_preemption_info()  # a barrier: every rank asks at the same steps
        if notice is not None:
            state.noticed = True
            step_checkpoint(state, epoch, batches, sums, steps)
            # Ray registers a reported checkpoint when its controller next looks; a node lost
            # before then loses it. The notice leaves time to wait.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            if state.rank == 0:
                say(
                    f"preemption notice for {notice_text(notice)}: step checkpoint at epoch {epoch + 1}, step {steps}, saved"
                )
            return
    if due:
        step_checkpoint(state, epoch, batches, sums, steps)


def notice_text(notice: Any) -> str:
    """Ray Train's PreemptionInfo in words: the ranks whose nodes go, and when."""
    ranks = sorted(rank for node_ranks in notice.preempted_node_to_ranks.values() for rank in node_ranks)
    deadline = f", in {max(notice.deadline_ms / 1000 - time.time(), 0):.0f} s" if notice.deadline_ms else ""
    return f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}{deadline}"


def step_checkpoint(state: RankState, epoch: int, batches: loader.EpochBatches, sums: EpochSums, steps: int) -> None:
    """The epoch's sums over the ranks and every rank's random state and loader position, checkpointed."""
    loss_sum, errors, seen = all_reduce_sum([sums.loss_sum, sums.errors, sums.seen], state.device)
    cuda_rng = torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None
    position = batches.position()
    mine = (torch.get_rng_state(), cuda_rng, position.worker_rng)
    everyone = [mine] * state.world_size
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    progress = checkpoints.EpochProgress(
        steps=steps, loss_sum=loss_sum, errors=errors, seen=seen,
        rank_rng=[rng for rng, _, _ in everyone], rank_cuda_rng=[cuda for _, cuda, _ in everyone],
        loader_rng=[workers for _, _, workers in everyone],
        deal=position.replay_deal or (state.world_size, state.params.train.loader_workers),
        replayed=position.replay_deal is not None, steps_s=sums.seconds,
    )  # fmt: skip
    # Ray keeps checkpoints by CHECKPOINT_SCORE, lowest first: a step checkpoint has no val score,
    # and is kept while it is the latest; Tune does not see its report (tune.EpochReports).
    save_and_report(state, epoch - 1, {"epoch": epoch, STEPS_INTO_EPOCH: steps, CHECKPOINT_SCORE: math.inf}, progress)


def train_epoch(state: RankState, epoch: int) -> EpochMetrics:
    """One epoch of training (the rest of it, resumed from a step checkpoint) and the val scores,
    summed over the ranks."""
    batches, sums = resumed_batches(state, epoch)
    mean = state.manifest.mean
    started, seen_before = time.perf_counter(), sums.seen
    sums = run_epoch(
        state.model, batches, state.optimizer, state.device, mean,
        recipe.PROFILES[state.params.model.arch].lighting, state.autocast, partial(state.schedule.lr, epoch),
        sums, StepShape(state.world_size, state.params.train.batch_size, state.params.train.max_worker_batch),
        partial(after_step, state, epoch, batches, sums),
    )  # fmt: skip
    train_seconds = time.perf_counter() - started
    loss_sum, errors, seen, seen_here = all_reduce_sum(
        [sums.loss_sum, sums.errors, sums.seen, sums.seen - seen_before], state.device
    )
    net = getattr(state.model, "module", state.model)
    val = score(net, epoch_batches(state, "val", epoch), state.device, mean, state.autocast)
    top1, top5, val_loss_sum, val_seen = all_reduce_sum(list(val), state.device)
    return EpochMetrics(
        epoch=epoch,
        train_loss=loss_sum / seen,
        train_top1_error=errors / seen,
        val_top1_error=top1 / val_seen,
        val_top5_error=top5 / val_seen,
        val_loss=val_loss_sum / val_seen,
        lr=state.schedule.lr(epoch),
        images_per_s=seen_here / train_seconds,
        epoch_time_s=time.perf_counter() - started,
        world_size=state.world_size,
        steps_s=sums.seconds,
        goodput=(sum(row.steps_s for row in state.history) + sums.seconds) / (time.time() - state.started_at),
        redone_steps=state.lost.redone_steps,
    )


def save_and_report(
    state: RankState, epoch_done: int, report: dict[str, Any], progress: checkpoints.EpochProgress | None = None
) -> None:
    """Rank 0 writes the checkpoint (after `epoch_done`, and `progress` into the next); every
    rank reports (Ray Train waits for all of them). To remote storage (s3://) with
    `train.async_upload`, the upload goes on while the next steps train, and Ray deletes the
    local copy once it is up."""
    if state.rank != 0:
        ray.train.report(report, checkpoint=None)
        return
    upload_async = state.params.train.async_upload and "://" in state.params.paths.ray_storage
    directory = tempfile.mkdtemp(prefix="checkpoint-")
    try:
        checkpoints.save(
            directory,
            checkpoints.CheckpointState(
                model_args=checkpoints.ModelArgs.of(state.params, len(state.manifest.classes)),
                model=state.net.state_dict(),
                optimizer=state.optimizer.state_dict(),
                schedule=state.schedule.state_dict(),
                epoch=epoch_done,
                history=state.history,
                mean=state.manifest.mean,
                progress=progress,
                run_steps=state.run_steps,
                started_at=state.started_at,
                saved_at=time.time(),
                lost=state.lost,
            ),
        )
        mode = CheckpointUploadMode.ASYNC if upload_async else CheckpointUploadMode.SYNC
        ray.train.report(report, checkpoint=Checkpoint.from_directory(directory), checkpoint_upload_mode=mode)
    finally:
        if not upload_async:
            shutil.rmtree(directory, ignore_errors=True)


def checkpoint_and_report(state: RankState, metrics: EpochMetrics) -> None:
    score = val_rank_score(metrics.val_top1_error, metrics.val_loss)  # what Ray keeps checkpoints by
    waiting = state.writer.waiting() if state.writer else 0  # rank 0's counts: its report is the run's
    save_and_report(state, metrics.epoch, {**metrics.model_dump(), CHECKPOINT_SCORE: score, "mlflow_waiting": waiting})


def epoch_line(metrics: EpochMetrics, epochs: int) -> str:
    return (
        f"epoch {metrics.epoch + 1}/{epochs}  lr {metrics.lr:.4g}  train loss {metrics.train_loss:.4f}"
        f"  train err {metrics.train_top1_error:.2%}  val err {metrics.val_top1_error:.2%}"
        f" (top-5 {metrics.val_top5_error:.2%})  {metrics.images_per_s:.0f} img/s  {metrics.epoch_time_s:.1f} s"
        f"  {metrics.world_size} worker{'s' if metrics.world_size != 1 else ''}"
    )


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function of the TorchTrainer (pipeline.driver.fit): its config is
    a `RunSetup`, as Ray passes it, a dict."""
    quiet_worker_logs()
    state = set_up(RunSetup.model_validate(config))
    restore(state)
    start_tracking(state)
    epochs = state.params.train.epochs
    for epoch in range(state.start_epoch, epochs):
        metrics = train_epoch(state, epoch)
        state.schedule.step(metrics.train_top1_error, metrics.val_top1_error)
        state.history.append(metrics)
        checkpoint_and_report(state, metrics)
        if state.writer:
            state.writer.log_epoch(metrics)
        if state.rank == 0 and state.setup.say_epochs:
            say(epoch_line(metrics, epochs))
    if state.history and state.start_epoch >= epochs:
        # Resumed after its last epoch was checkpointed but before whoever waits on this run took
        # the result (a Ctrl-C in between): say the final result again, or a sweep would see a
        # trial that never reported and count it unfinished.
        ray.train.report(state.history[-1].model_dump())
    finish_tracking(state)
