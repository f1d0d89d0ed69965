"""Scoring a net on a split: top-1 and top-5 errors and the cross-entropy, as sums that add up
over batches and ranks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from pipeline.transforms import prepare_batch


class Scores(NamedTuple):
    """Sums over some images, so that ranks and batches add up: divide by `seen`."""

    top1: int  # top-1 errors
    top5: int  # top-5 errors
    loss_sum: float  # cross-entropy (nats): the val loss breaks ties between equal error counts
    seen: int  # images


@torch.no_grad()
def score(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    mean: Sequence[float],
    autocast: AbstractContextManager,
) -> Scores:
    """Errors and cross-entropy of `model` on `batches` (uint8 pixels, labels).
    A (N, 10, ...) batch of 10-crops is scored on the mean of its crops' softmax, and its loss is
    that mean's: -log of the label's mean probability (one crop: the plain cross-entropy)."""
    model.eval()
    top1, top5, loss_sum, seen, images = 0, 0, 0.0, 0, None
    for pixels, labels in batches:
        crops = pixels.shape[1] if pixels.dim() == 5 else 1
        images = prepare_batch(pixels.to(device, non_blocking=True), mean, lighting=False, out=images)
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
