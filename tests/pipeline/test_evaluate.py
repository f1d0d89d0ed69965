"""Scoring: top-1/top-5 errors, and the 10-crop average of the paper's testing."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from pipeline import trainer


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
    top1, top5, seen = trainer.evaluate(FixedLogits(), [(pixels, labels)], torch.device("cpu"), mean, nullcontext())
    assert (top1, top5, seen) == (1, 0, 2)  # the mean softmax picks class 0, then class 1

    single = pixels[:, 0]  # (N, H, W, 3): one crop per image
    top1, _, seen = trainer.evaluate(FixedLogits(), [(single, torch.tensor([0, 1]))], torch.device("cpu"), mean, nullcontext())
    assert (top1, seen) == (0, 2)
