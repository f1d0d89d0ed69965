"""Scoring: top-1/top-5 errors, and the 10-crop average of the paper's testing."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import scoring, transforms


class FixedLogits(nn.Module):
    """Logits that depend only on the first pixel's red value: a crop-dependent toy model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0, 0, 0]
        return torch.stack([red, 1 - red, torch.zeros_like(red), torch.full_like(red, -1.0)], dim=1)


def test_top1_top5_errors_and_ten_crop_averaging():
    mean = (0.0, 0.0, 0.0)
    # Two images of 10 crops each: image 0 votes class 0 in 7 crops, class 1 in 3; image 1 the reverse.
    pixels = torch.zeros(2, 10, 4, 4, 3, dtype=torch.uint8)
    pixels[0, :7, 0, 0, 0] = 255
    pixels[1, 7:, 0, 0, 0] = 255
    labels = torch.tensor([0, 0])
    scores = scoring.score(FixedLogits(), [(pixels, labels)], torch.device("cpu"), mean, nullcontext())
    assert (scores.top1, scores.top5, scores.seen) == (1, 0, 2)  # the mean softmax picks class 0, then class 1
    # The loss is the cross-entropy of that mean softmax: -log of the label's mean probability.
    probs = FixedLogits()(transforms.prepare_batch(pixels, mean, lighting=False)).softmax(1).view(2, 10, -1).mean(1)
    assert scores.loss_sum == pytest.approx(-probs[:, 0].log().sum().item())

    single = pixels[:, 0]  # (N, H, W, 3): one crop per image
    scores = scoring.score(FixedLogits(), [(single, torch.tensor([0, 1]))], torch.device("cpu"), mean, nullcontext())
    assert (scores.top1, scores.seen) == (0, 2)
    logits = FixedLogits()(transforms.prepare_batch(single, mean, lighting=False))
    assert scores.loss_sum == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1]), reduction="sum").item())


def test_the_val_loss_sums_over_batches_and_tells_equal_error_counts_apart():
    """Two nets right on every image, one more sure than the other: equal errors, lower loss."""
    mean = (0.0, 0.0, 0.0)
    pixels = torch.zeros(4, 4, 4, 3, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = 255
    batches = [(pixels[:2], torch.zeros(2, dtype=torch.long)), (pixels[2:], torch.zeros(2, dtype=torch.long))]

    class Scaled(FixedLogits):
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return super().forward(x) * self.scale

    sure, unsure = (scoring.score(Scaled(k), batches, torch.device("cpu"), mean, nullcontext()) for k in (5.0, 1.0))
    assert sure.top1 == unsure.top1 == 0 and sure.seen == unsure.seen == 4
    assert 0 < sure.loss_sum < unsure.loss_sum


def test_a_label_outside_the_five_highest_logits_is_a_top5_miss():
    """Seven classes ranked 6, 5, ..., 0 whatever the image: label 0 and 1 are not among the five
    highest (a miss), label 2 is the fifth (a hit), label 6 is the first."""

    class Ranked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.arange(7, dtype=torch.float32).expand(x.shape[0], 7) + 0 * x[:, :1, 0, 0]

    pixels = torch.zeros(4, 4, 4, 3, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 6])
    scores = scoring.score(Ranked(), [(pixels, labels)], torch.device("cpu"), (0.0, 0.0, 0.0), nullcontext())
    assert (scores.top1, scores.top5, scores.seen) == (3, 2, 4)
