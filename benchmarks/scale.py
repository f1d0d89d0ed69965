"""How each stage's cost grows with its work, toward ImageNet: one command, a JSON and a plot.

    python -m benchmarks.scale [--quick] [--out benchmarks/results/scale.json]

Each stage at three sizes of its work; per unit of work, the figure at the largest size over the
one at the smallest is its growth ratio (1.0: flat; the goal is at most 1.3):
- shard and verify: ImageNet-shaped trees (train/<wnid>/*.JPEG, a flat val/ labelled by Kaggle's
  LOC_val_solution.csv) of 10^3, 10^4 and 10^5 images, each stage a process as `dvc repro` runs
  it: wall time, CPU time per image (its worker processes included), peak PSS of the process
  tree, and the fitted exponent of time against images. The images are small (sides of 64 to 192)
  so that 10^5 fit this disk and minutes: the growth is what is measured here;
- calibration, at ImageNet's own image size (sides of 300 to 500, JPEGs near ILSVRC-2012's mean
  size): the shard stage's CPU time per image, and the shards' bytes against the raw files';
- loader: the calibration's images in 10, 100 and 1,000 shards, the paper's ImageNet training
  transform: time to the first batch, steady images/s, CPU time per image;
- sweep: 2, 8 and 32 one-epoch trials on the digits, a local Ray cluster, as `pipeline.tune`
  runs them: the driver's wall time per trial, each trial's overhead (its wall time less its
  epochs), the driver's peak PSS;
- registry: 10, 100 and 1,000 runs (each with a registered version) in one MLflow experiment
  (SQLite): `find_run` by name, the register stage's champion decision, a run's metric history
  (what the sweep's records read per trial).

The images are a mix like ILSVRC-2012's, with more of its odd ones: baseline RGB JPEGs, and
0.5% each of CMYK JPEGs, PNGs named .JPEG and greyscale JPEGs, all of which the shard stage
re-encodes. BENCHMARKS.md projects ILSVRC-2012 from these figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import psutil
from mlflow.entities import Metric
from PIL import Image

from benchmarks.data import photo_like
from pipeline import loader, params, register, shard, tracking, transforms
from pipeline.files import disk_bytes
from pipeline.records import METRIC
from pipeline.register import VAL_ERROR_TAG, VAL_LOSS_TAG

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.3  # the largest size's figure per unit of work over the smallest's, at most
CLASSES = 100
ODD_KINDS = ("CMYK", "PNG", "L")  # 0.5% each of the images
POOL = 64  # distinct pictures per kind: writing a file is cheap, drawing one is not
BATCH = 64

QUICK = {"images": [300, 1_000, 3_000], "calibration": 300, "trials": [2, 4, 8], "runs": [10, 30, 100]}
FULL = {"images": [1_000, 10_000, 100_000], "calibration": 2_240, "trials": [2, 8, 32], "runs": [10, 100, 1_000]}
DEPTHS = [8, 14, 20, 26, 32, 38, 44, 50]  # CIFAR-style ResNets, 6n+2: four shortcut types each


def cpu_seconds() -> float:
    """User and system CPU time of this process and of every child process it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class PeakMemory:
    """The peak of a process's memory, its descendants' included or not, sampled every 0.2 s. The
    memory is PSS: each page counted once however many processes share it (forked workers share
    their parent's libraries), so a tree's sum is what it takes from the machine."""

    def __init__(self, pid: int, tree: bool) -> None:
        self.process, self.tree, self.peak = psutil.Process(pid), tree, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                processes = [self.process] + (self.process.children(recursive=True) if self.tree else [])
                total = 0
                for p in processes:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:  # ended between the listing and the reading
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def run_stage(args: list[str], tree: bool = True, cwd: Path = REPO) -> dict:
    """One `python -m pipeline.<stage>` as DVC runs it: wall s, CPU s (children waited for
    included), peak PSS in MiB (of the process tree, or of the process alone)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    memory = PeakMemory(process.pid, tree)
    output, _ = process.communicate()
    peak = memory.stop()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({process.returncode}):\n{output[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu, "peak_pss_mib": peak / 2**20}


def exponent(sizes: list[float], times: list[float]) -> float:
    """The least-squares slope of log(time) against log(size): 1.0 is linear."""
    xs, ys = np.log(sizes), np.log(times)
    return float(np.polyfit(xs, ys, 1)[0])


def growth(per_unit: list[float]) -> dict:
    ratio = per_unit[-1] / per_unit[0]
    return {"ratio": round(ratio, 3), "met": ratio <= GOAL}


# --- shard and verify ----------------------------------------------------------------------------


def picture_bytes(rng: np.random.Generator, kind: str, width: int, height: int) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(photo_like(rng, width, height))))
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if kind == "PNG":
        image.save(buffer, format="PNG")
    else:
        image.convert(kind).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def picture_pool(seed: int, sides: tuple[int, int]) -> dict[str, list[bytes]]:
    rng = np.random.default_rng(seed)
    low, high = sides
    return {
        kind: [
            picture_bytes(rng, kind, int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1)))
            for _ in range(POOL)
        ]
        for kind in ("RGB", *ODD_KINDS)
    }


def kind_of(i: int) -> str:
    """Of every 200 images, one each of CMYK, PNG and greyscale (0.5% each), the rest RGB."""
    return {0: "CMYK", 1: "PNG", 2: "L"}.get(i % 200, "RGB")


def imagenet_like_tree(root: Path, images: int, pool: dict[str, list[bytes]], classes: int = CLASSES) -> int:
    """train/<wnid>/*.JPEG (90% of the images) and a flat val/ (10%) with its labels file; returns
    the raw files' bytes."""
    wnids = [f"n{i:08d}" for i in range(classes)]
    raw = 0
    train = images - images // 10
    for i in range(images):
        data = pool[kind_of(i)][(i // 200) % POOL]
        wnid = wnids[i % classes]
        if i < train:
            path = root / "train" / wnid / f"{wnid}_{i}.JPEG"
        else:
            path = root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        raw += len(data)
    lines = ["ImageId,PredictionString"]
    lines += [f"ILSVRC2012_val_{i:08d},{wnids[i % classes]} 1 2 3 4" for i in range(train, images)]
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return raw


def shard_overrides(root: Path, shards: Path, maxcount: int) -> list[str]:
    return [
        "data.source=imagenet", f"data.root={root}", "data.val_per_class=1",
        f"paths.shards={shards}", f"shard.maxcount={maxcount}", "shard.workers=2",
    ]  # fmt: skip


def stage_args(stage: str, overrides: list[str]) -> list[str]:
    return [
        f"pipeline.{stage}",
        "--params",
        str(REPO / "params.yaml"),
        *(arg for o in overrides for arg in ("--set", o)),
    ]


def bench_shard_verify(sizes: list[int], work: Path) -> dict:
    pool = picture_pool(0, (64, 192))
    rows = []
    for images in sizes:
        root, shards = work / f"raw-{images}", work / f"shards-{images}"
        raw = imagenet_like_tree(root, images, pool)
        os.sync()
        sharded = run_stage(stage_args("shard", shard_overrides(root, shards, 1000)))
        verified = run_stage(
            stage_args("verify", [*shard_overrides(root, shards, 1000), f"paths.metrics={work}/metrics"])
        )
        num_shards = sum(1 for _ in shards.glob("*/*.tar"))
        rows.append({
            "images": images, "shards": num_shards, "raw_bytes": raw, "shard_bytes": disk_bytes(shards),
            "shard": sharded, "verify": verified,
            "shard_ms_per_image": 1e3 * sharded["wall_s"] / images, "shard_cpu_ms_per_image": 1e3 * sharded["cpu_s"] / images,
            "verify_ms_per_image": 1e3 * verified["wall_s"] / images, "verify_ms_per_shard": 1e3 * verified["wall_s"] / num_shards,
        })  # fmt: skip
        print(
            f"shard {images:>7} images: {sharded['wall_s']:6.1f} s, {rows[-1]['shard_ms_per_image']:.3f} ms/image, "
            f"peak {sharded['peak_pss_mib']:.0f} MiB; verify {verified['wall_s']:6.1f} s, peak {verified['peak_pss_mib']:.0f} MiB",
            flush=True,
        )
        for folder in (root, shards):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    first, last = rows[0], rows[-1]
    marginal = lambda stage: (last[stage]["wall_s"] - rows[-2][stage]["wall_s"]) / (last["images"] - rows[-2]["images"])
    return {
        "sizes": rows,
        "shard_exponent": round(exponent(sizes, [r["shard"]["wall_s"] for r in rows]), 3),
        "shard_exponent_two_largest": round(exponent(sizes[-2:], [r["shard"]["wall_s"] for r in rows[-2:]]), 3),
        "verify_exponent": round(exponent(sizes, [r["verify"]["wall_s"] for r in rows]), 3),
        "shard_marginal_ms_per_image": 1e3 * marginal("shard"),
        "verify_marginal_ms_per_image": 1e3 * marginal("verify"),
        "shard_pss_mib_per_1e5_images": (last["shard"]["peak_pss_mib"] - first["shard"]["peak_pss_mib"]) / (last["images"] - first["images"]) * 1e5,
        "verify_pss_mib_per_1e5_images": (last["verify"]["peak_pss_mib"] - first["verify"]["peak_pss_mib"]) / (last["images"] - first["images"]) * 1e5,
        "growth": {
            "shard_time_per_image": growth([r["shard_ms_per_image"] for r in rows]),
            "shard_cpu_per_image": growth([r["shard_cpu_ms_per_image"] for r in rows]),
            "shard_peak_pss": growth([r["shard"]["peak_pss_mib"] for r in rows]) | {"note": "absolute, not per image"},
            "verify_time_per_image": growth([r["verify_ms_per_image"] for r in rows]),
            "verify_peak_pss": growth([r["verify"]["peak_pss_mib"] for r in rows]) | {"note": "absolute, not per image"},
        },
    }  # fmt: skip


# --- calibration at ImageNet's image size, and the loader ---------------------------------------


def bench_calibration(images: int, work: Path) -> tuple[dict, Path, list[float]]:
    """The shard stage on ImageNet-size pictures, at `images` and a quarter of it: the CPU time per
    image between the two is the slope the ImageNet projection multiplies, start-up left out."""
    pool = picture_pool(1, (300, 500))
    quarter = images // 4
    small_root, root = work / "raw-imagenet-size-quarter", work / "raw-imagenet-size"
    imagenet_like_tree(small_root, quarter, pool, classes=10)
    raw = imagenet_like_tree(root, images, pool, classes=10)
    os.sync()
    small = run_stage(stage_args("shard", shard_overrides(small_root, work / "shards-imagenet-size-quarter", 1000)))
    shards = work / "shards-imagenet-size"
    sharded = run_stage(stage_args("shard", shard_overrides(root, shards, 1000)))
    mean = json.loads((shards / "manifest.json").read_text())["mean"]
    row = {
        "images": images, "raw_bytes": raw, "shard_bytes": disk_bytes(shards), "shard": sharded,
        "quarter": {"images": quarter, "shard": small},
        "raw_kb_per_image": raw / images / 1e3,
        "shard_cpu_ms_per_image": 1e3 * sharded["cpu_s"] / images, "shard_wall_ms_per_image": 1e3 * sharded["wall_s"] / images,
        "shard_cpu_ms_per_image_slope": 1e3 * (sharded["cpu_s"] - small["cpu_s"]) / (images - quarter),
        "shards_over_raw": disk_bytes(shards) / disk_bytes(root),
    }  # fmt: skip
    print(
        f"calibration: {images} ImageNet-size images, {row['shard_cpu_ms_per_image']:.2f} CPU ms/image to shard "
        f"({row['shard_cpu_ms_per_image_slope']:.2f} between {quarter} and {images})",
        flush=True,
    )
    return row, root, mean


def one_loader_pass(shards: Path, mean: list[float], workers: int) -> dict:
    """An epoch of the train split as a training worker takes it (the colour step included):
    seconds to the first batch, then the steady rate over the rest."""
    cpu, start = cpu_seconds(), time.perf_counter()
    batches = loader.make_loader(
        str(shards), "train", transforms.train_transform("imagenet", flip=True),
        batch_size=BATCH, num_workers=workers, epoch=0, seed=0, train=True,
    )  # fmt: skip
    buffer, count, first_s = None, 0, None
    for pixels, _ in batches:
        buffer = transforms.prepare_batch(pixels, mean, lighting=True, out=buffer)
        if first_s is None:
            first_s, steady_from = time.perf_counter() - start, time.perf_counter()
        else:
            count += len(pixels)
    del batches  # the workers end and are waited for: their CPU time is counted
    steady_s = time.perf_counter() - steady_from
    return {
        "first_batch_s": first_s,
        "images_per_s": count / steady_s,
        "cpu_ms_per_image": 1e3 * (cpu_seconds() - cpu) / (count + BATCH),
    }


def bench_loader(root: Path, images: int, mean: list[float], work: Path, workers: int = 2) -> dict:
    rows = []
    for num_shards in (10, 100, 1000):
        train = images - images // 10 - 10  # val/ and one image a class held out
        per_shard = max(1, train // num_shards)
        p = params.load(REPO / "params.yaml", shard_overrides(root, work / f"loader-{num_shards}", per_shard))
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # the stage's progress bar
            shard.shard(p)
        shards = Path(p.paths.shards)
        one_loader_pass(shards, mean, workers)  # the page cache warm, as in any epoch after the first
        passes = [one_loader_pass(shards, mean, workers) for _ in range(2)]
        row = {
            "shards": sum(1 for _ in shards.glob("train/*.tar")),
            "first_batch_s": statistics.median(x["first_batch_s"] for x in passes),
            "images_per_s": statistics.median(x["images_per_s"] for x in passes),
            "cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in passes),
        }
        rows.append(row)
        print(
            f"loader {row['shards']:>5} shards: first batch {row['first_batch_s']:.2f} s, {row['images_per_s']:.0f} img/s",
            flush=True,
        )
    return {
        "workers": workers,
        "batch": BATCH,
        "sizes": rows,
        "growth": {
            "first_batch_s": growth([r["first_batch_s"] for r in rows]),
            "time_per_image": growth([1 / r["images_per_s"] for r in rows]),
            "cpu_per_image": growth([r["cpu_ms_per_image"] for r in rows]),
        },
    }


# --- the sweep ----------------------------------------------------------------------------------


def grid(trials: int) -> tuple[list[int], list[str]]:
    """`trials` trials as depths x shortcuts: up to the four shortcut types, then more depths."""
    shortcuts = ["none", "A", "B", "C"][: min(4, trials)]
    return DEPTHS[: max(1, trials // len(shortcuts))], shortcuts


def bench_sweep(sizes: list[int], work: Path) -> dict:
    digits = work / "digits-shards"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        shard.shard(params.load(REPO / "params.yaml", [f"paths.shards={digits}"]))
    rows = []
    for trials in sizes:
        depths, shortcuts = grid(trials)
        here = work / f"sweep-{trials}"
        overrides = [
            f"paths.shards={digits}", f"paths.ray_storage={here}/ray", f"paths.reports={here}/reports",
            f"paths.metrics={here}/metrics", f"mlflow.tracking_uri=sqlite:///{here}/mlflow.db",
            "train.epochs=1", f"tune.depths={json.dumps(depths)}", f"tune.shortcuts={json.dumps(shortcuts)}",
        ]  # fmt: skip
        driver = run_stage(stage_args("tune", overrides), tree=False)
        records = json.loads((here / "reports" / "sweep.json").read_text())["trials"]
        finished = [r for r in records if r.get("overhead_s") is not None]
        rows.append({
            "trials": trials, "finished": len(finished), "depths": depths, "shortcuts": shortcuts,
            "driver_wall_s": driver["wall_s"], "driver_peak_pss_mib": driver["peak_pss_mib"],
            "wall_s_per_trial": driver["wall_s"] / trials,
            "median_overhead_s": statistics.median(r["overhead_s"] for r in finished),
            "median_trial_wall_s": statistics.median(r["wall_time_s"] for r in finished),
        })  # fmt: skip
        print(
            f"sweep {trials:>3} trials: {driver['wall_s']:6.1f} s, {rows[-1]['wall_s_per_trial']:.1f} s/trial, "
            f"overhead {rows[-1]['median_overhead_s']:.1f} s/trial, driver peak {driver['peak_pss_mib']:.0f} MiB",
            flush=True,
        )
        subprocess.run(["rm", "-rf", str(here)], check=True)
    return {
        "sizes": rows,
        "growth": {
            "wall_per_trial": growth([r["wall_s_per_trial"] for r in rows]),
            "overhead_per_trial": growth([r["median_overhead_s"] for r in rows]),
            "driver_peak_pss": growth([r["driver_peak_pss_mib"] for r in rows]) | {"note": "absolute, not per trial"},
        },
    }


# --- the registry -------------------------------------------------------------------------------

MODEL, ALIAS = "scale-benchmark", "champion"


def add_runs(store: tracking.Store, experiment: str, start: int, stop: int, rng: random.Random) -> None:
    """Runs as the sweep leaves them (a name tag, 10 epochs of val error), each registered."""
    for i in range(start, stop):
        name = f"sweep-x-cifar_resnet{i}-B"
        run = store.create_run(experiment, run_name=name, tags={tracking.RUN_NAME_TAG: name})
        errors = [rng.uniform(0.01, 0.5) for _ in range(10)]
        now = int(time.time() * 1000)
        store.log_batch(run.info.run_id, metrics=[Metric(METRIC, e, now, step) for step, e in enumerate(errors)])
        store.set_terminated(run.info.run_id)
        tags = {VAL_ERROR_TAG: str(min(errors)), VAL_LOSS_TAG: str(rng.uniform(0.1, 1))}
        version = store.create_model_version(
            MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
        )
        if i == 0:
            store.set_registered_model_alias(MODEL, ALIAS, version.version)


def median_s(fn: Callable[[], object], repeats: int = 25) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lookups(uri: str, experiment: str, runs: int, seed: int) -> dict[str, float]:
    """Median ms of each read, over runs picked at random, by a store opened on the store as it
    is, as a stage's process opens it (`tracking.new_client` takes SQLite's statistics then)."""
    store, rng = tracking.Store(uri, budget_s=60, say=lambda line: None), random.Random(seed)
    names = [f"sweep-x-cifar_resnet{rng.randrange(runs)}-B" for _ in range(25)]
    run_ids = [tracking.find_run(store, experiment, name) for name in names]
    assert all(run_ids)

    def champion_decision() -> None:  # register.settle_alias's reads, the newest version against the alias
        new = register.version_rank(store.get_model_version(MODEL, str(runs)).tags)
        register.decide(new, register.champion_rank(store, MODEL, ALIAS))

    return {
        "find_run_ms": 1e3 * median_s(lambda: tracking.find_run(store, experiment, rng.choice(names))),
        "find_missing_run_ms": 1e3 * median_s(lambda: tracking.find_run(store, experiment, "no such run")),
        "champion_decision_ms": 1e3 * median_s(champion_decision),
        "metric_history_ms": 1e3 * median_s(lambda: store.get_metric_history(rng.choice(run_ids), METRIC)),
    }


def bench_registry(sizes: list[int], work: Path) -> dict:
    uri = f"sqlite:///{work}/registry.db"
    store = tracking.Store(uri, budget_s=60, say=lambda line: None)
    experiment = tracking.experiment_id(store, "scale")
    store.create_registered_model(MODEL)
    rng, rows, have = random.Random(0), [], 0
    for runs in sizes:
        add_runs(store, experiment, have, runs, rng)
        have = runs
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as stage:
            rows.append({"runs": runs, **stage.submit(lookups, uri, experiment, runs, runs).result()})
        r = rows[-1]
        print(
            f"registry {runs:>5} runs: find_run {r['find_run_ms']:.1f} ms, champion {r['champion_decision_ms']:.1f} ms, "
            f"history {r['metric_history_ms']:.1f} ms",
            flush=True,
        )
    keys = [key for key in rows[0] if key != "runs"]
    return {
        "sizes": rows,
        "growth": {key: growth([r[key] for r in rows]) for key in keys},
        "slope_us_per_run": {key: 1e3 * (rows[-1][key] - rows[0][key]) / (sizes[-1] - sizes[0]) for key in keys},
    }


# --- the picture --------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    """Log-log: each stage's seconds per unit of its work against the amount of work; a flat line
    is a cost that does not grow."""
    sv, lo, sw, rg = (results[k]["sizes"] for k in ("shard_verify", "loader", "sweep", "registry"))
    lines = [
        ("shard, s per image (x images)", [r["images"] for r in sv], [r["shard"]["wall_s"] / r["images"] for r in sv]),
        (
            "verify, s per image (x images)",
            [r["images"] for r in sv],
            [r["verify"]["wall_s"] / r["images"] for r in sv],
        ),
        ("loader, s to the first batch (x shards)", [r["shards"] for r in lo], [r["first_batch_s"] for r in lo]),
        ("loader, s per image (x shards)", [r["shards"] for r in lo], [1 / r["images_per_s"] for r in lo]),
        ("sweep, driver s per trial (x trials)", [r["trials"] for r in sw], [r["wall_s_per_trial"] for r in sw]),
        ("sweep, overhead s per trial (x trials)", [r["trials"] for r in sw], [r["median_overhead_s"] for r in sw]),
        ("find_run, s (x runs)", [r["runs"] for r in rg], [r["find_run_ms"] / 1e3 for r in rg]),
        ("champion decision, s (x runs)", [r["runs"] for r in rg], [r["champion_decision_ms"] / 1e3 for r in rg]),
        ("metric history, s (x runs)", [r["runs"] for r in rg], [r["metric_history_ms"] / 1e3 for r in rg]),
    ]
    fig, ax = plt.subplots(figsize=(9, 6))
    for label, xs, ys in lines:
        ax.loglog(xs, ys, marker="o", label=label)
    ax.set_xlabel("work: images, shards, trials or runs (log)")
    ax.set_ylabel("seconds per unit of work (log)")
    ax.set_title(f"Cost per unit of work as the work grows ({results['machine']}); flat is linear")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check of the script, not figures")
    parser.add_argument(
        "--only", choices=("shard", "loader", "sweep", "registry"), help="one section (for a look, not the file)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python -m benchmarks.scale" + (" --quick" if args.quick else ""),
        "goal": f"growth ratio (largest size over smallest, per unit of work) at most {GOAL}",
    }
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        if args.only in (None, "shard"):
            results["shard_verify"] = bench_shard_verify(sizes["images"], work)
        if args.only in (None, "loader"):
            calibration, root, mean = bench_calibration(sizes["calibration"], work)
            results["calibration"] = calibration
            results["loader"] = bench_loader(root, sizes["calibration"], mean, work)
        if args.only in (None, "sweep"):
            results["sweep"] = bench_sweep(sizes["trials"], work)
        if args.only in (None, "registry"):
            results["registry"] = bench_registry(sizes["runs"], work)
    results["wall_s"] = time.perf_counter() - started
    print(json.dumps({k: v["growth"] for k, v in results.items() if isinstance(v, dict) and "growth" in v}, indent=1))
    if args.only:
        return
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {results['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
