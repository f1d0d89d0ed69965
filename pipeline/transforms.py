"""The paper's augmentations and test-time crops, as torchvision v2 pipelines over PIL images.

ImageNet-size (Sec. 3.4): shorter side resized to a random length in [256, 480], a random
224x224 crop, horizontal flip, AlexNet's PCA colour augmentation, mean subtraction. Test: the
shorter side at 256 and the centre 224 crop, or the paper's 10-crop (4 corners + centre, and
their flips).
CIFAR-size (Sec. 4.2): 4 pixels of zero padding on each side of a 32x32 image and a random
32x32 crop (scaled to the image: side/8), horizontal flip, mean subtraction; test on the
single original image.

Mean subtraction is per channel, with the training shards' mean (manifest.json `mean`), rather
than the paper's per-pixel mean image: equivalent up to a bias the first BN absorbs, and the
same code for every image size. Pixels are not divided by a standard deviation (the paper does
not). Horizontal flips are off for the digits, where they would change a digit's meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

TRAIN_SHORT_SIDE = (256, 480)
CROP = 224
TEST_SHORT_SIDE = 256

# AlexNet's PCA lighting noise: the eigen-decomposition of ImageNet's RGB covariance (pixels in
# [0, 1]), as published with fb.resnet.torch, the reference code of the ResNet authors' peers.
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

Transform = Callable[[Image.Image], Tensor]


class PCALighting(nn.Module):
    """Add eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, std^2) per image."""

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigenvalues", torch.tensor(PCA_EIGENVALUES))
        self.register_buffer("eigenvectors", torch.tensor(PCA_EIGENVECTORS))

    def forward(self, image: Tensor) -> Tensor:
        alpha = torch.randn(3) * self.std
        shift = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + shift.view(3, 1, 1)


class PadAndCrop(nn.Module):
    """Zero-pad each side by side/8 (4 px at 32x32) and crop back to the original size."""

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        pad = max(1, min(height, width) // 8)
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[..., top : top + height, left : left + width]


class SubtractMean(nn.Module):
    def __init__(self, mean: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1))

    def forward(self, image: Tensor) -> Tensor:
        return image - self.mean


class TenCrops(nn.Module):
    """The 4 corner and centre crops and their mirror images, stacked: (10, 3, size, size)."""

    def __init__(self, size: int, per_crop: Transform) -> None:
        super().__init__()
        self.ten_crop = v2.TenCrop(size)
        self.per_crop = per_crop

    def forward(self, image: Image.Image) -> Tensor:
        return torch.stack([self.per_crop(crop) for crop in self.ten_crop(image)])


def to_float() -> list[nn.Module]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def train_transform(arch: str, mean: Sequence[float], flip: bool) -> Transform:
    flips = [v2.RandomHorizontalFlip()] if flip else []
    if arch == "imagenet":
        steps = [
            v2.RandomShortestSize(list(range(TRAIN_SHORT_SIDE[0], TRAIN_SHORT_SIDE[1] + 1))),
            v2.RandomCrop(CROP),
            *flips,
            *to_float(),
            PCALighting(),
        ]
    else:
        steps = [*to_float(), PadAndCrop(), *flips]
    return v2.Compose([*steps, SubtractMean(mean)])


def eval_transform(arch: str, mean: Sequence[float], crop: str = "single") -> Transform:
    """`single`: one (3, H, W) tensor; `ten`: (10, 3, 224, 224), ImageNet-size only."""
    if arch != "imagenet":
        if crop != "single":
            raise ValueError(f"crop {crop!r} is for ImageNet-size inputs; CIFAR-size nets test on the single image")
        return v2.Compose([*to_float(), SubtractMean(mean)])
    resize = v2.Resize(TEST_SHORT_SIDE)
    if crop == "single":
        return v2.Compose([resize, v2.CenterCrop(CROP), *to_float(), SubtractMean(mean)])
    if crop == "ten":
        return v2.Compose([resize, TenCrops(CROP, v2.Compose([*to_float(), SubtractMean(mean)]))])
    raise ValueError(f"unknown crop {crop!r}; valid: single, ten")


def draft_size(arch: str, train: bool) -> int | None:
    """The shorter side a JPEG may be decoded down to (PIL's draft mode) without losing
    resolution the transform would keep; None: decode at full size."""
    if arch != "imagenet":
        return None
    return TRAIN_SHORT_SIDE[1] if train else TEST_SHORT_SIDE
