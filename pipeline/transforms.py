"""The paper's augmentations and test-time crops.

Work is split where it is cheapest. Per image, in the DataLoader workers, from the JPEG's bytes:
the geometric part (which pixels, at what size, flipped or not), ending in a uint8 HWC tensor.
Per batch, on the training device (`prepare_batch`): to float, AlexNet's PCA colour noise, mean
subtraction, and the NCHW view in channels_last memory format. Moving uint8 rather than float32
between processes is 4x less data, and a batch of colour arithmetic on the device is nearly free.

The scale augmentation and the crop are one step: only the crop's region of the JPEG is decoded
(`jpegcrop`, built from pipeline/jpegcrop.c: libjpeg-turbo's cropped decode, at 1/2, 1/4 or 1/8
scale where the region is that much larger than the crop), then resized once to the crop's size
with torch's antialiased bilinear kernel. The pixels are PIL's for cropping the decoded image and
resizing the crop, to 1 grey level (tests/pipeline/test_transforms.py).

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

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import jpegcrop
from pipeline.images import MAX_PIXELS

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

Transform = Callable[[bytes], Tensor]
Box = tuple[float, float, float, float]  # left, top, right, bottom, in the image's pixels


def randint(low: int, high: int) -> int:
    """Uniform in [low, high], from torch's RNG (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()).item())


def decode(jpeg: bytes) -> Tensor:
    """The whole JPEG as uint8 (H, W, 3) RGB."""
    width, height = jpegcrop.size(jpeg)
    return torch.frombuffer(jpegcrop.decode(jpeg, 0, 0, width, height, 1, MAX_PIXELS), dtype=torch.uint8).view(height, width, 3)


def decode_resized(jpeg: bytes, image_size: tuple[int, int], box: Box, size: tuple[int, int]) -> Tensor:
    """The pixels under `box` (rounded to whole pixels) of the JPEG of `image_size`, resized to
    size = (width, height), as uint8 (H, W, 3). Only the box's region is decoded, at 1/2, 1/4 or
    1/8 scale when the box is at least that many times larger than `size` (libjpeg's DCT scaling,
    as PIL's draft mode). The caller has read `image_size` to place the box."""
    width, height = image_size
    if size[0] * size[1] > MAX_PIXELS:
        # The 10-crop resizes the whole image to a short side of 256: a 1 x 34,000 JPEG within
        # the decoder's limit would become gigabytes of resized pixels.
        raise ValueError(f"resizing {width} x {height} to {size[0]} x {size[1]} is over the limit of {MAX_PIXELS} pixels")
    left, top, right, bottom = box
    scale_denom = 1
    while scale_denom < 8 and min((right - left) / size[0], (bottom - top) / size[1]) >= 2 * scale_denom:
        scale_denom *= 2
    scaled_width, scaled_height = math.ceil(width / scale_denom), math.ceil(height / scale_denom)
    x0 = min(round(left / scale_denom), scaled_width - 1)
    y0 = min(round(top / scale_denom), scaled_height - 1)
    x1 = max(min(round(right / scale_denom), scaled_width), x0 + 1)
    y1 = max(min(round(bottom / scale_denom), scaled_height), y0 + 1)
    region = jpegcrop.decode(jpeg, x0, y0, x1 - x0, y1 - y0, scale_denom, MAX_PIXELS)
    pixels = torch.frombuffer(region, dtype=torch.uint8).view(y1 - y0, x1 - x0, 3)
    if (x1 - x0, y1 - y0) == tuple(size):
        return pixels
    # torch's antialiased bilinear resize has a vectorised kernel for uint8 channels-last RGB:
    # PIL's result (to 1 grey level) at twice its speed. HWC memory is that layout already, and
    # the batch dimension goes first so the strides say so: pixels.permute(2, 0, 1)[None] would
    # give the batch a stride of 3, which torch reads as NCHW, so the result would come out in
    # planes and every later copy of it would gather each pixel's bytes from three planes.
    resized = F.interpolate(pixels[None].permute(0, 3, 1, 2), size=(size[1], size[0]), mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0)


def square_box(width: int, height: int, left: float, top: float, side: float) -> Box:
    """The side x side square at (left, top), moved inside the image (scaled sizes are rounded,
    so it may overhang by a fraction)."""
    left = min(max(left, 0.0), width - side)
    top = min(max(top, 0.0), height - side)
    return (left, top, min(left + side, width), min(top + side, height))


class RandomScaleCrop:
    """Resize the shorter side to a random length in [min_side, max_side], then take a random
    crop x crop patch: done as one resize of the patch's region of the original image."""

    def __init__(self, min_side: int, max_side: int, crop: int) -> None:
        self.min_side, self.max_side, self.crop = min_side, max_side, crop

    def __call__(self, jpeg: bytes) -> Tensor:
        width, height = jpegcrop.size(jpeg)
        scale = randint(self.min_side, self.max_side) / min(width, height)
        left = randint(0, max(round(width * scale) - self.crop, 0))
        top = randint(0, max(round(height * scale) - self.crop, 0))
        box = square_box(width, height, left / scale, top / scale, self.crop / scale)
        return decode_resized(jpeg, (width, height), box, (self.crop, self.crop))


class CentreCrop:
    """Resize the shorter side to `side` and take the centre crop x crop, in one resize."""

    def __init__(self, side: int, crop: int) -> None:
        self.side, self.crop = side, crop

    def __call__(self, jpeg: bytes) -> Tensor:
        width, height = jpegcrop.size(jpeg)
        scale = self.side / min(width, height)
        left = (round(width * scale) - self.crop) // 2
        top = (round(height * scale) - self.crop) // 2
        box = square_box(width, height, left / scale, top / scale, self.crop / scale)
        return decode_resized(jpeg, (width, height), box, (self.crop, self.crop))


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

    def __call__(self, jpeg: bytes) -> Tensor:
        pixels = self.scale_crop(jpeg) if self.arch == "imagenet" else pad_and_crop(decode(jpeg))
        return maybe_flip(pixels) if self.flip else pixels


class EvalTransform:
    def __init__(self, arch: str, crop: str) -> None:
        if crop not in ("single", "ten"):
            raise ValueError(f"unknown crop {crop!r}; valid: single, ten")
        if crop == "ten" and arch != "imagenet":
            raise ValueError("crop 'ten' is for ImageNet-size inputs; CIFAR-size nets test on the single image")
        self.arch, self.crop = arch, crop
        self.centre_crop = CentreCrop(TEST_SHORT_SIDE, CROP)

    def __call__(self, jpeg: bytes) -> Tensor:
        if self.arch != "imagenet":
            return decode(jpeg)
        if self.crop == "single":
            return self.centre_crop(jpeg)
        width, height = jpegcrop.size(jpeg)
        scale = TEST_SHORT_SIDE / min(width, height)
        resized = decode_resized(
            jpeg, (width, height), (0, 0, width, height), (round(width * scale), round(height * scale))
        )
        height, width = resized.shape[:2]
        corners = [(0, 0), (0, width - CROP), (height - CROP, 0), (height - CROP, width - CROP)]
        centre = ((height - CROP) // 2, (width - CROP) // 2)
        five = [resized[t : t + CROP, left : left + CROP] for t, left in [*corners, centre]]
        return torch.stack(five + [crop.flip(1) for crop in five])  # (10, 224, 224, 3)


def train_transform(arch: str, flip: bool) -> Transform:
    """JPEG bytes -> uint8 (H, W, 3): the per-image, geometric part of the training augmentation."""
    return TrainTransform(arch, flip)


def eval_transform(arch: str, crop: str = "single") -> Transform:
    """JPEG bytes -> uint8 (H, W, 3), or (10, H, W, 3) for the paper's 10-crop."""
    return EvalTransform(arch, crop)


def prepare_batch(pixels: Tensor, mean: Sequence[float], lighting: bool, out: Tensor | None = None) -> Tensor:
    """uint8 (..., H, W, 3) on the training device -> float (N, 3, H, W) in channels_last:
    [0, 1] scaling, PCA colour noise per image (training, ImageNet-size), mean subtraction.

    `out`: the previous batch's result, overwritten when its shape fits. A fresh float batch of
    ImageNet size (tens of MB) is mapped anew by the CPU allocator every step, and those
    page faults cost ten times the arithmetic. Pass it only once the previous step is done with it.
    """
    images = pixels.reshape(-1, *pixels.shape[-3:])
    n, height, width, _ = images.shape
    shift = -torch.tensor(list(mean), device=images.device).expand(n, 3)
    if lighting:
        eigenvalues = torch.tensor(PCA_EIGENVALUES, device=images.device)
        eigenvectors = torch.tensor(PCA_EIGENVECTORS, device=images.device)
        alpha = torch.randn(n, 3, device=images.device) * PCA_STD
        shift = shift + (alpha * eigenvalues) @ eigenvectors.T
    if out is None or out.shape != (n, 3, height, width) or out.device != images.device:
        out = torch.empty((n, 3, height, width), device=images.device, memory_format=torch.channels_last)
    # channels_last NCHW is NHWC memory: work on it as rows of W*3 values, with each image's
    # colour shift tiled along the row (a broadcast over an innermost dimension of 3 would not
    # vectorise).
    rows = out.permute(0, 2, 3, 1).view(n, height, width * 3)
    rows.copy_(images.reshape(n, height, width * 3))
    torch.add(shift.repeat(1, width)[:, None, :], rows, alpha=1 / 255, out=rows)
    return out
