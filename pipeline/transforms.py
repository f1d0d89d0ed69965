"""The paper's augmentations and test-time crops.

Work is split where it is cheapest. Per image, in the DataLoader workers, on PIL images: the
geometric part (resize, crop, flip), ending in a uint8 HWC tensor. Per batch, on the training
device (`prepare_batch`): to float, AlexNet's PCA colour noise, mean subtraction, and the
NCHW view in channels_last memory format. Moving uint8 rather than float32 between processes
is 4x less data, and a batch of colour arithmetic on the device is nearly free.

ImageNet-size (Sec. 3.4): shorter side resized to a random length in [256, 480], a random
224x224 crop, horizontal flip, PCA colour noise, mean subtraction. Test: the shorter side at
256 and the centre 224 crop, or the paper's 10-crop (4 corners + centre, and their flips).
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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

TRAIN_SHORT_SIDE = (256, 480)
CROP = 224
TEST_SHORT_SIDE = 256

# AlexNet's PCA lighting noise: the eigen-decomposition of ImageNet's RGB covariance (pixels in
# [0, 1]), as published with fb.resnet.torch.
PCA_STD = 0.1
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

Transform = Callable[[Image.Image], Tensor]


def randint(low: int, high: int) -> int:
    """Uniform in [low, high], from torch's RNG (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()).item())


def to_uint8_hwc(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())


def resize_window(image: Image.Image, left: float, top: float, window: float, size: int) -> Image.Image:
    """Resize the window x window square at (left, top) of `image` to size x size; the window is
    kept inside the image (scaled sizes are rounded, so it may overhang by a fraction)."""
    left = min(max(left, 0.0), image.width - window)
    top = min(max(top, 0.0), image.height - window)
    box = (left, top, min(left + window, image.width), min(top + window, image.height))
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


class RandomScaleCrop:
    """Resize the shorter side to a random length in [min_side, max_side], then take a random
    crop x crop patch: done as one resize of the patch's region of the original image (PIL's
    `box`), the same pixels without resampling the rest of the image."""

    def __init__(self, min_side: int, max_side: int, crop: int) -> None:
        self.min_side, self.max_side, self.crop = min_side, max_side, crop

    def __call__(self, image: Image.Image) -> Image.Image:
        scale = randint(self.min_side, self.max_side) / min(image.size)
        left = randint(0, max(round(image.width * scale) - self.crop, 0))
        top = randint(0, max(round(image.height * scale) - self.crop, 0))
        return resize_window(image, left / scale, top / scale, self.crop / scale, self.crop)


class CentreCrop:
    """Resize the shorter side to `side` and take the centre crop x crop, in one resize."""

    def __init__(self, side: int, crop: int) -> None:
        self.side, self.crop = side, crop

    def __call__(self, image: Image.Image) -> Image.Image:
        scale = self.side / min(image.size)
        left = (round(image.width * scale) - self.crop) // 2
        top = (round(image.height * scale) - self.crop) // 2
        return resize_window(image, left / scale, top / scale, self.crop / scale, self.crop)


def pad_and_crop(pixels: Tensor) -> Tensor:
    """Zero-pad an HWC image by side/8 (4 px at 32x32) and crop it back to its size at random."""
    height, width = pixels.shape[:2]
    pad = max(1, min(height, width) // 8)
    padded = F.pad(pixels, (0, 0, pad, pad, pad, pad))
    top, left = randint(0, 2 * pad), randint(0, 2 * pad)
    return padded[top : top + height, left : left + width]


def maybe_flip(pixels: Tensor) -> Tensor:
    return pixels.flip(1) if randint(0, 1) else pixels


class TrainTransform:
    def __init__(self, arch: str, flip: bool) -> None:
        self.arch, self.flip = arch, flip
        self.scale_crop = RandomScaleCrop(*TRAIN_SHORT_SIDE, CROP)

    def __call__(self, image: Image.Image) -> Tensor:
        if self.arch == "imagenet":
            pixels = to_uint8_hwc(self.scale_crop(image))
        else:
            pixels = pad_and_crop(to_uint8_hwc(image))
        return maybe_flip(pixels) if self.flip else pixels


class EvalTransform:
    def __init__(self, arch: str, crop: str) -> None:
        if crop not in ("single", "ten"):
            raise ValueError(f"unknown crop {crop!r}; valid: single, ten")
        if crop == "ten" and arch != "imagenet":
            raise ValueError("crop 'ten' is for ImageNet-size inputs; CIFAR-size nets test on the single image")
        self.arch, self.crop = arch, crop

    def __call__(self, image: Image.Image) -> Tensor:
        if self.arch != "imagenet":
            return to_uint8_hwc(image)
        if self.crop == "single":
            return to_uint8_hwc(CentreCrop(TEST_SHORT_SIDE, CROP)(image))
        scale = TEST_SHORT_SIDE / min(image.size)
        resized = to_uint8_hwc(
            image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        )
        height, width = resized.shape[:2]
        corners = [(0, 0), (0, width - CROP), (height - CROP, 0), (height - CROP, width - CROP)]
        centre = ((height - CROP) // 2, (width - CROP) // 2)
        five = [resized[t : t + CROP, left : left + CROP] for t, left in [*corners, centre]]
        return torch.stack(five + [crop.flip(1) for crop in five])  # (10, 224, 224, 3)


def train_transform(arch: str, flip: bool) -> Transform:
    """PIL image -> uint8 (H, W, 3): the per-image, geometric part of the training augmentation."""
    return TrainTransform(arch, flip)


def eval_transform(arch: str, crop: str = "single") -> Transform:
    """PIL image -> uint8 (H, W, 3), or (10, H, W, 3) for the paper's 10-crop."""
    return EvalTransform(arch, crop)


def prepare_batch(pixels: Tensor, mean: Sequence[float], lighting: bool) -> Tensor:
    """uint8 (..., H, W, 3) on the training device -> float (N, 3, H, W) in channels_last:
    [0, 1] scaling, PCA colour noise per image (training, ImageNet-size), mean subtraction."""
    # An NCHW view of NHWC memory: exactly the channels_last layout, without a copy.
    images = pixels.reshape(-1, *pixels.shape[-3:]).permute(0, 3, 1, 2).float()
    shift = -torch.tensor(list(mean), device=images.device).expand(images.shape[0], 3)
    if lighting:
        eigenvalues = torch.tensor(PCA_EIGENVALUES, device=images.device)
        eigenvectors = torch.tensor(PCA_EIGENVECTORS, device=images.device)
        alpha = torch.randn(images.shape[0], 3, device=images.device) * PCA_STD
        shift = shift + (alpha * eigenvalues) @ eigenvectors.T
    return images.mul_(1 / 255).add_(shift[:, :, None, None])


def draft_size(arch: str, train: bool) -> int | None:
    """The shorter side a JPEG may be decoded down to (PIL's draft mode) without losing
    resolution the transform keeps; None: decode at full size."""
    if arch != "imagenet":
        return None
    return TRAIN_SHORT_SIDE[1] if train else TEST_SHORT_SIDE
