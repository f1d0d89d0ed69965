"""One input image as the shards store it: a baseline RGB JPEG, checked by content.

`to_rgb_jpeg` is the shard stage's conversion of every input file, and the served model's of
every image it is sent, so that a served image becomes the very bytes a shard would hold.
An RGB baseline JPEG passes through byte for byte; anything else Pillow can read is re-encoded;
whatever fails is a `Rejected` with the reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from pipeline.params import Shard as ShardParams

# The most pixels a JPEG may claim for `jpegcrop` to decode it. Shards may come from buckets
# others can write, and a 2 KB JPEG can claim 65500 x 65500 pixels: 13 GB to decode whole, and
# 13-26 GB of DCT coefficients for a progressive one, even for a small crop. The decoder checks
# the header against this before it allocates anything of the image's size. At the limit one
# decode needs at most ~0.8 GB: 3 bytes a pixel of RGB (a whole decode) plus 6 of coefficients
# (a progressive JPEG). The value is Pillow's Image.MAX_IMAGE_PIXELS, above which the shard
# stage already refuses an image (it makes Pillow's DecompressionBombWarning an error): no
# shard it writes is refused here, and its shard.max_pixels must not exceed this.
MAX_PIXELS = 89_478_485


class Rejected(Exception):
    """An input that cannot become a sample; the message is the reason."""


@dataclass(frozen=True)
class Conversion:
    """How inputs become samples, and what an input may be. The cheap checks (bytes, then the
    header's pixel count and sides) come before a file is read whole or decoded."""

    quality: int  # of the JPEGs that must be re-encoded
    max_side: int | None  # shrink images whose longer side exceeds it
    min_side: int  # reject images with a shorter side (1x1 tracking pixels, 2-pixel rules)
    max_pixels: int  # reject images with more pixels (a 2 KB file can claim 65500 x 65500)
    max_bytes: int  # reject files larger than this without reading them

    @classmethod
    def of(cls, shard: ShardParams) -> Conversion:
        return cls(shard.jpeg_quality, shard.max_side, shard.min_side, shard.max_pixels, shard.max_bytes)


class Prepared(NamedTuple):
    jpeg: bytes  # a baseline RGB JPEG
    converted_from: str | None  # None: the input bytes passed through untouched
    channel_means: tuple[float, float, float]  # the image's mean R, G, B, in 0..255
    size: tuple[int, int]  # width, height of the sample's image


# Pillow's modes of more than 8 bits per channel, which its convert("RGB") clips to 0..255
# instead of scaling (a 16-bit PNG came out near-white).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_of(image: Image.Image) -> Image.Image:
    """An RGB image with the input's tones: 16-bit values scaled to 8 bits; alpha dropped."""
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif image.mode == "F":
        raise Rejected("32-bit floating-point pixels (no defined tone range)")
    return image.convert("RGB")


def channel_means(image: Image.Image) -> tuple[float, float, float]:
    r, g, b = np.asarray(image, dtype=np.uint8).reshape(-1, 3).mean(axis=0, dtype=np.float64).tolist()
    return r, g, b


# JPEG markers: start of image and end of image, start of scan, and the frame headers (SOFn)
# of every coding process but baseline (SOF0): extended, progressive, lossless, arithmetic.
SOI, EOI, SOS, SOF0 = 0xD8, 0xD9, 0xDA, 0xC0
OTHER_FRAMES = {0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)


def is_baseline(data: bytes) -> bool:
    """Whether the JPEG's first frame, read as libjpeg reads it (from the first SOI, segment
    by segment), is baseline. Pillow reads past an empty first image (an SOI then an EOI, as
    in a damaged MPO) and calls arithmetic-coded frames plain JPEG; the loader's decoder and
    GPU decoders do not, so only a true baseline frame may pass through untouched."""
    if data[:2] != b"\xff\xd8":
        return False
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in STANDALONE:
            at += 2
            continue
        if marker == SOF0:
            return True
        if marker in OTHER_FRAMES or marker in (SOI, EOI, SOS):
            return False
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return False


def to_rgb_jpeg(data: bytes, conversion: Conversion) -> Prepared:
    """Check an image by content and make it a baseline RGB JPEG (re-encoding only if needed).
    Any failure is a `Rejected` with the reason: one bad file is a counted reject, never the
    end of the run."""
    if not data:
        raise Rejected("empty file")
    if len(data) > conversion.max_bytes:
        raise Rejected(f"{len(data)} bytes, over shard.max_bytes {conversion.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _prepare(data, conversion)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        # Pillow's own check, in Image.open, before ours: it fires above shard.max_pixels.
        raise Rejected(f"too many pixels: {e}") from None
    # Pillow's decoders raise almost anything on hostile input (ZeroDivisionError,
    # RuntimeError, NotImplementedError, MemoryError, ...): each is this file's problem alone.
    except Exception as e:  # noqa: BLE001
        message = " ".join(str(e).split())[:200]
        reason = "truncated image" if "truncat" in message.lower() else f"cannot decode: {type(e).__name__}: {message}"
        raise Rejected(reason) from None


def _prepare(data: bytes, conversion: Conversion) -> Prepared:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > conversion.max_pixels:
            raise Rejected(f"{width}x{height} pixels, over shard.max_pixels {conversion.max_pixels}")
        if min(width, height) < conversion.min_side:
            raise Rejected(f"{width}x{height}, a side under shard.min_side {conversion.min_side}")
        progressive = bool(image.info.get("progressive") or image.info.get("progression"))
        too_big = conversion.max_side is not None and max(width, height) > conversion.max_side
        if image.format == "JPEG" and image.mode == "RGB" and is_baseline(data) and not too_big:
            # Decoding at 1/8 scale still reads every entropy-coded byte, so it finds
            # truncated files at a fraction of the cost of a full decode; the DC
            # coefficients it keeps give the block means, and so the image's mean.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            return Prepared(data, None, channel_means(image), (width, height))
        image.load()
        if image.format != "JPEG":
            converted_from = f"{image.format} {image.mode}"
        elif image.mode != "RGB":
            converted_from = image.mode
        elif progressive:
            converted_from = "progressive JPEG"
        else:
            converted_from = None if is_baseline(data) else "non-baseline JPEG"  # None: only shrunk
        rgb = rgb_of(image)
    if too_big:
        rgb.thumbnail((conversion.max_side, conversion.max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=conversion.quality)
    return Prepared(buffer.getvalue(), converted_from, channel_means(rgb), rgb.size)
