"""A training checkpoint: what it holds, and the net rebuilt from it.

A checkpoint is a folder (Ray Train's) holding one `checkpoint.pt`: the net's constructor
arguments and weights, and, for resuming, the optimizer, the lr schedule, the epoch and the
history of per-epoch metrics. A step checkpoint, taken mid-epoch (`train.checkpoint_every_steps`),
holds how far into the next epoch it is too (`EpochProgress`), so that a run resumed from it trains
on the batches an uninterrupted run would have. Only tensors and plain data: `torch.load(weights_only=True)`
reads it, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict

import resnet
from pipeline.artifacts import Record
from pipeline.errors import UsageError
from pipeline.files import open_url
from pipeline.params import Params
from pipeline.records import EpochMetrics

CHECKPOINT_FILE = "checkpoint.pt"


class ModelArgs(Record):
    """What `resnet.build` needs to build a net, here and from a checkpoint."""

    name: str
    shortcut: str
    num_classes: int
    bottleneck: str
    zero_init_residual: bool

    @classmethod
    def of(cls, params: Params, num_classes: int) -> ModelArgs:
        return cls(
            name=resnet.model_name(params.model.arch, params.model.depth),
            shortcut=params.model.shortcut,
            num_classes=num_classes,
            bottleneck=params.model.bottleneck,
            zero_init_residual=params.model.zero_init_residual,
        )

    def build(self) -> torch.nn.Module:
        return resnet.build(**self.model_dump())


class EpochProgress(Record):
    """How far a step checkpoint is into the epoch after `CheckpointState.epoch`: the batches
    every rank has taken, the epoch's sums so far over all ranks, and the random state each
    rank's training process and loader workers had (`loader.Resume`). A run resumed with the
    ranks and loader workers the epoch was dealt for goes on exactly; with others, it replays
    the rest of the epoch (`loader.Replay`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, strict=False)
    steps: int
    loss_sum: float
    errors: float
    seen: float
    rank_rng: list[torch.Tensor]  # torch.get_rng_state() of each rank's training process
    rank_cuda_rng: list[torch.Tensor | None]  # and of its GPU
    loader_rng: list[list[bytes | None]]  # each rank's loader workers' (loader.Resume.worker_rng)
    deal: tuple[int, int]  # (ranks, loader workers) the epoch's batches were dealt for at its start
    replayed: bool  # taken in an epoch replayed for another world size (loader.Replay): no loader_rng
    steps_s: float  # seconds the epoch's steps so far took


class LostWork(Record):
    """What a run's restarts cost it so far: steps trained after the checkpoint each resumed
    from, which it trained again, and the seconds they took (pipeline.tracking.RunWriter)."""

    restarts: int = 0
    redone_steps: int = 0
    redone_s: float = 0.0


class CheckpointState(Record):
    """What a checkpoint holds: the net (its arguments and weights), and what resuming needs (the
    optimizer, the lr schedule, the last epoch done (-1: none yet), the history of every epoch
    so far, the train split's channel means the net was trained with; for a step checkpoint, how
    far into the next epoch it is; and what the run's restarts have cost so far)."""

    SCHEMA: ClassVar[int] = 2  # 1: no step checkpoints, no world size per epoch
    model_config = ConfigDict(arbitrary_types_allowed=True, strict=False)
    schema_version: int = SCHEMA
    model_args: ModelArgs
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch's own state dicts
    schedule: dict[str, Any]
    epoch: int
    history: list[EpochMetrics]
    mean: list[float]
    progress: EpochProgress | None = None
    # What a restart's accounting reads (the worker sets them all: pipeline.worker.save_and_report).
    run_steps: int = 0  # the run's steps that count, to this checkpoint
    started_at: float = 0.0  # when the run started training (time.time()): its goodput's wall time
    saved_at: float = 0.0  # time.time() when this checkpoint was taken
    lost: LostWork = LostWork()


def build_model(params: Params, num_classes: int) -> torch.nn.Module:
    return ModelArgs.of(params, num_classes).build()


def save(folder: str | Path, state: CheckpointState) -> None:
    """Plain data and tensors only (torch.load with weights_only reads nothing else)."""
    torch.save(state.model_dump(), Path(folder) / CHECKPOINT_FILE)


def load(folder: str | Path) -> CheckpointState:
    """A checkpoint's state from a local folder or a URL (s3://...); tensors and plain data only."""
    url = f"{str(folder).rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with open_url(url, "rb") as f:
            saved = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{url}: holds more than tensors and plain data; refused unread") from None
    if not isinstance(saved, dict) or saved.get("schema_version") != CheckpointState.SCHEMA:
        raise UsageError(f"{url}: not a checkpoint of this version of the pipeline; train it again")
    return CheckpointState.model_validate(saved)


def model_from_checkpoint(folder: str | Path) -> torch.nn.Module:
    state = load(folder)
    model = state.model_args.build()
    model.load_state_dict(state.model)
    return model.eval()


def checkpoint_uri(checkpoint: Any) -> str:
    """Where a Ray Train checkpoint lives, as a path or URL others can open (Ray's own `path`
    drops the scheme of remote storage)."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
