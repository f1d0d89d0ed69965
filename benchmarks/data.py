"""Data-path throughput, each figure against a baseline measured in the same run.

    python benchmarks/data.py [--images 1200] [--workers 2] [--repeats 3] [--out benchmarks/results/data.json]

On a generated set of ImageNet-sized JPEGs (500x375, about 110 KB, 10 classes):
- shard: the shard stage (`shard.workers` processes) vs a single-process `webdataset.ShardWriter`
  loop doing the same per-image check, and vs a plain copy loop that checks nothing;
- loader: our WebDataset loader with the paper's training transforms vs (a) a bare decode +
  random-crop loop over the files in the same number of processes (the decode limit), (b)
  torchvision `ImageFolder` + `DataLoader` with the same transforms (torchvision's resize, then
  crop) and workers, and (c) NVIDIA DALI's CPU pipeline on the same shards with the same
  operations (`pip install -e '.[bench]'`; skipped without it), without and with the colour step.

`--only loader` skips the shard comparison (the shards are then written once, untimed).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from pipeline import loader, params, shard, sources, transforms
from pipeline.images import Conversion, to_rgb_jpeg
from pipeline.manifest import read_manifest

try:  # the optional extra .[bench]: without it, (c) is skipped
    import nvidia.dali.math as dali_math
    from nvidia.dali import fn, pipeline_def, types
except ImportError:
    pipeline_def = None

REPO = Path(__file__).resolve().parent.parent
BATCH = 64


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with a photograph's size and entropy (about 110 KB at 500x375)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    image = np.stack([base[c] + 0.2 * x + 0.1 * y for c in range(3)], axis=-1)
    image += rng.normal(0, 30, size=(height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_tree(root: Path, images: int, classes: int = 10) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"img{i:06d}.jpg"
            path.write_bytes(photo_like(rng))
            if split == "train":
                files.append(path)
    return files


def timed(fn) -> float:
    os.sync()  # what the previous run wrote goes to disk now, not during this run
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- shard ------------------------------------------------------------------------------------


def shard_writer_loop(files: list[Path], out: Path, check: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    conversion = Conversion.of(params.load(REPO / "params.yaml").shard)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, path in enumerate(files):
            data = path.read_bytes()
            if check:
                data = to_rgb_jpeg(data, conversion).jpeg
            sink.write({"__key__": f"s{i:06d}", "jpg": data, "cls": b"0"})


def stage_params(root: Path, work: Path, workers: int) -> params.Params:
    return params.load(
        REPO / "params.yaml",
        [
            "data.source=imagefolder",
            f"data.root={root}",
            "data.val_per_class=1",  # no test/: val/ is test, and val 1 image a class of train/
            f"paths.shards={work / 'shards'}",
            "shard.maxcount=100",
            f"shard.workers={workers}",
        ],
    )


def bench_shard(root: Path, files: list[Path], workers: int, work: Path) -> dict:
    n = len(files)
    copy_s = timed(lambda: shard_writer_loop(files, work / "copy", check=False))
    single_before = timed(lambda: shard_writer_loop(files, work / "single", check=True))
    p = stage_params(root, work, workers)
    stage_s = timed(lambda: shard.shard(p))
    stage_n = sum(len(records) for records in sources.load(p.data).splits.values())  # every split
    # The baseline runs before and after the stage: the mean of the two cancels a drift of this
    # machine's speed over the minute the comparison takes.
    single_s = (single_before + timed(lambda: shard_writer_loop(files, work / "single-after", check=True))) / 2
    return {
        "images": n,
        "workers": workers,
        "stage_img_per_s": stage_n / stage_s,
        "single_process_shardwriter_same_check_img_per_s": n / single_s,
        "single_process_shardwriter_copy_only_img_per_s": n / copy_s,
        "ratio_vs_same_check": (stage_n / stage_s) / (n / single_s),
        "ratio_vs_copy_only": (stage_n / stage_s) / (n / copy_s),
    }


# --- loader -----------------------------------------------------------------------------------


def _decode_and_crop(paths: list[Path]) -> int:
    rng = np.random.default_rng(0)
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            left = int(rng.integers(0, image.width - 224 + 1))
            top = int(rng.integers(0, image.height - 224 + 1))
            image.crop((left, top, left + 224, top + 224)).tobytes()
    return len(paths)


def bare_decode_crop(files: list[Path], workers: int) -> float:
    """Timed from starting its processes to their end, as our loader is (its workers start with
    each epoch)."""
    chunks = [files[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        count = sum(pool.map(_decode_and_crop, chunks))
    return count / (time.perf_counter() - start)


def torchvision_imagefolder(root: Path, mean: list[float], workers: int) -> float:
    """The usual recipe: every step per image in the workers, float tensors between processes."""
    eigenvectors = torch.tensor(transforms.PCA_EIGENVECTORS)
    eigenvalues = torch.tensor(transforms.PCA_EIGENVALUES)

    def lighting(image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * transforms.PCA_STD
        return image + (eigenvectors @ (alpha * eigenvalues)).view(3, 1, 1)

    transform = v2.Compose(
        [
            v2.RandomShortestSize(list(range(256, 481))),
            v2.RandomCrop(224),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Lambda(lighting),
            v2.Normalize(mean, [1.0, 1.0, 1.0]),
        ]
    )
    dataset = ImageFolder(str(root / "train"), transform=transform)
    batches = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True)
    return images_per_s(batches, lambda x: x)


def ours(shards: Path, mean: list[float], workers: int, colour: bool = True) -> float:
    """Geometry per image in the workers (only the crop's region decoded), uint8 between processes,
    colour per batch (`colour`; without it, the uint8 batches as the workers make them)."""
    batches = loader.make_loader(
        str(shards),
        "train",
        transforms.train_transform("imagenet", flip=True),
        batch_size=BATCH,
        num_workers=workers,
        epoch=0,
        seed=0,
        train=True,
    )
    buffer = None

    def prepare(pixels: torch.Tensor) -> torch.Tensor:  # as pipeline.worker.run_epoch does
        nonlocal buffer
        buffer = transforms.prepare_batch(pixels, mean, lighting=True, out=buffer)
        return buffer

    return images_per_s(batches, prepare if colour else lambda x: x)


def images_per_s(batches, finish) -> float:
    """Every batch as the training step receives it (`finish`: what runs in the trainer)."""
    count = 0
    start = time.perf_counter()
    for x, _ in batches:
        count += len(finish(x))
    return count / (time.perf_counter() - start)


# --- (c) NVIDIA DALI --------------------------------------------------------------------------

OURS_PER_IMAGE = (
    "in each of the worker processes: tar member read, shuffle buffer of 1000, jpegcrop decode of the crop's "
    "region, torch antialiased bilinear resize to 224x224, flip, uint8 HWC batch to the main process in shared "
    "memory; with the colour step, per batch in the main process: prepare_batch (float in [0, 1], PCA lighting, "
    "mean subtracted, channels-last NCHW, into the previous batch's buffer)"
)
DALI_PER_IMAGE = (
    "in the pipeline's threads: readers.webdataset (index inferred at build, shuffle buffer of 1000), "
    "peek_image_shape, decoders.image_slice of the crop's square (ROI decode, libjpeg-turbo), resize to 224x224 "
    "(antialiased linear), flip; with the colour step, crop_mirror_normalize instead of the flip (float in [0, 1], "
    "PCA lighting, mean subtracted, HWC memory seen as NCHW); each batch a torch view (DLPack), labels from .cls"
)


def dali_train_pipeline(paths: list[str], mean: list[float], threads: int, colour: bool):
    """`transforms.train_transform("imagenet", flip=True)`, and with `colour` the colour step of
    `transforms.prepare_batch`, as a DALI pipeline on the CPU (`device_id=None`)."""
    low, high = transforms.TRAIN_SHORT_SIDE
    crop = transforms.CROP
    # prepare_batch adds (alpha * eigenvalues) @ eigenvectors.T to pixels in [0, 1], which is
    # eigenvectors @ diag(eigenvalues) @ alpha per image. crop_mirror_normalize subtracts a mean
    # from 0-255 pixels before dividing by std = 255, so each image's mean is
    # 255 * (manifest mean - lighting): one affine map of alpha, which fn.coord_transform does.
    to_mean = -255 * np.array(transforms.PCA_EIGENVECTORS) * np.array(transforms.PCA_EIGENVALUES)

    @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None, seed=0)
    def train():
        # No index_paths: the reader reads the tar headers at build, which the timing includes,
        # as our loader's includes reading them.
        jpegs, labels = fn.readers.webdataset(
            paths=paths, ext=["jpg", "cls"], random_shuffle=True, initial_fill=loader.SHUFFLE_BUFFER, name="reader"
        )
        # RandomScaleCrop's geometry: a random 224 crop of the image with its short side resized
        # to S is a square of side 224 * short / S of the source at a random place; decoding
        # only that square and resizing it once is what our loader does too.
        shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # (H, W, C), from the header
        height, width = shape[0], shape[1]
        short_side = fn.random.uniform(values=list(range(low, high + 1)), dtype=types.FLOAT)
        side = crop * dali_math.min(height, width) / short_side
        left = fn.random.uniform(range=[0, 1]) * (width - side)
        top = fn.random.uniform(range=[0, 1]) * (height - side)
        region = fn.decoders.image_slice(
            jpegs,
            fn.stack(left, top),  # the slice's axes are (W, H) by default
            fn.stack(side, side),
            normalized_anchor=False,
            normalized_shape=False,
            device="cpu",
        )
        images = fn.resize(region, size=[crop, crop], antialias=True)
        flip = fn.random.coin_flip()
        if not colour:
            return fn.flip(images, horizontal=flip), labels
        alpha = fn.random.normal(shape=[1, 3], stddev=transforms.PCA_STD)  # one point of 3 coordinates
        image_mean = fn.reshape(
            fn.coord_transform(alpha, M=to_mean.ravel().tolist(), T=[255 * m for m in mean]), shape=[3]
        )
        # HWC memory: prepare_batch writes channels-last NCHW, which is HWC memory per image, so
        # both hand the trainer the same layout.
        pixels = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="HWC", mirror=flip, mean=image_mean, std=[255.0] * 3
        )
        return pixels, labels

    return train()


def dali(shards: Path, mean: list[float], threads: int, colour: bool) -> float:
    """Timed from building the pipeline (it reads the tars' headers and starts its threads) to
    the epoch's last batch in the trainer's hands, as ours is from starting its workers."""
    paths = [url for url, _ in read_manifest(str(shards)).shard_list(str(shards), "train")]
    count = 0
    start = time.perf_counter()
    pipe = dali_train_pipeline(paths, mean, threads, colour)
    pipe.build()
    # The reader never ends an epoch (it wraps around): take the epoch's full batches, as our
    # train loader does.
    for _ in range(pipe.epoch_size("reader") // BATCH):
        pixels, labels = pipe.run()
        images = torch.from_dlpack(pixels.as_tensor())  # DALI's memory, not a copy
        if colour:
            images = images.permute(0, 3, 1, 2)  # NCHW, channels-last: what prepare_batch returns
        torch.tensor([int(labels.at(i).tobytes()) for i in range(len(labels))])  # .cls: the label as text
        count += len(images)
    elapsed = time.perf_counter() - start
    del pipe  # its threads end here, not during the next timed run
    return count / elapsed


def read_into_page_cache(paths: list[Path]) -> None:
    """This machine pages out file data left untouched for about a minute (DAMON reclaim), so
    the shards written by the first shard run are on disk again by the first loader run, while
    (a)'s files, read by every shard run, are in memory. Both sides read from memory: the goal
    is about decoding, not about the disk."""
    for path in paths:
        path.read_bytes()


def bench_loader(root: Path, files: list[Path], shards: Path, workers: int) -> dict:
    mean = read_manifest(str(shards)).mean
    # The shard runs before leave a gigabyte of files to write back, which this machine does
    # 30 s later, in the middle of the first comparison here.
    os.sync()
    read_into_page_cache([*files, *sorted(shards.rglob("*.tar"))])
    torch.manual_seed(0)
    # (a) runs before and after ours, and counts as the mean of the two (as in bench_shard).
    a_before = bare_decode_crop(files, workers)
    ours_ = ours(shards, mean, workers)
    a = (a_before + bare_decode_crop(files, workers)) / 2
    b = torchvision_imagefolder(root, mean, workers)
    # The same per-image work without inter-process traffic: one process each.
    a_one, ours_one = bare_decode_crop(files, 1), ours(shards, mean, 0)
    # (c) as (a), before and after a run of ours of its own, without and with the colour step;
    # DALI's threads are as many as our workers.
    c: dict | str = "skipped: install .[bench]"
    if pipeline_def is not None:
        c = {}
        for step, colour in (("no_colour_step", False), ("colour_step", True)):
            c_before = dali(shards, mean, workers, colour)
            ours_c = ours(shards, mean, workers, colour)
            dali_c = (c_before + dali(shards, mean, workers, colour)) / 2
            c[step] = {"ours_img_per_s": ours_c, "dali_img_per_s": dali_c, "ratio_vs_c": ours_c / dali_c}
    return {
        "images": len(files),
        "workers": workers,
        "batch_size": BATCH,
        "ours_img_per_s": ours_,
        "a_bare_decode_crop_img_per_s": a,
        "b_torchvision_imagefolder_img_per_s": b,
        "ratio_vs_a": ours_ / a,
        "ratio_vs_b": ours_ / b,
        "one_process_ours_img_per_s": ours_one,
        "one_process_a_img_per_s": a_one,
        "one_process_ratio_vs_a": ours_one / a_one,
        "c_dali": c,
    }


def median_run(runs: list[dict], ratio: str) -> dict:
    """The run with the median `ratio`: the figures of one real run, not a mix of several."""
    return sorted(runs, key=lambda run: run[ratio])[len(runs) // 2]


def dali_medians(loader_runs: list[dict]) -> dict | str:
    """Per step (with and without colour), the figures of the run with the median ratio."""
    if isinstance(loader_runs[0]["c_dali"], str):
        return loader_runs[0]["c_dali"]
    medians = {}
    for step in ("no_colour_step", "colour_step"):
        figures = sorted((run["c_dali"][step] for run in loader_runs), key=lambda f: f["ratio_vs_c"])
        medians[step] = figures[len(figures) // 2]
    return {"ours_per_image": OURS_PER_IMAGE, "dali_per_image": DALI_PER_IMAGE, **medians}


def print_shard(s: dict, shard_runs: list[dict]) -> None:
    spread = ", ".join(f"{run['ratio_vs_same_check']:.2f}x" for run in shard_runs)
    print(f"shard stage, {s['workers']} workers:          {s['stage_img_per_s']:8.0f} img/s")
    same_check = s["single_process_shardwriter_same_check_img_per_s"]
    print(
        f"  single-process ShardWriter, same check: {same_check:8.0f} img/s  -> {s['ratio_vs_same_check']:.2f}x ({spread})"
    )
    copy_only = s["single_process_shardwriter_copy_only_img_per_s"]
    print(f"  single-process ShardWriter, copy only:  {copy_only:8.0f} img/s  -> {s['ratio_vs_copy_only']:.2f}x")


def print_loader(lo: dict, c: dict | str, loader_runs: list[dict]) -> None:
    print(f"loader, train transforms, {lo['workers']} workers:  {lo['ours_img_per_s']:8.0f} img/s")
    spread_a = ", ".join(f"{run['ratio_vs_a']:.2f}x" for run in loader_runs)
    spread_b = ", ".join(f"{run['ratio_vs_b']:.2f}x" for run in loader_runs)
    a, b = lo["a_bare_decode_crop_img_per_s"], lo["b_torchvision_imagefolder_img_per_s"]
    print(
        f"  (a) bare decode + crop, {lo['workers']} processes: {a:8.0f} img/s  -> {lo['ratio_vs_a']:.2f}x ({spread_a})"
    )
    one = ", ".join(f"{run['one_process_ratio_vs_a']:.2f}x" for run in loader_runs)
    print(f"  in one process (no workers), vs (a) in one process: {lo['one_process_ratio_vs_a']:.2f}x ({one})")
    print(f"  (b) torchvision ImageFolder + DataLoader: {b:8.0f} img/s  -> {lo['ratio_vs_b']:.2f}x ({spread_b})")
    if isinstance(c, str):
        print(f"  (c) {c}")
        return
    print(f"  (c) NVIDIA DALI CPU pipeline, {lo['workers']} threads, same shards and operations:")
    for step, name in (("no_colour_step", "no colour step"), ("colour_step", "colour step included")):
        f = c[step]
        spread = ", ".join(f"{run['c_dali'][step]['ratio_vs_c']:.2f}x" for run in loader_runs)
        print(
            f"      {name:21s} ours {f['ours_img_per_s']:6.0f} img/s, DALI {f['dali_img_per_s']:6.0f} img/s"
            f"  -> {f['ratio_vs_c']:.2f}x ({spread})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each comparison; the median is reported")
    parser.add_argument(
        "--only", choices=["shard", "loader"], help="one comparison; for loader, the shards are written once, untimed"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' workers are the parallelism, as in training

    shard_runs, loader_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp, "raw"), Path(tmp, "work")
        files = make_tree(root, args.images)
        mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        print(f"{len(files)} train JPEGs of 500x375, {mean_kb:.0f} KB on average")
        if args.only != "loader":
            shard_runs = [bench_shard(root, files, args.workers, work / f"run{i}") for i in range(args.repeats)]
        else:
            shard.shard(stage_params(root, work / "run0", args.workers))
        if args.only != "shard":
            shards = work / "run0" / "shards"
            loader_runs = [bench_loader(root, files, shards, args.workers) for _ in range(args.repeats)]

    result = {
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
        "mean_jpeg_kb": mean_kb,
        "repeats": args.repeats,
    }
    if shard_runs:
        result["shard"] = median_run(shard_runs, "ratio_vs_same_check")
    if loader_runs:
        result["loader"] = median_run(loader_runs, "ratio_vs_a")
        result["c_dali"] = dali_medians(loader_runs)
    result |= {"shard_runs": shard_runs, "loader_runs": loader_runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median of {args.repeats} runs (ratios of every run in brackets)")
    if shard_runs:
        print_shard(result["shard"], shard_runs)
    if loader_runs:
        print_loader(result["loader"], result["c_dali"], loader_runs)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
