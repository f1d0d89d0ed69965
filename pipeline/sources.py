"""Raw data sets, read into one shape: classes, and per split a list of labelled records.

Sources: `digits` (scikit-learn's 1,797 handwritten digits, rendered as small RGB JPEGs),
`imagenet` (the raw ILSVRC-2012 layout, three ways of labelling val), `imagefolder`
(`root/{train,val,test}/<class>/*`) and `cifar10` (the `cifar-10-batches-py` folder).

Three splits, so that the figure reported is not the one that chose the model: `val` picks the
best epoch, the best trial and the registry's champion; `test` is only measured. Where the data
set has no split of its own for choosing, val is held out of train, as the paper does on
CIFAR-10 (He et al. 2015, Sec. 4.2: 45k/5k train/val, the 10k test set for the results):

| source | train | val | test |
|---|---|---|---|
| digits | the rest | stratified `data.val_fraction` | stratified `data.test_fraction` |
| cifar10 | data_batch_1..5 less val | `data.val_per_class` a class, of data_batch_1..5 | test_batch |
| imagenet | train/ less val | `data.val_per_class` a class, of train/ | the official val/ |
| imagefolder, val/ and test/ | train/ | val/ | test/ |
| imagefolder, val/ or test/ alone | train/ less val | `data.val_per_class` a class, of train/ | that folder |

Every holdout is seeded by `data.seed` and the class, nothing else (`holdout`): the same params
and data give the same split, and the shards are byte-identical. A held-out record keeps its key, label and source. A
file the walk over train/ could not make a record of (a broken symlink, a hidden file, a loose
file) stays in train's `rejected` or `skipped`: it was found in train's folders and held out of
nothing, so every file is still accounted for exactly once.

Nothing here decodes a file from disk: records point at files (or carry bytes, for the sources
that ship arrays), and the shard stage checks and converts each image by its content.
Class index = position in sorted class names (for ImageNet, sorted wnids: torchvision's order).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from PIL import Image

from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.params import Data

SPLITS = ("train", "val", "test")


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
        """Bytes of the input; 0 for a file that cannot be stat'ed (reading it will say why)."""
        if self.data is not None:
            return len(self.data)
        try:
            return os.path.getsize(self.source)
        except OSError:
            return 0


@dataclass(frozen=True)
class Dataset:
    source: str
    classes: list[str]
    splits: dict[str, list[Record]]
    class_names: list[str] | None = None  # human-readable, where the data set has them
    notes: dict[str, str] = field(default_factory=dict)  # e.g. where val labels came from
    # Per split, the entries found that never become records (see `Listing`).
    rejected: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """A baseline RGB JPEG of an HxWx3 uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- digits ---------------------------------------------------------------------------------


def digits_split(
    labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices: stratified, seeded, disjoint and complete; each fraction is of
    all the images. The report's SVC baseline uses it too, so it is fitted on the same train."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    # Test first, then val out of the rest; scikit-learn rounds a fraction's count up, and val's
    # count is passed as a number so that it stays a fraction of all the images, not of the rest.
    num_val = int(np.ceil(val_fraction * len(labels)))
    try:
        rest, test = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
    except ValueError as e:  # e.g. a fraction that leaves a class without a test image
        raise SourceError(
            f"data.test_fraction: {test_fraction} cannot split {len(labels)} images by class ({e})"
        ) from None
    try:
        train, val = train_test_split(rest, test_size=num_val, stratify=labels[rest], random_state=seed)
    except ValueError as e:  # ... or without a train or val image
        raise SourceError(
            f"data.val_fraction: {val_fraction} cannot split {len(labels)} images by class ({e})"
        ) from None
    return train, val, test


def digits(seed: int, val_fraction: float, test_fraction: float, image_size: int) -> Dataset:
    """scikit-learn's digits (8x8, 17 grey levels) as image_size^2 RGB JPEGs, stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train_idx, val_idx, test_idx = digits_split(bunch.target, seed, val_fraction, test_fraction)

    def render(i: int) -> bytes:
        grey = Image.fromarray(np.round(bunch.images[i] * (255 / 16)).astype(np.uint8), "L")
        grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return encode_jpeg(np.asarray(grey.convert("RGB")))

    def records(idx: np.ndarray) -> list[Record]:
        return [
            Record(f"digits_{i:04d}", int(bunch.target[i]), f"sklearn.datasets.load_digits[{i}]", render(i))
            for i in sorted(idx)
        ]

    splits = {"train": records(train_idx), "val": records(val_idx), "test": records(test_idx)}
    return Dataset("digits", [str(d) for d in range(10)], splits)


# --- val held out of train ----------------------------------------------------------------------


def holdout(
    records: list[Record], classes: list[str], seed: int, per_class: int, where: str
) -> tuple[list[Record], list[Record]]:
    """(train, val): `per_class` records of each class drawn into val, seeded by `seed` and the
    class, so that a class's draw depends on its own records alone (in the order they arrive:
    sorted paths, or batch order), not on the other classes. Both keep the records' order. A
    class that would keep no train record is one line: the net could never learn it. `where`
    names the records for that line (the train folder, the CIFAR batches)."""
    by_class: dict[int, list[int]] = {}
    for position, record in enumerate(records):
        by_class.setdefault(record.label, []).append(position)
    held: set[int] = set()
    for label, name in enumerate(classes):
        positions = by_class.get(label, [])
        if len(positions) <= per_class:
            raise SourceError(
                f"data.val_per_class: {per_class} would leave class {name!r} of {where} with no train image "
                f"(it has {len(positions)}); lower data.val_per_class"
            )
        # Python's seeded Random, as the shard stage's shuffle: its draws do not change with numpy.
        held.update(random.Random(f"val holdout:{seed}:{label}").sample(positions, per_class))
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val


def holdout_note(per_class: int, seed: int, of: str) -> str:
    images = "image" if per_class == 1 else "images"
    return f"{per_class} {images} a class held out of {of} (data.val_per_class), seeded by data.seed {seed}"


# --- files on disk ----------------------------------------------------------------------------


@dataclass
class Listing:
    """What a walk over a split's folders found: files to read, and every other entry accounted
    for: `rejected` (counted against shard.max_reject_fraction) or `skipped` (hidden files)."""

    files: list[Path] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{path}: no such folder (expected {what})")
    return path


def walk(folder: Path, root: Path, listing: Listing | None = None) -> Listing:
    """Every file under `folder`, sub-folders included (as torchvision's ImageFolder reads
    them), in sorted order. Hidden entries (.DS_Store, ._*, .ipynb_checkpoints/) are not data:
    skipped, and listed so the count still adds up. A symlink is followed when it points inside
    `root` (the data set's own links) and rejected when it points outside it or nowhere;
    pipes, sockets and devices are rejected, never opened (reading a pipe would block)."""
    listing = listing if listing is not None else Listing()
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
            listing.skipped.append({"source": str(path), "reason": f"hidden {kind}"})
            continue
        if path.is_symlink():
            target = path.resolve()
            if not target.exists():
                listing.rejected.append({"source": str(path), "reason": "broken symlink"})
                continue
            if not target.is_relative_to(root.resolve()):
                listing.rejected.append({"source": str(path), "reason": f"symlink to {target}, outside data.root"})
                continue
            if target.is_dir() and (target == folder.resolve() or folder.resolve().is_relative_to(target)):
                listing.rejected.append({"source": str(path), "reason": "symlink loop"})
                continue
        if path.is_dir():
            walk(path, root, listing)
        elif path.is_file():
            listing.files.append(path)
        else:
            listing.rejected.append({"source": str(path), "reason": "not a regular file"})
    return listing


def class_folders(split_dir: Path) -> list[Path]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SourceError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image files>)")
    return folders


# WebDataset splits a member name at the first dot of its base name into key and extension, and
# a slash would make it a path: keys keep letters, digits, '-' and '_', and nothing else.
_NOT_IN_KEY = re.compile(r"[^\w-]")


def sample_key(relative: Path) -> str:
    """A WebDataset-safe key from a file's path relative to its split's class folder (or its
    split folder), without the file's extension: `001.ak47/img 1.jpg` -> `001_ak47_img_1`."""
    return _NOT_IN_KEY.sub("_", str(relative.with_suffix("")))


def unique_keys(records: list[Record]) -> list[Record]:
    """Two paths that make one key (`a.b.jpg` and `a_b.jpg`, `x.JPEG` and `x.png`) both stay:
    every record after the first with that key gets a suffix from a hash of its source, which
    depends on nothing but its own path."""
    seen: set[str] = set()
    out = []
    for r in records:
        key = r.key
        if key in seen:
            key = f"{key}_{hashlib.sha256(r.source.encode()).hexdigest()[:10]}"
            if key in seen:
                raise SourceError(f"{r.source}: cannot derive a unique sample key")
            r = replace(r, key=key)
        seen.add(key)
        out.append(r)
    return out


def folder_split(
    split_dir: Path, root: Path, class_index: dict[str, int], key_by_class: bool
) -> tuple[list[Record], Listing]:
    """The records of a split laid out as split_dir/<class>/..., and everything else found there."""
    records: list[Record] = []
    listing = Listing()
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            # Loose files beside the class folders have no class.
            if entry.name.startswith("."):
                listing.skipped.append({"source": str(entry), "reason": "hidden file"})
            else:
                listing.rejected.append({"source": str(entry), "reason": "not in a class folder"})
    for folder in class_folders(split_dir):
        if folder.name not in class_index:
            raise SourceError(f"{folder}: class {folder.name!r} has no train folder")
        found = walk(folder, root)
        listing.rejected += found.rejected
        listing.skipped += found.skipped
        base = split_dir if key_by_class else folder
        records += [Record(sample_key(p.relative_to(base)), class_index[folder.name], str(p)) for p in found.files]
    return unique_keys(records), listing


def check_no_empty_classes(split_dir: Path, classes: list[str], records: list[Record]) -> None:
    """A train class without one file is a class the network can never learn: an error, not a
    silent 0-sample class (val may lack a class; the train set decides what the classes are)."""
    counts = Counter(r.label for r in records)
    empty = [c for i, c in enumerate(classes) if counts[i] == 0]
    if empty:
        raise SourceError(
            f"{split_dir / empty[0]}: an empty class folder ({len(empty)} of {len(classes)} classes have no files)"
        )


def imagefolder(root: Path, *, seed: int, val_per_class: int) -> Dataset:
    """Any root/{train,val,test}/<class>/... tree (Imagenette, ImageNet-100, your own), each
    split from its folder. A tree with one held-out folder (val/ or test/) tests on it, and val
    is `val_per_class` images a class held out of train/: most such trees call their one
    held-out folder val, and it must not also choose the model."""
    train_dir = require_dir(root / "train", "root/train/<class>/<images>")
    present = {name for name in ("val", "test") if (root / name).exists() or (root / name).is_symlink()}
    if not present:
        raise SourceError(f"{root}: no val/ or test/ folder (expected root/val/<class>/<images>, root/test/ or both)")
    folders = {"train": train_dir}
    if present == {"val", "test"}:
        folders |= {split: require_dir(root / split, f"root/{split}/<class>/<images>") for split in ("val", "test")}
    else:
        (only,) = present
        folders["test"] = require_dir(root / only, f"root/{only}/<class>/<images>")
    classes = [p.name for p in class_folders(train_dir)]
    index = {c: i for i, c in enumerate(classes)}
    splits, listings = {}, {}
    for split, split_dir in folders.items():
        splits[split], listings[split] = folder_split(split_dir, root, index, key_by_class=True)
    check_no_empty_classes(train_dir, classes, splits["train"])
    notes = {}
    if "val" not in folders:
        # What the walk over train/ refused stays train's (see the module's docstring).
        splits["train"], splits["val"] = holdout(splits["train"], classes, seed, val_per_class, str(train_dir))
        listings["val"] = Listing()
        notes = {"val_split": holdout_note(val_per_class, seed, "train/"), "test_split": f"{folders['test'].name}/"}
    return Dataset(
        "imagefolder",
        classes,
        {split: splits[split] for split in SPLITS},
        notes=notes,
        rejected={s: listings[s].rejected for s in SPLITS},
        skipped={s: listings[s].skipped for s in SPLITS},
    )


# --- ImageNet (ILSVRC-2012) -------------------------------------------------------------------

DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"
LOC_CSV = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


def imagenet(root: Path, *, seed: int, val_per_class: int) -> Dataset:
    """train/<wnid>/*.JPEG; val as val/<wnid>/ folders, or flat with labels from Kaggle's
    LOC_val_solution.csv or the devkit's ground truth + meta.mat (ILSVRC2012_ID order).

    The official val set is the test split (the paper reports on it: He et al. 2015, Tables 2-4);
    the val split that chooses is `val_per_class` images a class held out of train/."""
    train_dir = require_dir(root / "train", "ILSVRC-2012's train/<wnid>/*.JPEG")
    val_dir = require_dir(root / "val", "ILSVRC-2012's val/ (flat, or val/<wnid>/ folders)")
    classes = [p.name for p in class_folders(train_dir)]
    index = {wnid: i for i, wnid in enumerate(classes)}
    train, train_listing = folder_split(train_dir, root, index, key_by_class=False)
    check_no_empty_classes(train_dir, classes, train)

    val_has_folders = any(p.is_dir() and not p.name.startswith(".") for p in val_dir.iterdir())
    if val_has_folders:
        if any(p.is_file() and not p.name.startswith(".") for p in val_dir.iterdir()):
            raise SourceError(f"{val_dir}: holds both class folders and loose files; expected one layout")
        test, test_listing = folder_split(val_dir, root, index, key_by_class=False)
        labels_from = "val/<wnid>/ folders"
    else:
        wnid_of, labels_from = val_labels(root)
        test_listing = walk(val_dir, root)
        test = []
        for path in test_listing.files:
            wnid = wnid_of.get(path.stem)
            if wnid is None:
                raise SourceError(f"{path}: no label for this val image in {labels_from}")
            if wnid not in index:
                raise SourceError(f"{labels_from}: {path.stem} is labelled {wnid}, which has no train folder")
            test.append(Record(sample_key(path.relative_to(val_dir)), index[wnid], str(path)))
        test = unique_keys(test)

    # Held out once every file is listed and labelled: a bad label file is reported as such. What
    # the walk over train/ refused stays train's (see the module's docstring).
    train, val = holdout(train, classes, seed, val_per_class, str(train_dir))
    return Dataset(
        "imagenet",
        classes,
        {"train": train, "val": val, "test": test},
        class_names=imagenet_class_names(root, classes),
        notes={
            "val_split": holdout_note(val_per_class, seed, "train/"),
            "test_split": "the official val/",
            "test_labels": labels_from,
        },
        rejected={"train": train_listing.rejected, "val": [], "test": test_listing.rejected},
        skipped={"train": train_listing.skipped, "val": [], "test": test_listing.skipped},
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
    except Exception as e:  # noqa: BLE001 (a malformed pickle raises almost anything: ValueError, IndexError, ...)
        raise SourceError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: not a CIFAR-10 python batch (a {type(raw).__name__}, expected a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def cifar_class_names(path: Path) -> list[str]:
    names = read_cifar_batch(path).get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise SourceError(f"{path}: label_names is not a list of class names")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def cifar_images(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(N x 32 x 32 x 3 uint8 images, N labels) of one batch, or one line saying what is wrong."""
    batch = read_cifar_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise SourceError(f"{path}: data is a {what}, expected a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or not all(isinstance(x, int) and 0 <= x < num_classes for x in labels):
        raise SourceError(f"{path}: labels is not a list of integers in 0..{num_classes - 1}")
    if len(labels) != len(data):
        raise SourceError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar10(root: Path, *, seed: int, val_per_class: int) -> Dataset:
    """cifar-10-batches-py: data_batch_1..5 -> train and val, test_batch -> test. The paper's
    protocol (He et al. 2015, Sec. 4.2): 45k train / 5k val out of the training batches (500
    images a class: `val_per_class`), results on the 10k test images."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in [*names, "batches.meta"]:
        if not (folder / name).is_file():
            raise SourceError(f"{folder / name}: missing (expected the cifar-10-batches-py folder)")
    # batches.meta lists the class names in label order ("airplane", "automobile", ...).
    classes = cifar_class_names(folder / "batches.meta")

    def records(split: str, batch_names: list[str]) -> list[Record]:
        out = []
        for name in batch_names:
            images, labels = cifar_images(folder / name, len(classes))
            for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                out.append(Record(f"cifar10_{split}_{len(out):05d}", label, f"{name}[{i}]", encode_jpeg(pixels)))
        return out

    # Every batch is read (and checked) before the holdout; held-out records keep their
    # `cifar10_train_*` keys.
    train, test = records("train", names[:5]), records("test", names[5:])
    train, val = holdout(train, classes, seed, val_per_class, f"{folder}/data_batch_1..5")
    return Dataset(
        "cifar10",
        classes,
        {"train": train, "val": val, "test": test},
        notes={"val_split": holdout_note(val_per_class, seed, "data_batch_1..5"), "test_split": "test_batch"},
    )


def load(data: Data) -> Dataset:
    """The data set named by params' data section."""
    if data.source == "digits":
        return digits(data.seed, data.val_fraction, data.test_fraction, data.image_size)
    if data.root is None:
        raise SourceError(f"data.root: required for data.source={data.source} (the folder holding the raw data set)")
    path = Path(data.root).expanduser()
    if not path.is_dir():
        raise SourceError(f"data.root: {path}: no such folder")
    readers = {"imagenet": imagenet, "imagefolder": imagefolder, "cifar10": cifar10}
    return readers[data.source](path, seed=data.seed, val_per_class=data.val_per_class)
