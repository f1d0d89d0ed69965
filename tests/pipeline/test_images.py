"""One input image as the shards store it: a baseline RGB JPEG, or a reject with its reason."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline import transforms
from pipeline.images import Conversion, Rejected, is_baseline, to_rgb_jpeg
from tests.data_trees import jpeg_bytes, picture, png_bytes
from tests.helpers import CONVERSION

RNG = np.random.default_rng(0)


def test_to_rgb_jpeg_by_content():
    pixels = picture(np.random.default_rng(0), 32, 24)
    good = jpeg_bytes(pixels)
    assert to_rgb_jpeg(good, CONVERSION)[:2] == (good, None)
    assert to_rgb_jpeg(jpeg_bytes(pixels, "CMYK"), CONVERSION).converted_from == "CMYK"
    png = to_rgb_jpeg(png_bytes(pixels), CONVERSION)
    assert png.converted_from == "PNG RGB"
    assert png.size == (32, 24)
    assert list(png.channel_means) == pytest.approx(pixels.reshape(-1, 3).mean(axis=0).tolist())
    for data, reason in [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (good[:200], "truncated image"),
    ]:
        with pytest.raises(Rejected, match=reason):
            to_rgb_jpeg(data, CONVERSION)


def test_tiny_images_are_rejected_by_min_side_or_converted():
    one_pixel = jpeg_bytes(np.full((1, 1, 3), 200, np.uint8))  # Pillow's draft divided by zero here
    with pytest.raises(Rejected, match="1x1, a side under shard.min_side 8"):
        to_rgb_jpeg(one_pixel, CONVERSION)
    banner = to_rgb_jpeg(jpeg_bytes(picture(RNG, 60, 3)), Conversion(95, None, 1, 10_000, 100_000))
    assert banner.size == (60, 3) and banner.converted_from is None


def test_sixteen_bit_images_keep_their_tones():
    grey = np.array([[0, 16384, 32768, 65535]] * 8, np.uint16).repeat(2, axis=1)  # 8 x 8
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    prepared = to_rgb_jpeg(buffer.getvalue(), CONVERSION)
    assert prepared.converted_from == "PNG I;16"
    decoded = np.asarray(Image.open(io.BytesIO(prepared.jpeg)))[0, ::2, 0].astype(int)
    assert np.abs(decoded - [0, 64, 128, 255]).max() <= 2  # not clipped to near-white


def test_only_baseline_frames_pass_through_untouched():
    good = jpeg_bytes(picture(RNG, 24, 20))
    sof = good.index(b"\xff\xc0")
    arithmetic = good[:sof] + b"\xff\xc9" + good[sof + 2 :]  # Pillow reads it as a plain JPEG
    empty_first = b"\xff\xd8\xff\xd9" + good  # libjpeg stops at the first, empty image
    assert is_baseline(good)
    for data in (arithmetic, empty_first):
        assert not is_baseline(data)
        try:
            prepared = to_rgb_jpeg(data, CONVERSION)
        except Rejected:
            continue
        assert prepared.jpeg != data and is_baseline(prepared.jpeg)
        assert transforms.decode(prepared.jpeg).shape == (20, 24, 3)


def test_any_decoder_failure_is_a_reject_with_its_reason():
    # A DDS header naming an unknown pixel format: Pillow raises NotImplementedError.
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 4)
    with pytest.raises(Rejected, match="cannot decode: NotImplementedError"):
        to_rgb_jpeg(dds + b"XXXX" + bytes(200), CONVERSION)
