"""Small ImageNet-shaped trees of real image files, with ILSVRC-2012's quirks, for tests and
benchmarks: a CMYK JPEG, a PNG named .JPEG, a greyscale JPEG, a progressive JPEG, a truncated
JPEG, a zero-byte file; val labelled by Kaggle's CSV, the devkit, or folders."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Sorted wnid order (torchvision's class index) differs from the devkit's ILSVRC2012_ID order
# below, as it does in the real meta.mat.
WNIDS = ["n01440764", "n02102040", "n03000684"]
DEVKIT_IDS = {"n03000684": 1, "n01440764": 2, "n02102040": 3}
NAMES = {"n01440764": "tench, Tinca tinca", "n02102040": "English springer", "n03000684": "chain saw, chainsaw"}


def picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour field with noise: compresses like a photograph, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-1, 1, size=(3, 2))
    channels = [base[c] + slope[c, 0] * x * 255 / width + slope[c, 1] * y * 255 / height for c in range(3)]
    image = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, mode: str = "RGB", **save: object) -> bytes:
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Tree:
    root: Path
    train_labels: dict[str, str] = field(default_factory=dict)  # key -> wnid, for the good files
    val_labels: dict[str, str] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)  # keys
    converted: dict[str, str] = field(default_factory=dict)  # key -> what it was


def imagenet_tree(
    root: Path,
    val_format: str = "loc_csv",
    per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (48, 40),
    quirks: bool = True,
    seed: int = 0,
) -> Tree:
    """Write train/<wnid>/*.JPEG and val/ (flat + labels file, or val/<wnid>/ folders)."""
    if val_format not in ("loc_csv", "devkit", "folders"):
        raise ValueError(val_format)
    rng = np.random.default_rng(seed)
    tree = Tree(root)
    width, height = size
    for wnid in WNIDS:
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            key = f"{wnid}_{1000 + i}"
            (folder / f"{key}.JPEG").write_bytes(jpeg_bytes(picture(rng, width, height)))
            tree.train_labels[key] = wnid

    if quirks:
        a, b, c = WNIDS
        quirky = {
            f"{a}_cmyk": (jpeg_bytes(picture(rng, width, height), "CMYK"), "CMYK"),
            f"{b}_png": (png_bytes(picture(rng, width, height)), "PNG RGB"),
            f"{c}_grey": (jpeg_bytes(picture(rng, width, height), "L"), "L"),
            f"{a}_progressive": (jpeg_bytes(picture(rng, width, height), progressive=True), "progressive JPEG"),
        }
        for key, (data, was) in quirky.items():
            (root / "train" / key[:9] / f"{key}.JPEG").write_bytes(data)
            tree.train_labels[key] = key[:9]
            tree.converted[key] = was
        good = jpeg_bytes(picture(rng, width, height))
        (root / "train" / b / f"{b}_truncated.JPEG").write_bytes(good[: len(good) // 2])
        (root / "train" / c / f"{c}_empty.JPEG").write_bytes(b"")
        tree.rejected |= {f"{b}_truncated", f"{c}_empty"}

    number = 0
    val_dir = root / "val"
    val_dir.mkdir()
    for i in range(val_per_class):
        for wnid in WNIDS:
            number += 1
            key = f"ILSVRC2012_val_{number:08d}"
            cmyk = quirks and number == 2  # ILSVRC2012_val_00019877 is CMYK in the real set
            data = jpeg_bytes(picture(rng, width, height), "CMYK" if cmyk else "RGB")
            folder = val_dir / wnid if val_format == "folders" else val_dir
            folder.mkdir(exist_ok=True)
            (folder / f"{key}.JPEG").write_bytes(data)
            tree.val_labels[key] = wnid
            if cmyk:
                tree.converted[key] = "CMYK"

    if val_format == "loc_csv":
        lines = ["ImageId,PredictionString"]
        lines += [f"{key},{wnid} 10 20 30 40 {wnid} 1 2 3 4" for key, wnid in tree.val_labels.items()]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {NAMES[w]}\n" for w in WNIDS))
    elif val_format == "devkit":
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        ordered = sorted(tree.val_labels)  # file-name order: one ILSVRC2012_ID per line
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{DEVKIT_IDS[tree.val_labels[key]]}\n" for key in ordered)
        )
        write_meta_mat(data / "meta.mat")
    return tree


def write_meta_mat(path: Path) -> None:
    """A devkit meta.mat: leaf synsets by ILSVRC2012_ID, plus one inner node to skip."""
    from scipy.io import savemat

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [(DEVKIT_IDS[w], w, NAMES[w], "", 0, np.zeros(0), 0, 1300) for w in WNIDS]
    rows.sort()
    rows.append((len(WNIDS) + 1, "n00001740", "entity", "", 3, np.arange(1, 4), 19, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    savemat(path, {"synsets": synsets})


def imagefolder_tree(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 3,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val"),
) -> None:
    rng = np.random.default_rng(seed)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"img.{i}.jpg").write_bytes(jpeg_bytes(picture(rng, 40, 30)))


def cifar10_tree(root: Path, per_batch: int = 6, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder in the real format (python-2 era pickles of numpy arrays).
    As in the real one, the classes are balanced over the five training batches (each class
    has 5 x per_batch / 10 images, give or take one), in shuffled order within each batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for number, name in enumerate(names):
        labels = [(number * per_batch + i) % 10 for i in range(per_batch)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.permutation(labels)],
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        b"label_names": [
            n.encode()
            for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
        ]
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder
