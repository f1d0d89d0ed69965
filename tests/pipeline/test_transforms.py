"""The paper's augmentations and test crops, and the cropped JPEG decode they stand on (jpegcrop)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import jpegcrop
from pipeline import transforms
from pipeline.images import MAX_PIXELS
from tests.data_trees import jpeg_bytes, picture

MEAN = (0.5, 0.4, 0.3)


def photo(width=500, height=375, **save) -> bytes:
    return jpeg_bytes(picture(np.random.default_rng(1), width, height), **save)


def full_decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


@pytest.mark.parametrize(
    "save",
    [{"subsampling": 2}, {"subsampling": 1}, {"subsampling": 0}, {"progressive": True}],
    ids=["4:2:0", "4:2:2", "4:4:4", "progressive"],
)
def test_cropped_decode_gives_the_pixels_of_a_full_decode(save):
    """Any rectangle, iMCU-aligned or not, at the image's edges or inside: the same pixels as
    PIL's decode of the whole image."""
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (333, 500), (101, 77)]:
        jpeg = photo(width, height, **save)
        assert jpegcrop.size(jpeg) == (width, height)
        full = np.asarray(full_decode(jpeg))
        assert np.array_equal(transforms.decode(jpeg).numpy(), full)
        for i in range(40):
            w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if i % 2:
                left = left // 16 * 16  # on an iMCU boundary
            region = np.frombuffer(jpegcrop.decode(jpeg, left, top, w, h, 1, MAX_PIXELS), np.uint8).reshape(h, w, 3)
            assert np.array_equal(region, full[top : top + h, left : left + w]), (width, height, left, top, w, h)


def test_cropped_decode_of_a_grayscale_jpeg_is_rgb():
    jpeg = jpeg_bytes(picture(np.random.default_rng(2), 64, 48), mode="L")
    assert np.array_equal(transforms.decode(jpeg).numpy(), np.asarray(full_decode(jpeg)))


def test_cropped_decode_rejects_bad_input_with_a_reason():
    jpeg = photo(64, 48)
    with pytest.raises(ValueError, match="Not a JPEG file"):
        transforms.decode(b"GIF89a not a jpeg")
    with pytest.raises(ValueError, match="outside the 64 x 48 image"):
        jpegcrop.decode(jpeg, 60, 0, 10, 10, 1, MAX_PIXELS)
    with pytest.raises(ValueError, match="valid: 1, 2, 4, 8"):
        jpegcrop.decode(jpeg, 0, 0, 10, 10, 3, MAX_PIXELS)


def test_decode_resized_equals_cropping_and_resizing_the_full_decode():
    jpeg = photo(500, 375)
    for box, size in [
        ((37.4, 81.9, 301.2, 345.7), (224, 224)),
        ((100, 50, 250, 200), (224, 224)),
        ((0, 0, 500, 375), (341, 256)),
    ]:
        whole = (round(box[0]), round(box[1]), round(box[2]), round(box[3]))
        reference = np.asarray(full_decode(jpeg).crop(whole).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        got = transforms.decode_resized(jpeg, (500, 375), box, size).numpy().astype(np.int16)
        assert got.shape == (size[1], size[0], 3)
        assert np.abs(got - reference).max() <= 1  # torch's antialiased bilinear vs PIL's: rounding only


def test_decode_resized_returns_whole_rows_of_pixels():
    """HWC with each row's RGB values adjacent: stacking a batch of them is then a plain copy
    (a channel-planar result made every batch a byte-by-byte gather)."""
    got = transforms.decode_resized(photo(500, 375), (500, 375), (37.4, 81.9, 301.2, 345.7), (224, 224))
    assert got.shape == (224, 224, 3) and got.is_contiguous()


def test_decode_resized_decodes_big_images_at_a_reduced_scale(monkeypatch):
    """A box 2x (4x, 8x) the output is decoded at 1/2 (1/4, 1/8) scale: libjpeg's DCT scaling,
    never below the output's resolution, and close to resizing the full decode."""
    jpeg = photo(1200, 900)
    denominators = []
    decode = jpegcrop.decode
    monkeypatch.setattr(jpegcrop, "decode", lambda *args: denominators.append(args[5]) or decode(*args))
    for box, expected in [((0, 0, 600, 600), 2), ((0, 0, 224 * 2 - 1, 224 * 2 - 1), 1), ((100, 0, 1100, 900), 4)]:
        got = transforms.decode_resized(jpeg, (1200, 900), box, (224, 224)).float()
        reference = full_decode(jpeg).crop(box).resize((224, 224), Image.Resampling.BILINEAR)
        assert denominators[-1] == expected
        assert (got - torch.from_numpy(np.asarray(reference, dtype=np.float32))).abs().mean() < 1.5
    transforms.decode_resized(jpeg, (1200, 900), (0, 0, 1200, 900), (128, 96))
    assert denominators[-1] == 8


def test_imagenet_train_transform_shape():
    torch.manual_seed(0)
    pixels = transforms.train_transform("imagenet", flip=True)(photo())
    assert pixels.shape == (224, 224, 3) and pixels.dtype == torch.uint8


def test_scale_crop_equals_resize_then_crop():
    """One resize of the crop's region gives the pixels of resizing the image, then cropping."""
    jpeg = photo(500, 375)
    fused = transforms.RandomScaleCrop(300, 300, 224)
    torch.manual_seed(3)
    got = np.asarray(fused(jpeg), dtype=np.float32)
    torch.manual_seed(3)
    side = transforms.randint(300, 300)
    width = round(500 * side / 375)
    left, top = transforms.randint(0, width - 224), transforms.randint(0, 300 - 224)
    resized = full_decode(jpeg).resize((width, side), Image.Resampling.BILINEAR)
    reference = resized.crop((left, top, left + 224, top + 224))
    assert np.abs(got - np.asarray(reference, dtype=np.float32)).mean() < 1.0  # same pixels, up to rounding


def test_scale_crop_fits_any_image_size():
    crop = transforms.RandomScaleCrop(256, 480, 224)
    centre = transforms.CentreCrop(256, 224)
    rng = np.random.default_rng(0)
    for seed in range(100):
        torch.manual_seed(seed)
        jpeg = jpeg_bytes(np.zeros((int(rng.integers(60, 900)), int(rng.integers(60, 900)), 3), np.uint8))
        assert crop(jpeg).shape == (224, 224, 3) and centre(jpeg).shape == (224, 224, 3)


def test_imagenet_eval_single_and_ten_crop():
    jpeg = photo(600, 400)  # 384x256 at test scale: the centre crop sits symmetrically
    single = transforms.eval_transform("imagenet", "single")(jpeg).float()
    ten = transforms.eval_transform("imagenet", "ten")(jpeg).float()
    assert single.shape == (224, 224, 3)
    assert ten.shape == (10, 224, 224, 3)
    assert (ten[4] - single).abs().mean() < 2  # the 5th crop is the centre
    assert torch.equal(ten[9], ten[4].flip(1))  # and the 10th its mirror image
    assert transforms.prepare_batch(ten[None].to(torch.uint8), MEAN, lighting=False).shape == (10, 3, 224, 224)


def test_cifar_train_transform_pads_and_crops():
    jpeg = jpeg_bytes(np.full((32, 32, 3), 255, dtype=np.uint8))
    torch.manual_seed(0)
    crops = [transforms.train_transform("cifar", flip=True)(jpeg) for _ in range(20)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert any((c == 0).any() for c in crops)  # some take in zero padding
    assert all((c[12:20, 12:20] == 255).all() for c in crops)  # all keep the interior
    with pytest.raises(ValueError, match="single image"):
        transforms.eval_transform("cifar", "ten")


def test_digits_are_never_flipped():
    asymmetric = np.zeros((16, 16, 3), dtype=np.uint8)
    asymmetric[:, :4] = 255  # a bar on the left
    jpeg = jpeg_bytes(asymmetric)
    torch.manual_seed(0)
    for _ in range(30):
        out = transforms.train_transform("cifar", flip=False)(jpeg).float()
        assert out[:, :8].sum() > out[:, 8:].sum()


def test_prepare_batch_scales_subtracts_the_mean_and_adds_colour_noise():
    pixels = torch.full((4, 8, 8, 3), 255, dtype=torch.uint8)
    plain = transforms.prepare_batch(pixels, MEAN, lighting=False)
    assert plain.shape == (4, 3, 8, 8)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, (1 - torch.tensor(MEAN)).view(1, 3, 1, 1).expand(4, 3, 8, 8))
    torch.manual_seed(0)
    lit = transforms.prepare_batch(pixels, MEAN, lighting=True)
    shift = (lit - plain).flatten(2)
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6)  # one colour shift per image
    assert not torch.allclose(shift[0], shift[1])  # drawn per image
    assert shift.abs().max() < 0.2


def test_prepare_batch_reuses_the_buffer_it_is_given():
    pixels = torch.randint(0, 256, (4, 8, 6, 3), dtype=torch.uint8)
    first = transforms.prepare_batch(pixels, MEAN, lighting=False)
    expected = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)).clone()
    assert torch.allclose(first, expected, atol=1e-6)
    again = transforms.prepare_batch(pixels.flip(1), MEAN, lighting=False, out=first)
    assert again.data_ptr() == first.data_ptr() and torch.allclose(again, expected.flip(2), atol=1e-6)
    smaller = transforms.prepare_batch(pixels[:3], MEAN, lighting=False, out=first)  # a last, short batch
    assert smaller.shape == (3, 3, 8, 6) and smaller.data_ptr() != first.data_ptr()
