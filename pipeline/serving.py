"""The registered model: images in, classes out, with the pipeline's own preprocessing inside.

    model = mlflow.pyfunc.load_model("models:/resnet-digits@champion")
    model.predict(pandas.DataFrame({"image": [open("digit.png", "rb").read()]}))

Input: a DataFrame column `image` of encoded images (PNG, JPEG or any format Pillow reads), of
any size, grey, RGB or RGBA; over HTTP (`mlflow models serve`) each is base64 in the JSON, as
MLflow sends binary columns. Output: a row per image with `class` (the index), `label` (its
name, in the manifest's order) and `probabilities` (the softmax over the classes).

Each image takes the path a training image took: the shard stage's checks and conversion to an
RGB JPEG (`to_rgb_jpeg`, with the run's `shard.*` limits), for CIFAR-size nets a bilinear
resize to the training images' size first (how the digits were rendered from 8x8: a 8x8 digit
upsampled any other way loses points), then the loader's eval transform and `prepare_batch`'s
mean subtraction. The network inside is `torch.export`'s pt2 of the trained net: no pickle.

This file is the model's code as MLflow logs it ("models from code": `set_model` at the end), so
loading the model runs it, in an environment where this project is installed.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import mlflow
import mlflow.models
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from pipeline import tracking, transforms
from pipeline.images import Conversion, Rejected, rgb_of, to_rgb_jpeg
from pipeline.manifest import Manifest
from pipeline.params import Params
from pipeline.recipe import PROFILES
from pipeline.tars import tar_samples

NETWORK = "network.pt2"
SETUP = "setup.json"
INPUT_COLUMN = "image"
# This project (the model's code is its serving module) and what that module imports.
MODEL_DISTRIBUTIONS = ("resnet-pipeline", "mlflow", "torch", "numpy", "pandas", "pillow")


@dataclass(frozen=True)
class Setup:
    """What the preprocessing needs to know of the training data and params."""

    arch: str  # model.arch: cifar (whole images of one size) or imagenet (224 crops)
    image_size: tuple[int, int] | None  # cifar: the training images' (width, height)
    mean: tuple[float, float, float]  # the training images' channel means, in [0, 1]
    classes: tuple[str, ...]  # the labels, in the order of the net's outputs
    conversion: Conversion  # the shard stage's checks and JPEG conversion

    def describe(self) -> str:
        """The input, in one line (the registered version's description)."""
        size = f"resized to {self.image_size[0]}x{self.image_size[1]}" if self.image_size else "centre-cropped to 224x224"
        return (
            f"Input: a DataFrame column `{INPUT_COLUMN}` of encoded images (PNG, JPEG, ...; any size, {size} inside; "
            "base64 over HTTP); output: `class`, `label` and `probabilities` per image."
        )


def setup_of(arch: str, manifest: Manifest, conversion: Conversion) -> Setup:
    size = manifest.splits["train"].image_size
    uniform = tuple(size.uniform) if PROFILES[arch].whole_images and size and size.uniform else None
    return Setup(arch, uniform, tuple(manifest.mean), tuple(manifest.classes), conversion)


def bad_input(message: str) -> MlflowException:
    """One line the server answers with (HTTP 400), never an array dump."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def as_training_jpeg(data: bytes, setup: Setup) -> bytes:
    """An encoded image as the shard stage would have stored it for this net; `Rejected`
    names what is wrong with one it would have rejected."""
    checked = to_rgb_jpeg(data, setup.conversion)
    if setup.image_size is None or checked.size == setup.image_size:
        return checked.jpeg
    # Resized from the original, losslessly passed on: one JPEG encoding, as the stage made one.
    with Image.open(io.BytesIO(data)) as image:
        resized = rgb_of(image).resize(setup.image_size, Image.Resampling.BILINEAR)
    return to_rgb_jpeg(png(resized), setup.conversion).jpeg


def pixels_of(images: list[Any], setup: Setup) -> torch.Tensor:
    """uint8 (N, H, W, 3): each image through the shard stage's conversion and the eval transform."""
    transform = transforms.eval_transform(setup.arch)
    out = []
    for i, data in enumerate(images):
        if not isinstance(data, (bytes, bytearray)):
            raise bad_input(f"{INPUT_COLUMN}[{i}]: expected encoded image bytes, got {type(data).__name__}")
        try:
            out.append(transform(as_training_jpeg(bytes(data), setup)))
        except Rejected as e:
            raise bad_input(f"{INPUT_COLUMN}[{i}]: {e}") from None
    return torch.stack(out)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        raw = json.loads(Path(context.artifacts["setup"]).read_text())
        raw["conversion"] = Conversion(**raw["conversion"])
        raw["image_size"] = tuple(raw["image_size"]) if raw["image_size"] else None
        self.setup = Setup(**{**raw, "mean": tuple(raw["mean"]), "classes": tuple(raw["classes"])})
        self.network = torch.export.load(context.artifacts["network"]).module()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input:
            raise bad_input(f"expected a DataFrame with a column {INPUT_COLUMN!r} of encoded images")
        if len(model_input) == 0:
            raise bad_input("no images")
        pixels = pixels_of(list(model_input[INPUT_COLUMN]), self.setup)
        with torch.no_grad():
            logits = self.network(transforms.prepare_batch(pixels, self.setup.mean, lighting=False))
        probabilities = logits.float().softmax(1)
        classes = probabilities.argmax(1).tolist()
        return pd.DataFrame(
            {
                "class": classes,
                "label": [self.setup.classes[c] for c in classes],
                "probabilities": [row.tolist() for row in probabilities],
            }
        )


def export(net: torch.nn.Module, side: tuple[int, int], path: Path) -> None:
    """The net as a pt2 file taking float (N, 3, H, W) batches of any N."""
    net = net.to("cpu").to(memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, 3, side[1], side[0])
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), path)


def requirements() -> list[str]:
    """The distributions the model's code imports, pinned as installed here. Naming them spares
    MLflow its inference of them, which loads the model in a subprocess (about 10 s a model)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_DISTRIBUTIONS]


def log_model(store: tracking.Store, net: torch.nn.Module, setup: Setup, examples: list[bytes], step: int = 0):
    """Log the classifier into the active MLflow run (at `step`: MLflow copies the run's metrics
    of that step onto the logged model). `examples`: a few encoded images, the input example."""
    with tempfile.TemporaryDirectory() as tmp:
        network, config = Path(tmp) / NETWORK, Path(tmp) / SETUP
        export(net, setup.image_size or (transforms.CROP, transforms.CROP), network)
        config.write_text(json.dumps(asdict(setup)))
        example = pd.DataFrame({INPUT_COLUMN: examples})
        classifier = ImageClassifier()
        classifier.setup, classifier.network = setup, torch.export.load(network).module()
        with warnings.catch_warnings():
            # MLflow warns that an integer column cannot hold a missing value; the integer column
            # is the output's predicted class, which is never missing.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column", UserWarning)
            signature = infer_signature(example, classifier.predict(None, example))
        return store.call(
            mlflow.pyfunc.log_model,
            name="model",
            python_model=__file__,
            artifacts={"network": str(network), "setup": str(config)},
            signature=signature,
            input_example=example,
            step=step,
            pip_requirements=requirements(),
        )


def example_images(shards: str, manifest: Manifest, count: int = 3) -> list[bytes]:
    """The first few val images, as the shards store them (what a consumer would send)."""
    url, _ = manifest.shard_list(shards, "val")[0]
    return [sample["jpg"] for sample in islice(tar_samples(iter([{"url": url}])), count)]


def log_run_model(store: tracking.Store, net: torch.nn.Module, params: Params, manifest: Manifest, step: int):
    """`log_model` for a net trained on the shards of params: their preprocessing, and a few
    of their val images as the input example. Into the active MLflow run."""
    setup = setup_of(params.model.arch, manifest, Conversion.of(params.shard))
    return log_model(store, net, setup, example_images(params.paths.shards, manifest), step=step)


def images_from_arrays(arrays: list[np.ndarray]) -> list[bytes]:
    """uint8 HxW or HxWx3 arrays as PNG bytes, the model's input (lossless)."""
    out = []
    for i, array in enumerate(map(np.asarray, arrays)):
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ValueError(f"array {i}: expected uint8 HxW, HxWx3 or HxWx4, got {array.dtype} {array.shape}")
        out.append(png(Image.fromarray(array)))
    return out


mlflow.models.set_model(ImageClassifier())
