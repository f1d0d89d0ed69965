"""A training checkpoint: what it holds, and the net rebuilt from it.

A checkpoint is a folder (Ray Train's) holding one `checkpoint.pt`: the net's constructor
arguments and weights, and, for resuming, the optimizer, the lr schedule, the epoch and the
history of per-epoch metrics. Only tensors and plain data: `torch.load(weights_only=True)`
reads it, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import resnet
from pipeline.files import open_url
from pipeline.params import Params

CHECKPOINT_FILE = "checkpoint.pt"


def model_args(params: Params, num_classes: int) -> dict[str, Any]:
    """What `resnet.build` needs to build the net of params, here and from a checkpoint."""
    return {
        "name": resnet.model_name(params.model.arch, params.model.depth),
        "shortcut": params.model.shortcut,
        "num_classes": num_classes,
        "bottleneck": params.model.bottleneck,
        "zero_init_residual": params.model.zero_init_residual,
    }


def build_model(params: Params, num_classes: int) -> torch.nn.Module:
    return resnet.build(**model_args(params, num_classes))


def save(folder: str | Path, state: dict[str, Any]) -> None:
    """`state` holds `model_args` and `model` (the weights), and whatever resuming needs."""
    torch.save(state, Path(folder) / CHECKPOINT_FILE)


def load(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's state from a local folder or a URL (s3://...); tensors and plain data only."""
    with open_url(f"{str(folder).rstrip('/')}/{CHECKPOINT_FILE}", "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def model_from_checkpoint(folder: str | Path) -> torch.nn.Module:
    state = load(folder)
    model = resnet.build(**state["model_args"])
    model.load_state_dict(state["model"])
    return model.eval()


def checkpoint_uri(checkpoint: Any) -> str:
    """Where a Ray Train checkpoint lives, as a path or URL others can open (Ray's own `path`
    drops the scheme of remote storage)."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
