"""Fuzzing where untrusted bytes meet C decoders: the shard stage's per-file conversion and the
loader's cropped JPEG decode.

    python -m benchmarks.fuzz [--cases 20000] [--seed 0] [--workers 2] [--timeout 60]
                              [--out benchmarks/results/fuzz.json]
    python -m benchmarks.fuzz --seed 0 --replay 41 [--save case41.bin]   # one case, here

The contract:
(a) `pipeline.images.to_rgb_jpeg`, for ANY bytes, returns a sample (a baseline RGB JPEG that the
    loader reads at the size the sample reports) or raises `images.Rejected` with the reason.
    Anything else that escapes ends a shard worker, and with it the stage.
(b) The loader's decode functions (the header reader `jpegcrop.size`, `transforms.decode`, the
    ImageNet train crop, the eval centre crop and 10-crop), for any mutated JPEG, return a
    tensor of the expected shape or raise ValueError; they never crash or hang the process.

Each case is made from (seed, case index) alone, by a numpy Generator: an image of random
pixels saved by Pillow in one of its formats and variants (`RECIPES`), 1x1 to thin banners to
photograph size, then mutated (bit flips, interesting byte values, truncation, whole segments or
random spans duplicated or deleted, header fields such as the dimensions set to huge values).
A failure is reported with its seed and case index, `--replay` shows its traceback, and
tests/pipeline/test_fuzz.py runs a few thousand cases of the same generator.

Cases run in worker processes, each with an address-space limit (3 GiB above what its imports
map) and a per-case timeout: a segfault, an abort, running out of the limit or a hang is
recorded against its case and the worker restarted, instead of ending the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageCms

from pipeline import images, params

REPO = Path(__file__).resolve().parent.parent


# --- the call under test ------------------------------------------------------------------------
# The one place that calls the code under test: a change of its signature is a change here.


@functools.cache
def conversion(loose: bool) -> images.Conversion:
    """The stage's limits (params.yaml); loose: min_side 1, so 1x1..7x7 images reach the
    decoders, and max_side 48, so larger ones go through the shrinking path."""
    limits = images.Conversion.of(params.load(REPO / "params.yaml").shard)
    return dataclasses.replace(limits, min_side=1, max_side=48) if loose else limits


def to_rgb_jpeg(data: bytes, loose: bool) -> images.Prepared:
    return images.to_rgb_jpeg(data, conversion(loose))


# --- seed images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str  # what outcomes are counted under
    format: str  # Pillow's format name
    mode: str  # the random pixels are converted to this mode before saving
    options: tuple[tuple[str, Any], ...] = ()  # save() keywords
    frames: int = 1
    jpeg: bool = False  # a JPEG: its mutations also go to the loader's decoder (part b)
    weight: float = 1.0  # how often it is drawn, relative to the others


def jpeg(name: str, mode: str = "RGB", weight: float = 3.0, **options: Any) -> Recipe:
    return Recipe(name, "JPEG", mode, tuple(options.items()), jpeg=True, weight=weight)


# JPEGs are what a real data set is mostly made of and the only input of part (b): about 40%
# of the draws. The rest is every format Pillow saves here (ICNS is left out: Pillow upsamples
# whatever it is given to 1024x1024, a quarter of a second per case); formats it cannot read
# back (PALM, PDF, EPS without Ghostscript) must be rejected like any other non-image.
RECIPES = (
    jpeg("JPEG baseline", weight=8),
    jpeg("JPEG 4:4:4", subsampling=0),
    jpeg("JPEG 4:2:2", subsampling=1),
    jpeg("JPEG progressive", progressive=True),
    jpeg("JPEG greyscale", "L"),
    jpeg("JPEG CMYK", "CMYK"),
    jpeg("JPEG optimized, restart markers", optimize=True, restart_marker_blocks=1),
    jpeg("JPEG with EXIF and ICC profile", exif="exif", icc_profile="icc"),
    Recipe("MPO, 2 frames", "MPO", "RGB", frames=2, jpeg=True),
    Recipe("PNG RGB", "PNG", "RGB", weight=2),
    Recipe("PNG RGBA", "PNG", "RGBA"),
    Recipe("PNG greyscale", "PNG", "L"),
    Recipe("PNG greyscale+alpha", "PNG", "LA"),
    Recipe("PNG 1-bit", "PNG", "1"),
    Recipe("PNG palette", "PNG", "P"),
    Recipe("PNG 16-bit", "PNG", "I;16", weight=2),
    Recipe("APNG, 2 frames", "PNG", "RGB", frames=2),
    Recipe("GIF", "GIF", "P"),
    Recipe("GIF, 2 frames", "GIF", "P", frames=2),
    Recipe("BMP", "BMP", "RGB"),
    Recipe("BMP RGBA", "BMP", "RGBA"),
    Recipe("BMP palette", "BMP", "P"),
    Recipe("BMP 1-bit", "BMP", "1"),
    Recipe("DIB", "DIB", "RGB"),
    Recipe("TIFF raw", "TIFF", "RGB"),
    Recipe("TIFF LZW", "TIFF", "RGB", (("compression", "tiff_lzw"),)),
    Recipe("TIFF deflate", "TIFF", "RGB", (("compression", "tiff_adobe_deflate"),)),
    Recipe("TIFF packbits", "TIFF", "RGB", (("compression", "packbits"),)),
    Recipe("TIFF JPEG", "TIFF", "RGB", (("compression", "jpeg"),)),
    Recipe("TIFF 16-bit", "TIFF", "I;16"),
    Recipe("TIFF float", "TIFF", "F"),
    Recipe("TIFF CMYK", "TIFF", "CMYK"),
    Recipe("TIFF 1-bit group 4", "TIFF", "1", (("compression", "group4"),)),
    Recipe("TIFF, 2 pages", "TIFF", "RGB", frames=2),
    Recipe("WebP lossy", "WEBP", "RGB"),
    Recipe("WebP lossless", "WEBP", "RGBA", (("lossless", True),)),
    Recipe("WebP, 2 frames", "WEBP", "RGB", frames=2),
    Recipe("AVIF", "AVIF", "RGB", (("speed", 10),)),
    Recipe("JPEG 2000 codestream", "JPEG2000", "RGB", (("no_jp2", True),)),
    Recipe("JPEG 2000 JP2", "JPEG2000", "RGB"),
    Recipe("ICO", "ICO", "RGBA"),
    Recipe("TGA", "TGA", "RGB"),
    Recipe("TGA RLE", "TGA", "RGBA", (("compression", "tga_rle"),)),
    Recipe("PPM", "PPM", "RGB"),
    Recipe("PGM", "PPM", "L"),
    Recipe("PGM 16-bit", "PPM", "I;16"),
    Recipe("PBM", "PPM", "1"),
    Recipe("QOI", "QOI", "RGBA"),
    Recipe("SGI", "SGI", "RGB"),
    Recipe("PCX", "PCX", "RGB"),
    Recipe("IM", "IM", "RGB"),
    Recipe("SPIDER", "SPIDER", "F"),
    Recipe("MSP", "MSP", "1"),
    Recipe("BLP", "BLP", "P"),
    Recipe("DDS", "DDS", "RGBA"),
    Recipe("XBM", "XBM", "1"),
    Recipe("PALM", "PALM", "P"),
    Recipe("PDF", "PDF", "RGB"),
    Recipe("EPS", "EPS", "RGB"),
)


@functools.cache
def profile_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, the tag a camera writes
    exif[0x010F] = "fuzz"  # make
    return exif.tobytes()


def random_image(rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    """Noise, or a few flat colours (which the run-length and palette coders compress)."""
    if rng.random() < 0.5:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        colours = rng.integers(0, 256, (4, 3), dtype=np.uint8)
        rgb = colours[rng.integers(0, 4, (height, width))]
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray((rng.standard_normal((height, width)) * 1000).astype(np.float32))
    image = Image.fromarray(rgb, "RGB")
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=int(rng.integers(2, 257)))
    if mode in ("RGBA", "LA"):
        image = image.convert(mode[:-1])
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    return image.convert(mode)


def save(recipe: Recipe, width: int, height: int, rng: np.random.Generator) -> bytes:
    options = dict(recipe.options)
    if recipe.format in ("JPEG", "MPO"):
        options["quality"] = int(rng.integers(30, 96))
    if options.get("exif") == "exif":
        options["exif"] = exif_bytes()
    if options.get("icc_profile") == "icc":
        options["icc_profile"] = profile_bytes()
    frames = [random_image(rng, recipe.mode, width, height) for _ in range(recipe.frames)]
    if recipe.frames > 1:
        options.update(save_all=True, append_images=frames[1:])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # formats Pillow will drop (IM)
        frames[0].save(buffer, recipe.format, **options)
    return buffer.getvalue()


@functools.cache
def available_recipes() -> tuple[Recipe, ...]:
    """The recipes this Pillow build can save (AVIF, WebP, JPEG 2000 and libtiff's codecs are
    optional): the case stream is the same wherever the same ones are."""
    rng = np.random.default_rng(0)
    usable = []
    for recipe in RECIPES:
        try:
            save(recipe, 8, 8, rng)
        except (OSError, KeyError, ValueError):
            continue
        usable.append(recipe)
    return tuple(usable)


def draw_size(rng: np.random.Generator, recipe: Recipe) -> tuple[int, int]:
    """Tiny (1..7 px a side: draft-mode and filter edge cases), banners (1..3 px by up to 400),
    small, and for JPEGs photograph size (the crops decode at 1/2..1/8 scale only there)."""
    kind = rng.choice(4, p=[0.35, 0.2, 0.37, 0.08])
    if kind == 0:
        width, height = rng.integers(1, 8, 2)
    elif kind == 1:
        width, height = int(rng.integers(16, 401)), int(rng.integers(1, 4))
        if rng.random() < 0.5:
            width, height = height, width
    elif kind == 3 and recipe.jpeg:
        width, height = int(rng.integers(200, 641)), int(rng.integers(150, 481))
    else:
        width, height = rng.integers(8, 97, 2)
    return int(width), int(height)


def seed_image(recipe: Recipe, size: tuple[int, int], rng: np.random.Generator) -> tuple[bytes, tuple[int, int]]:
    """The saved image, and its size: 16x16 where the format refuses the drawn one (ICO, a banner)."""
    try:
        return save(recipe, *size, rng), size
    except (OSError, ValueError, KeyError):
        return save(recipe, 16, 16, rng), (16, 16)


# --- mutations ----------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80)
INTERESTING_SIZES = (0, 1, 7, 8, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
HEADER = 64  # half the byte-level mutations land here, where the headers are
SOF_MARKERS = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))  # DHT, JPG, DAC


def position(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(0, min(n, HEADER) if rng.random() < 0.5 else n))


def count(rng: np.random.Generator) -> int:
    return int(min(rng.geometric(0.4), 16))


def size_value(rng: np.random.Generator, nbytes: int) -> int:
    """A value for a 2- or 4-byte dimension field: an edge value, or any value at all."""
    limit = 1 << (8 * nbytes)
    if rng.random() < 0.7:
        return int(rng.choice([v for v in INTERESTING_SIZES if v < limit]))
    return int(rng.integers(0, limit))


def jpeg_segments(data: bytes | bytearray, resync: bool = False) -> list[tuple[int, int, int]]:
    """(marker, start, end) of a JPEG's marker segments after SOI, up to its first SOS.
    resync: skip bytes that are not a marker, as libjpeg does (with a warning), to find the
    segments a decoder finds; without it the walk stops there (a mutation's view)."""
    segments, i = [], 2
    while data[:2] == b"\xff\xd8" and i + 4 <= len(data):
        if data[i] != 0xFF:
            i = data.find(b"\xff", i + 1) if resync else -1
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # no length: a stuffed byte, TEM, RSTn
            i += 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        segments.append((marker, i, end))
        if marker == 0xDA:
            break
        i = end
    return segments


def png_chunks(data: bytes | bytearray) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of a PNG's chunks."""
    chunks, i = [], 8
    while data[:8] == b"\x89PNG\r\n\x1a\n" and i + 12 <= len(data):
        end = i + 12 + int.from_bytes(data[i : i + 4], "big")
        chunks.append((bytes(data[i + 4 : i + 8]), i, end))
        i = end
    return chunks


def spans(data: bytearray) -> list[tuple[int, int]]:
    """Whole JPEG segments or PNG chunks, where the data has them."""
    return [(s, e) for _, s, e in jpeg_segments(data)] + [(s, e) for _, s, e in png_chunks(data)]


def span(rng: np.random.Generator, data: bytearray) -> tuple[int, int, str]:
    whole = spans(data)
    if whole and rng.random() < 0.5:
        start, end = whole[int(rng.integers(len(whole)))]
        return start, min(end, len(data)), "a segment"
    start = position(rng, len(data))
    return start, min(len(data), start + int(rng.geometric(0.05))), "a span"


def bit_flips(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    k = count(rng)
    for _ in range(k):
        data[position(rng, len(data))] ^= 1 << int(rng.integers(8))
    return f"{k} bit flips"


def interesting_bytes(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    k = count(rng)
    for _ in range(k):
        data[position(rng, len(data))] = int(rng.choice(INTERESTING_BYTES))
    return f"{k} bytes set to 00/FF/7F/80"


def truncate(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    n = len(data)
    cut = position(rng, n) if rng.random() < 0.3 else int(rng.integers(0, n))
    del data[cut:]
    return f"truncated to {cut} of {n} bytes"


def duplicate(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    start, end, what = span(rng, data)
    data[end:end] = data[start:end]
    return f"{what} [{start}:{end}] duplicated"


def delete(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    start, end, what = span(rng, data)
    del data[start:end]
    return f"{what} [{start}:{end}] deleted"


def set_field(data: bytearray, offset: int, nbytes: int, value: int, order: str = "big") -> None:
    if offset + nbytes <= len(data):
        data[offset : offset + nbytes] = value.to_bytes(nbytes, order)


def jpeg_header(data: bytearray, rng: np.random.Generator) -> str | None:
    """A field of the frame header (SOF), the scan header (SOS) or a table (DQT, DHT)."""
    segments = jpeg_segments(data)
    frames = [s for m, s, _ in segments if m in SOF_MARKERS]
    if not frames:
        return None
    sof = frames[0]
    components = max(1, min(data[sof + 9] if sof + 9 < len(data) else 1, 4))
    c = int(rng.integers(components))
    choice = rng.choice(["height", "width", "precision", "components", "sampling", "table", "process", "other"])
    if choice in ("height", "width"):
        value = size_value(rng, 2)
        set_field(data, sof + (5 if choice == "height" else 7), 2, value)
        return f"SOF {choice} = {value}"
    if choice == "precision":
        value = int(rng.choice([0, 1, 12, 16, 255]))
        set_field(data, sof + 4, 1, value)
    elif choice == "components":
        value = int(rng.choice([0, 1, 2, 3, 4, 5, 255]))
        set_field(data, sof + 9, 1, value)
    elif choice == "sampling":
        value = int(rng.choice([0x00, 0x11, 0x12, 0x21, 0x22, 0x14, 0x41, 0x44, 0x88, 0xFF]))
        set_field(data, sof + 11 + 3 * c, 1, value)
    elif choice == "table":
        value = int(rng.choice([0, 1, 2, 3, 4, 255]))
        set_field(data, sof + 12 + 3 * c, 1, value)
    elif choice == "process":
        value = int(rng.choice(SOF_MARKERS))
        set_field(data, sof + 1, 1, value)
        return f"SOF marker = {value:#04x}"
    else:
        others = [(m, s) for m, s, _ in segments if m in (0xDA, 0xDB, 0xC4, 0xDD)]
        if not others:
            return None
        marker, start = others[int(rng.integers(len(others)))]
        value = int(rng.choice([0, 1, 4, 0x10, 0x13, 0xFF]))
        set_field(data, start + 4, 1, value)  # SOS: component count; DQT/DHT: class and id; DRI: interval
        return f"marker {marker:#04x} field = {value}"
    return f"SOF {choice} = {value}"


def png_header(data: bytearray, rng: np.random.Generator) -> str | None:
    """An IHDR field, its CRC recomputed (nine times in ten) so the decoder gets to it."""
    chunks = png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(data) < 33:
        return None
    choice = rng.choice(["width", "height", "bit depth", "colour type", "interlace"])
    if choice in ("width", "height"):
        value = size_value(rng, 4)
        set_field(data, 16 if choice == "width" else 20, 4, value)
    else:
        value = int(rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255]))
        set_field(data, {"bit depth": 24, "colour type": 25, "interlace": 28}[choice], 1, value)
    if rng.random() < 0.9:
        set_field(data, 29, 4, zlib.crc32(data[12:29]))
    return f"IHDR {choice} = {value}"


def dimension_field(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str | None:
    """Any format: a 2- or 4-byte field near the start that holds the width or the height."""
    fields = []
    for nbytes in (2, 4):
        for order in ("little", "big"):
            for side in set(size):
                pattern = side.to_bytes(nbytes, order)
                for m in re.finditer(re.escape(pattern), bytes(data[:128])):
                    fields.append((m.start(), nbytes, order))
    if not fields:
        return None
    offset, nbytes, order = fields[int(rng.integers(len(fields)))]
    value = size_value(rng, nbytes)
    set_field(data, offset, nbytes, value, order)
    return f"{nbytes}-byte {order}-endian field at {offset} (a side) = {value}"


def header_field(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    tweak = jpeg_header if jpeg_segments(data) else png_header if png_chunks(data) else None
    done = tweak(data, rng) if tweak is not None and rng.random() < 0.7 else None
    return done or dimension_field(data, rng, size) or interesting_bytes(data, rng, size)


Mutation = Callable[[bytearray, np.random.Generator, tuple[int, int]], str]
MUTATIONS: dict[str, tuple[float, Mutation]] = {
    "bit flips": (0.2, bit_flips),
    "interesting bytes": (0.15, interesting_bytes),
    "truncation": (0.12, truncate),
    "duplication": (0.1, duplicate),
    "deletion": (0.1, delete),
    "header field": (0.2, header_field),
}


def mutate(data: bytearray, rng: np.random.Generator, size: tuple[int, int]) -> str:
    """Mutate in place; what was done. One mutation, sometimes two or three, sometimes none."""
    draw = rng.random()
    if draw < 0.05:
        return "none"
    names = list(MUTATIONS)
    weights = np.array([MUTATIONS[name][0] for name in names])
    steps = 1 if draw < 0.85 else int(rng.integers(2, 4))
    done = []
    for _ in range(steps):
        if not data:
            break
        name = names[rng.choice(len(names), p=weights / weights.sum())]
        done.append(MUTATIONS[name][1](data, rng, size))
    return "; ".join(done)


# --- cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    seed: int
    index: int
    recipe: Recipe
    size: tuple[int, int]  # of the image before mutation
    mutation: str
    loose: bool  # the conversion's limits: loose, or the stage's own
    torch_seed: int  # for the train transform's random crop
    data: bytes

    def describe(self) -> str:
        limits = "loose limits" if self.loose else "params.yaml limits"
        return f"{self.recipe.name} {self.size[0]}x{self.size[1]}, {self.mutation}, {len(self.data)} bytes, {limits}"


def make_case(seed: int, index: int) -> Case:
    """Case `index` of `seed`: from these two numbers alone, without making the others."""
    rng = np.random.default_rng([seed, index])
    recipes = available_recipes()
    weights = np.array([r.weight for r in recipes])
    recipe = recipes[rng.choice(len(recipes), p=weights / weights.sum())]
    original, size = seed_image(recipe, draw_size(rng, recipe), rng)
    data = bytearray(original)
    mutation = mutate(data, rng, size)
    loose = bool(rng.random() < 0.5)
    return Case(seed, index, recipe, size, mutation, loose, int(rng.integers(2**31)), bytes(data))


def replay_command(seed: int, index: int) -> str:
    return f"python -m benchmarks.fuzz --seed {seed} --replay {index}"


# --- the checks (run in a worker) ---------------------------------------------------------------


def category(message: str, words: int = 8) -> str:
    """A reason or an error message as a count's key: digits and hex numbers made N."""
    message = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", " ".join(message.split()))
    return " ".join(message.split(" ")[:words])


def reason_category(reason: str) -> str:
    if reason.startswith("cannot decode:"):  # "cannot decode: Type: message": the type is enough
        return ":".join(reason.split(":")[:2])
    return category(reason)


def escaped(e: BaseException, where: str = "") -> dict[str, Any]:
    # The innermost frame of the project's code, then the innermost of all where that is elsewhere
    # (in Pillow, in torch).
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(REPO)) and "/.venv/" not in f.filename]
    shown = ours[-1:] + [f for f in frames[-1:] if f not in ours]
    location = " -> ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in shown)
    return {
        "outcome": "escaped",
        "detail": f"{where}{type(e).__name__}",
        "message": " ".join(str(e).split())[:300],
        "where": location,
        "failure": True,
    }


def first_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(marker, precision, height, width, components) of a JPEG's first frame header."""
    for marker, start, _ in jpeg_segments(data, resync=True):
        if marker in SOF_MARKERS and start + 10 <= len(data):
            height = int.from_bytes(data[start + 5 : start + 7], "big")
            width = int.from_bytes(data[start + 7 : start + 9], "big")
            return marker, data[start + 4], height, width, data[start + 9]
    return None


def output_problem(prepared: images.Prepared, loose: bool) -> tuple[str, str] | None:
    """What is wrong with a sample, if anything, as (kind, message): it must be a baseline (SOF0)
    8-bit, 3-component JPEG, of the size it reports and within max_side, that the loader's
    decoder reads. Arithmetic-coded (SOF9) or extended (SOF1) JPEGs are not baseline: decoders
    other than libjpeg's (GPU ones among them) refuse them."""
    import jpegcrop  # the worker's imports: the parent does not decode
    from pipeline import transforms

    jpeg = prepared.jpeg
    if not isinstance(jpeg, bytes):
        return "jpeg not bytes", f"jpeg is {type(jpeg).__name__}"
    width, height = prepared.size
    try:  # first, as the worst: a sample the loader cannot read stops training when drawn
        if jpegcrop.size(jpeg) != (width, height):
            return "wrong size", f"the JPEG is {jpegcrop.size(jpeg)}, the sample says {(width, height)}"
        transforms.decode(jpeg)
    except ValueError as e:
        return "the loader cannot read it", str(e)
    frame = first_frame(jpeg)
    if frame is None:
        return "no JPEG frame header", "no SOF segment"
    marker, precision, _, _, components = frame
    if marker != 0xC0:
        return f"frame type SOF{marker - 0xC0}, not baseline", f"passed on with a SOF{marker - 0xC0} frame header"
    if precision != 8 or components != 3:
        return "not 8-bit 3-component", f"{precision}-bit samples, {components} components"
    max_side = conversion(loose).max_side
    if max_side is not None and max(width, height) > max_side:
        return "over max_side", f"{width}x{height}, over max_side {max_side}"
    if not all(math.isfinite(m) and 0 <= m <= 255 for m in prepared.channel_means):
        return "channel means out of range", f"channel means {prepared.channel_means}"
    return None


def check_conversion(case: Case, show: bool = False) -> dict[str, Any]:
    """Part (a). show: print the traceback of an escaped exception (a replay)."""
    try:
        prepared = to_rgb_jpeg(case.data, case.loose)
    except images.Rejected as e:
        return {"outcome": "rejected", "detail": reason_category(str(e)), "message": str(e)[:300]}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - what the contract forbids: count it, go on
        if show:
            traceback.print_exc()
        return escaped(e)
    problem = output_problem(prepared, case.loose)
    if problem:
        return {"outcome": "bad output", "detail": problem[0], "message": problem[1], "failure": True}
    return {"outcome": "passed through" if prepared.converted_from is None else "converted"}


def check_decode(case: Case, show: bool = False) -> dict[str, Any]:
    """Part (b): each of the loader's decode functions on the mutated JPEG."""
    import torch

    import jpegcrop
    from pipeline import transforms

    torch.manual_seed(case.torch_seed)
    crop = (transforms.CROP, transforms.CROP, 3)
    calls = [
        ("jpegcrop.size", jpegcrop.size, None),
        ("transforms.decode", transforms.decode, "whole"),
        ("train crop", transforms.train_transform("imagenet", flip=True), crop),
        ("eval centre crop", transforms.eval_transform("imagenet"), crop),
        ("eval 10-crop", transforms.eval_transform("imagenet", "ten"), (10, *crop)),
    ]
    size, refused = None, None
    for name, call, shape in calls:
        try:
            out = call(case.data)
        except ValueError as e:  # counted by libjpeg's reason, after the decoder's own prefix
            refused = refused or f"{name}: {category(str(e).split(': ', 1)[-1], 6)}"
            continue
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001
            if show:
                traceback.print_exc()
            return escaped(e, f"{name}: ")
        if shape is None:
            size = out
            if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, int) and v > 0 for v in out)):
                return {"outcome": "bad output", "detail": f"{name} returned {out!r}", "failure": True}
            continue
        if shape == "whole":
            shape = (size[1], size[0], 3) if size else None
        if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or tuple(out.shape) != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return {"outcome": "bad output", "detail": f"{name} returned {got}, not {shape}", "failure": True}
    return {"outcome": "refused (ValueError)", "detail": refused} if refused else {"outcome": "decoded"}


def limit_memory(gib: float) -> None:
    """Cap the address space at `gib` above what is mapped now (torch alone maps about 3 GiB of
    address space it never touches): an allocation past it fails instead of the machine paging."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return
    mapped = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
    limit = mapped + int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker(seed: int, memory_gib: float) -> None:
    """Read case indices from stdin; for each, write one JSON line per part, then a done line.
    The lines go to a copy of stdout: what C libraries print goes to stderr instead."""
    import torch

    import jpegcrop  # noqa: F401 - mapped before the limit is set
    from pipeline import transforms  # noqa: F401

    torch.set_num_threads(1)
    # Pillow warns about most corrupt files (and the code under test turns the warnings it
    # cares about into errors itself): a crash's report should show what the crash printed.
    warnings.simplefilter("ignore")
    available_recipes()
    conversion(False)
    limit_memory(memory_gib)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        index = int(line)
        case = make_case(seed, index)
        parts = [("convert", check_conversion)] + ([("decode", check_decode)] if case.recipe.jpeg else [])
        for part, check in parts:
            start = time.perf_counter()
            result = check(case)
            seconds = round(time.perf_counter() - start, 4)
            result.update(case=index, part=part, format=case.recipe.name, mutation=case.mutation, seconds=seconds)
            out.write(json.dumps(result) + "\n")
        out.write(json.dumps({"case": index, "done": True}) + "\n")


# --- the runner (parent process) ----------------------------------------------------------------


class Worker:
    """One worker process, one case in flight at a time, so a crash or a hang has its case."""

    STARTUP_S = 120.0  # imports (torch) on a loaded 2-core machine, on top of a case's timeout

    def __init__(self, seed: int, memory_gib: float) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fuzz", "--worker", "--seed", str(seed), "--memory-gib", str(memory_gib)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        self.buffer = b""
        self.case: int | None = None
        self.parts: list[str] = []
        self.answered = False  # any line yet: a worker that exits before any is broken, not fuzzed
        self.deadline = math.inf
        self.stderr_mark = 0

    def give_next(self, pending: Iterator[int], timeout_s: float) -> None:
        self.case, self.parts = next(pending, None), []
        if self.case is None:
            return
        self.deadline = time.monotonic() + timeout_s + (0 if self.answered else self.STARTUP_S)
        self.stderr_mark = os.fstat(self.stderr.fileno()).st_size  # what it prints from here is this case's
        self.process.stdin.write(f"{self.case}\n".encode())
        self.process.stdin.flush()

    def read(self, timeout_s: float) -> list[dict[str, Any]] | None:
        """The complete lines that have arrived; None when the worker has exited."""
        chunk = os.read(self.process.stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        if lines:
            self.answered = True
            self.deadline = time.monotonic() + timeout_s
        return [json.loads(line) for line in lines]

    def stderr_tail(self) -> str:
        """What the worker printed during its last case (read once it has ended: the file
        offset is shared with it)."""
        self.stderr.seek(self.stderr_mark)
        return self.stderr.read()[-600:].decode(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def finish(self) -> None:
        """End of input: the worker's loop ends; one still busy (an interrupted run) is killed."""
        if self.case is not None:
            self.stop()
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait()
        self.stderr.close()


@dataclass
class Report:
    seed: int
    cases: range
    seconds: float = 0.0
    # part -> format (recipe name) -> outcome -> count
    counts: dict[str, dict[str, Counter]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Counter)))
    failures: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        key = result["outcome"] + (f": {result['detail']}" if result.get("detail") else "")
        self.counts[result["part"]][result["format"]][key] += 1
        if result.get("failure"):
            self.failures.append({"seed": self.seed, **result})
        self.slowest = sorted([*self.slowest, result], key=lambda r: -r["seconds"])[:10]

    def failures_in(self, part: str) -> list[dict[str, Any]]:
        return [f for f in self.failures if f["part"] == part]

    def totals(self, part: str) -> Counter:
        return sum(self.counts[part].values(), Counter())


def run(
    seed: int,
    cases: int,
    start: int = 0,
    workers: int = 2,
    timeout_s: float = 60.0,
    memory_gib: float = 3.0,
    progress: Callable[[int, float, int], None] | None = None,
) -> Report:
    """Cases start..start+cases of `seed` in `workers` processes."""
    report = Report(seed, range(start, start + cases))
    pending = iter(report.cases)
    began, done = time.monotonic(), 0

    def lost(w: Worker, outcome: str, detail: str) -> None:
        """Record the case that ended its worker (crash) or outlived its timeout (hang)."""
        case = make_case(seed, w.case)
        part = "decode" if "convert" in w.parts else "convert"
        report.add(
            {
                "case": w.case,
                "part": part,
                "format": case.recipe.name,
                "mutation": case.mutation,
                "outcome": outcome,
                "detail": detail,
                "message": w.stderr_tail().strip()[-300:],
                "seconds": timeout_s if outcome == "hang" else 0.0,
                "failure": True,
            }
        )

    pool = [Worker(seed, memory_gib) for _ in range(min(workers, cases))]
    try:
        for w in pool:
            w.give_next(pending, timeout_s)
        while busy := [w for w in pool if w.case is not None]:
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready, _, _ = select.select([w.process.stdout for w in busy], [], [], wait)
            for w in busy:
                if w.process.stdout in ready:
                    lines = w.read(timeout_s)
                    if lines is not None:
                        for line in lines:
                            if line.get("done"):
                                w.case, done = None, done + 1
                            else:
                                w.parts.append(line["part"])
                                report.add(line)
                        if w.case is None:
                            w.give_next(pending, timeout_s)
                        continue
                    code = w.stop()
                    if not w.answered and code >= 0:  # an import error, not a finding
                        raise RuntimeError(f"a fuzz worker failed to start (exit {code}):\n{w.stderr_tail()}")
                    lost(w, "crash", f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}")
                elif time.monotonic() > w.deadline:
                    w.stop()
                    lost(w, "hang", f"no answer in {timeout_s:g} s")
                else:
                    continue
                # A fresh worker for the rest, in its place.
                done += 1
                fresh = Worker(seed, memory_gib)
                pool[pool.index(w)] = fresh
                fresh.give_next(pending, timeout_s)
            if progress:
                progress(done, time.monotonic() - began, len(report.failures))
    finally:
        for w in pool:
            w.finish()
    report.seconds = time.monotonic() - began
    return report


# --- reporting ----------------------------------------------------------------------------------


def failure_groups(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures grouped by part, outcome, exception (or signal, or problem) and format, each
    with its count and the first few cases."""
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for f in failures:
        key = (f["part"], f["outcome"], f["detail"], f["format"])
        group = groups.setdefault(
            key,
            {
                "part": f["part"],
                "outcome": f["outcome"],
                "detail": f["detail"],
                "format": f["format"],
                "count": 0,
                "message": f.get("message", ""),
                "where": f.get("where", ""),
                "cases": [],
            },
        )
        group["count"] += 1
        if len(group["cases"]) < 5:
            group["cases"].append({"seed": f["seed"], "case": f["case"], "mutation": f["mutation"]})
    return sorted(groups.values(), key=lambda g: (g["part"], g["outcome"], g["detail"], -g["count"]))


def describe(failures: list[dict[str, Any]]) -> str:
    """Failures as lines a person reads: what escaped, from which format, and how to replay one."""
    lines = [f"{len(failures)} case(s) broke the contract:"]
    for g in failure_groups(failures):
        first = g["cases"][0]
        where = f" at {g['where']}" if g["where"] else ""
        lines.append(f"- {g['part']}: {g['outcome']} {g['detail']}{where} ({g['format']}, {g['count']} case(s))")
        if g["message"]:
            lines.append(f"    {g['message'][:200]}")
        lines.append(f"    e.g. {first['mutation']}: {replay_command(first['seed'], first['case'])}")
    return "\n".join(lines)


def replay(seed: int, index: int, save_to: str | None, memory_gib: float) -> None:
    """One case in this process, with the workers' memory limit; tracebacks printed."""
    import torch

    import jpegcrop  # noqa: F401 - mapped before the limit is set
    from pipeline import transforms  # noqa: F401

    torch.set_num_threads(1)
    case = make_case(seed, index)
    print(f"case {index} of seed {seed}: {case.describe()}")
    if save_to:
        Path(save_to).write_bytes(case.data)
        print(f"wrote its bytes to {save_to}")
    limit_memory(memory_gib)
    print("convert:", check_conversion(case, show=True))
    if case.recipe.jpeg:
        print("decode:", check_decode(case, show=True))


def as_json(report: Report, workers: int) -> dict[str, Any]:
    import jpegcrop  # noqa: F401

    cases = len(report.cases)
    return {
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
        "pillow": PIL.__version__,
        "seed": report.seed,
        "cases": cases,
        "first_case": report.cases.start,
        "workers": workers,
        "seconds": round(report.seconds, 1),
        "cases_per_s": round(cases / report.seconds, 1),
        "totals": {part: dict(report.totals(part).most_common()) for part in sorted(report.counts)},
        "failures": len(report.failures),
        "failure_groups": failure_groups(report.failures),
        "by_format": {
            part: {fmt: dict(outcomes.most_common()) for fmt, outcomes in sorted(by_format.items())}
            for part, by_format in sorted(report.counts.items())
        },
        "slowest_cases": report.slowest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="the first case index")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take before it is a hang")
    parser.add_argument("--memory-gib", type=float, default=3.0, help="address space a worker may add")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz.json"))
    parser.add_argument("--replay", type=int, metavar="CASE", help="run this one case here, tracebacks shown")
    parser.add_argument("--save", metavar="FILE", help="with --replay: write the case's bytes here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.seed, args.memory_gib)
    if args.replay is not None:
        return replay(args.seed, args.replay, args.save, args.memory_gib)

    last = [0.0]

    def progress(done: int, seconds: float, failures: int) -> None:
        if seconds - last[0] >= 30:
            last[0] = seconds
            print(f"{done}/{args.cases} cases, {done / seconds:.1f}/s, {failures} failures", flush=True)

    report = run(args.seed, args.cases, args.start, args.workers, args.timeout, args.memory_gib, progress)
    result = as_json(report, args.workers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.cases} cases in {report.seconds:.0f} s ({result['cases_per_s']}/s), {args.workers} workers")
    for part, totals in result["totals"].items():
        print(f"{part}:")
        for outcome, n in totals.items():
            print(f"  {n:7d}  {outcome}")
    print(describe(report.failures) if report.failures else "no case broke the contract")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
