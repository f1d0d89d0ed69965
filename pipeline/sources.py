"""Raw data sets, read into one shape: classes, and per split a list of labelled records.

Sources: `digits` (scikit-learn's 1,797 handwritten digits, rendered as small RGB JPEGs),
`imagenet` (the raw ILSVRC-2012 layout, three ways of labelling val), `imagefolder`
(`root/{train,val}/<class>/*`) and `cifar10` (the `cifar-10-batches-py` folder).

Nothing here decodes a file from disk: records point at files (or carry bytes, for the sources
that ship arrays), and the shard stage checks and converts each image by its content.
Class index = position in sorted class names (for ImageNet, sorted wnids: torchvision's order).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from pipeline.cli import UsageError

SPLITS = ("train", "val")


class SourceError(UsageError):
    """A raw data set that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Record:
    key: str  # the sample's key in the shards; unique within a split
    label: int
    source: str  # a file path, or an id such as "sklearn.datasets.load_digits[17]"
    data: bytes | None = None  # the encoded image, for sources that are not files

    def read(self) -> bytes:
        return self.data if self.data is not None else Path(self.source).read_bytes()

    def size(self) -> int:
        return len(self.data) if self.data is not None else os.path.getsize(self.source)


@dataclass(frozen=True)
class Dataset:
    source: str
    classes: list[str]
    splits: dict[str, list[Record]]
    class_names: list[str] | None = None  # human-readable, where the data set has them
    notes: dict[str, str] = field(default_factory=dict)  # e.g. where val labels came from


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """A baseline RGB JPEG of an HxWx3 uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- digits ---------------------------------------------------------------------------------


def digits_split(labels: np.ndarray, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): stratified, seeded; the report's SVC baseline uses it too."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, val = train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)
    return train, val


def digits(seed: int, val_fraction: float, image_size: int) -> Dataset:
    """scikit-learn's digits (8x8, 17 grey levels) as image_size^2 RGB JPEGs, stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train_idx, val_idx = digits_split(bunch.target, seed, val_fraction)

    def render(i: int) -> bytes:
        grey = Image.fromarray(np.round(bunch.images[i] * (255 / 16)).astype(np.uint8), "L")
        grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return encode_jpeg(np.asarray(grey.convert("RGB")))

    def records(idx: np.ndarray) -> list[Record]:
        return [
            Record(f"digits_{i:04d}", int(bunch.target[i]), f"sklearn.datasets.load_digits[{i}]", render(i))
            for i in sorted(idx)
        ]

    return Dataset("digits", [str(d) for d in range(10)], {"train": records(train_idx), "val": records(val_idx)})


# --- files on disk ----------------------------------------------------------------------------


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{path}: no such folder (expected {what})")
    return path


def list_files(folder: Path) -> list[Path]:
    """Regular files in a folder, sorted; hidden files (.DS_Store, ._*) are not data."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def class_folders(split_dir: Path) -> list[Path]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SourceError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image files>)")
    return folders


def sample_key(path: Path, prefix: str = "") -> str:
    # WebDataset splits a member name at the first dot of its base name: keys have no dots.
    return prefix + path.stem.replace(".", "_")


def check_unique_keys(split: str, records: list[Record]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.key in seen:
            raise SourceError(f"{split}: duplicate sample key {r.key!r} from {seen[r.key]} and {r.source}")
        seen[r.key] = r.source


def folder_records(split_dir: Path, class_index: dict[str, int], key_by_class: bool) -> list[Record]:
    records = []
    for folder in class_folders(split_dir):
        if folder.name not in class_index:
            raise SourceError(f"{folder}: class {folder.name!r} has no train folder")
        prefix = f"{folder.name}_" if key_by_class else ""
        records += [Record(sample_key(p, prefix), class_index[folder.name], str(p)) for p in list_files(folder)]
    return records


def imagefolder(root: Path) -> Dataset:
    """Any root/{train,val}/<class>/* tree (Imagenette, ImageNet-100, your own)."""
    train_dir = require_dir(root / "train", "root/train/<class>/<images>")
    val_dir = require_dir(root / "val", "root/val/<class>/<images>")
    classes = [p.name for p in class_folders(train_dir)]
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        "train": folder_records(train_dir, index, key_by_class=True),
        "val": folder_records(val_dir, index, key_by_class=True),
    }
    for split, records in splits.items():
        check_unique_keys(split, records)
    return Dataset("imagefolder", classes, splits)


# --- ImageNet (ILSVRC-2012) -------------------------------------------------------------------

DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"
LOC_CSV = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


def imagenet(root: Path) -> Dataset:
    """train/<wnid>/*.JPEG; val as val/<wnid>/ folders, or flat with labels from Kaggle's
    LOC_val_solution.csv or the devkit's ground truth + meta.mat (ILSVRC2012_ID order)."""
    train_dir = require_dir(root / "train", "ILSVRC-2012's train/<wnid>/*.JPEG")
    val_dir = require_dir(root / "val", "ILSVRC-2012's val/ (flat, or val/<wnid>/ folders)")
    classes = [p.name for p in class_folders(train_dir)]
    index = {wnid: i for i, wnid in enumerate(classes)}
    train = folder_records(train_dir, index, key_by_class=False)

    val_has_folders = any(p.is_dir() for p in val_dir.iterdir())
    if val_has_folders:
        if list_files(val_dir):
            raise SourceError(f"{val_dir}: holds both class folders and loose files; expected one layout")
        val, labels_from = folder_records(val_dir, index, key_by_class=False), "val/<wnid>/ folders"
    else:
        wnid_of, labels_from = val_labels(root)
        val = []
        for path in list_files(val_dir):
            wnid = wnid_of.get(path.stem)
            if wnid is None:
                raise SourceError(f"{path}: no label for this val image in {labels_from}")
            if wnid not in index:
                raise SourceError(f"{labels_from}: {path.stem} is labelled {wnid}, which has no train folder")
            val.append(Record(sample_key(path), index[wnid], str(path)))

    check_unique_keys("train", train)
    check_unique_keys("val", val)
    return Dataset(
        "imagenet",
        classes,
        {"train": train, "val": val},
        class_names=imagenet_class_names(root, classes),
        notes={"val_labels": labels_from},
    )


def val_labels(root: Path) -> tuple[dict[str, str], str]:
    """{val image stem: wnid}, and the file the labels came from."""
    csv_path = root / LOC_CSV
    if csv_path.is_file():
        return loc_val_labels(csv_path), LOC_CSV
    for folder in (root / DEVKIT_DATA, root):
        truth, meta = folder / GROUND_TRUTH, folder / "meta.mat"
        if truth.is_file():
            if not meta.is_file():
                raise SourceError(f"{meta}: missing; needed to map {GROUND_TRUTH}'s ILSVRC2012_IDs to wnids")
            return devkit_val_labels(truth, meta), str(truth.relative_to(root))
    raise SourceError(
        f"{root}: no val labels; expected val/<wnid>/ folders, {root / LOC_CSV}, "
        f"or {root / DEVKIT_DATA}/{GROUND_TRUTH} with meta.mat"
    )


def loc_val_labels(path: Path) -> dict[str, str]:
    """Kaggle's `ImageId,PredictionString`; the wnid is the first token of the string."""
    labels = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise SourceError(f"{path}: expected the header ImageId,PredictionString")
        for line, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens or not tokens[0].startswith("n"):
                raise SourceError(f"{path}:{line}: no wnid in PredictionString {row['PredictionString']!r}")
            labels[row["ImageId"]] = tokens[0]
    return labels


def devkit_ids_to_wnids(meta: Path) -> dict[int, str]:
    """meta.mat's leaf synsets: ILSVRC2012_ID (1..1000, NOT sorted-wnid order) -> wnid."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise SourceError(f"{meta}: not an ILSVRC-2012 devkit meta.mat ({e})") from None


def devkit_val_labels(truth: Path, meta: Path) -> dict[str, str]:
    """Line i of the ground truth is the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}."""
    wnid_of_id = devkit_ids_to_wnids(meta)
    labels = {}
    for number, text in enumerate(truth.read_text().split(), start=1):
        if not text.isdigit() or int(text) not in wnid_of_id:
            raise SourceError(f"{truth}:{number}: {text!r} is not an ILSVRC2012_ID of meta.mat")
        labels[f"ILSVRC2012_val_{number:08d}"] = wnid_of_id[int(text)]
    return labels


def imagenet_class_names(root: Path, classes: list[str]) -> list[str] | None:
    names: dict[str, str] = {}
    mapping = root / SYNSET_MAPPING
    meta = root / DEVKIT_DATA / "meta.mat"
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            wnid, _, name = line.partition(" ")
            names[wnid] = name.strip()
    elif meta.is_file():
        from scipy.io import loadmat

        names = {str(s["WNID"]): str(s["words"]) for s in loadmat(meta, squeeze_me=True)["synsets"]}
    return [names.get(wnid, wnid) for wnid in classes] if names else None


# --- CIFAR-10 ---------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles: allow numpy arrays and nothing else to be built."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise SourceError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def cifar10(root: Path) -> Dataset:
    """cifar-10-batches-py: data_batch_1..5 -> train, test_batch -> val (the paper tests on it)."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in [*names, "batches.meta"]:
        if not (folder / name).is_file():
            raise SourceError(f"{folder / name}: missing (expected the cifar-10-batches-py folder)")
    classes = [
        c.decode() if isinstance(c, bytes) else c for c in read_cifar_batch(folder / "batches.meta")["label_names"]
    ]

    def records(split: str, batch_names: list[str]) -> list[Record]:
        out = []
        for name in batch_names:
            batch = read_cifar_batch(folder / name)
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for i, (pixels, label) in enumerate(zip(images, batch["labels"])):
                out.append(Record(f"cifar10_{split}_{len(out):05d}", int(label), f"{name}[{i}]", encode_jpeg(pixels)))
        return out

    # batches.meta lists the class names in label order ("airplane", "automobile", ...).
    return Dataset("cifar10", classes, {"train": records("train", names[:5]), "val": records("val", names[5:])})


def load(source: str, root: str | None, seed: int, val_fraction: float, image_size: int) -> Dataset:
    """The data set named by params' data section."""
    if source == "digits":
        return digits(seed, val_fraction, image_size)
    if root is None:
        raise SourceError(f"data.root: required for data.source={source} (the folder holding the raw data set)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SourceError(f"data.root: {path}: no such folder")
    readers = {"imagenet": imagenet, "imagefolder": imagefolder, "cifar10": cifar10}
    return readers[source](path)
