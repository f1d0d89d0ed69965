"""Per-image costs of the loader's steps, each against the step it replaces, in one process.

    python -m benchmarks.decode [--images 200] [--out benchmarks/results/decode.json]

On the same generated 500x375 JPEGs as benchmarks/data.py (one thread, milliseconds per image):
- reading the samples from a shard (in the page cache): WebDataset's `tarfile_to_samples`
  (tarfile's stream mode) vs the loader's reader (`tar_samples`, one read per member);
- decode: PIL's decode of the whole image vs `jpegcrop`'s decode of a training crop's region
  (the paper's scale augmentation: a random short side in [256, 480], a 224 crop);
- resize of that region to 224x224: PIL's bilinear vs torch's antialiased bilinear on uint8;
- stacking a batch of 64 resized crops: torch's result in channel planes (what a (1, 3, H, W)
  view with a batch stride of 3 gets) vs in HWC rows (what `transforms.decode_resized` asks for);
- collating that batch in a DataLoader worker: into a fresh shared-memory segment (DataLoader's
  default) vs into a reused one (`BatchBuffers`);
- the colour step of a batch of 64 (`transforms.prepare_batch`): into a fresh float batch vs
  into the previous batch's buffer.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

import jpegcrop
from benchmarks.data import BATCH, photo_like
from pipeline import transforms
from pipeline.tars import tar_samples

REPO = Path(__file__).resolve().parent.parent
MEAN = (0.48, 0.45, 0.40)


def ms_per_call(fn, calls: int) -> float:
    fn()  # warm-up: allocator, caches
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def ms_per_sample_read(jpegs: list[bytes]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        shard = str(Path(tmp, "shard.tar"))
        with wds.TarWriter(shard, user="", group="", mtime=0, encoder=False) as tar:  # as pipeline.shard writes
            for i, jpeg in enumerate(jpegs):
                tar.write({"__key__": f"s{i:06d}", "jpg": jpeg, "cls": b"0"})

        def read(stage):
            return lambda: sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([shard]), stage))

        return {
            "webdataset_tarfile_to_samples": ms_per_call(read(wds.tarfile_to_samples()), 10) / len(jpegs),
            "one_read_per_member": ms_per_call(read(tar_samples), 10) / len(jpegs),
        }


def crop_regions(count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(left, top, side) of training crops of a 500x375 image, in the image's pixels."""
    regions = []
    for _ in range(count):
        side = round(224 * 375 / rng.integers(256, 481))
        regions.append((int(rng.integers(0, 500 - side + 1)), int(rng.integers(0, 375 - side + 1)), side))
    return regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpegs = [photo_like(rng) for _ in range(args.images)]
    regions = crop_regions(args.images, rng)
    work = list(zip(jpegs, regions))

    def each(step):
        return lambda: [step(jpeg, region) for jpeg, region in work]

    def pil_full(jpeg, region):
        return Image.open(io.BytesIO(jpeg)).load()

    def cropped(jpeg, region):
        left, top, side = region
        return jpegcrop.decode(jpeg, left, top, side, side, 1)

    decoded = [Image.frombytes("RGB", (side, side), bytes(cropped(j, (l, t, side)))) for j, (l, t, side) in work]
    tensors = [torch.from_numpy(np.array(image)) for image in decoded]

    def pil_resize():
        return [image.resize((224, 224), Image.Resampling.BILINEAR) for image in decoded[:BATCH]]

    def torch_resize(nchw):
        return [
            torch.nn.functional.interpolate(nchw(t), size=(224, 224), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
            for t in tensors[:BATCH]
        ]

    planar = torch_resize(lambda t: t.permute(2, 0, 1)[None])
    rows = torch_resize(lambda t: t[None].permute(0, 3, 1, 2))
    batch_bytes = BATCH * 224 * 224 * 3
    reused = torch.empty(BATCH, 224, 224, 3, dtype=torch.uint8).share_memory_()

    def into_fresh_segment():
        segment = torch.UntypedStorage(batch_bytes).share_memory_()
        return torch.stack(rows, out=torch.empty(0, dtype=torch.uint8).set_(segment).view(BATCH, 224, 224, 3))

    pixels = torch.randint(0, 256, (BATCH, 224, 224, 3), dtype=torch.uint8)
    buffer = transforms.prepare_batch(pixels, MEAN, lighting=True)
    per_image = 1 / args.images
    result = {
        "images": args.images,
        "tar_read_ms": ms_per_sample_read(jpegs),
        "decode_ms": {
            "pil_whole_image": ms_per_call(each(pil_full), 3) * per_image,
            "jpegcrop_crop_region": ms_per_call(each(cropped), 3) * per_image,
        },
        "resize_ms": {
            "pil_bilinear": ms_per_call(pil_resize, 3) / BATCH,
            "torch_antialiased_bilinear_uint8": ms_per_call(lambda: torch_resize(lambda t: t[None].permute(0, 3, 1, 2)), 3)
            / BATCH,
        },
        "stack_ms": {
            "channel_planes": ms_per_call(lambda: torch.stack(planar), 10) / BATCH,
            "hwc_rows": ms_per_call(lambda: torch.stack(rows), 10) / BATCH,
        },
        "worker_collate_ms": {
            "fresh_shared_segment": ms_per_call(into_fresh_segment, 10) / BATCH,
            "reused_shared_buffer": ms_per_call(lambda: torch.stack(rows, out=reused), 10) / BATCH,
        },
        "colour_step_ms": {
            "fresh_batch": ms_per_call(lambda: transforms.prepare_batch(pixels, MEAN, True), 10) / BATCH,
            "reused_buffer": ms_per_call(lambda: transforms.prepare_batch(pixels, MEAN, True, out=buffer), 10) / BATCH,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for step, figures in result.items():
        if isinstance(figures, dict):
            (base, base_ms), (ours, ours_ms) = figures.items()
            print(f"{step:17s} {base}: {base_ms:.2f} ms/img   {ours}: {ours_ms:.2f} ms/img   {base_ms / ours_ms:.1f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
