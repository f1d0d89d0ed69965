"""pipeline.serving: the registered model's preprocessing is the pipeline's own, and bad input
gets one line. (Logged, registered and served for real: tests/integration/test_serving.py.)"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

import resnet
from pipeline import loader, serving, shard, transforms
from pipeline import params as params_module
from pipeline.images import Conversion, to_rgb_jpeg
from pipeline.manifest import read_manifest
from tests.conftest import REPO


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, dict]:
    shards = tmp_path_factory.mktemp("digits") / "shards"
    shard.shard(params_module.load(REPO / "params.yaml", [f"paths.shards={shards}"]))
    return str(shards), read_manifest(str(shards))


@pytest.fixture(scope="module")
def classifier(digits) -> serving.ImageClassifier:
    """An untrained net is enough to compare two paths to its logits."""
    _, manifest = digits
    torch.manual_seed(0)
    model = serving.ImageClassifier()
    conversion = Conversion.of(params_module.load(REPO / "params.yaml").shard)
    model.setup = serving.setup_of("cifar", manifest, conversion)
    model.network = resnet.build("cifar_resnet8", num_classes=10).eval()
    return model


def test_the_served_probabilities_are_the_evaluations(digits, classifier):
    """Shard images through predict() and through evaluate's loader path give the same softmax."""
    shards, manifest = digits
    images = serving.example_images(shards, manifest, count=8)
    served = np.array(list(classifier.predict(None, pd.DataFrame({"image": images}))["probabilities"]))
    batches = loader.make_loader(
        shards, "val", transforms.eval_transform("cifar"),
        batch_size=8, num_workers=0, epoch=0, seed=0, train=False, manifest=manifest,
    )  # fmt: skip
    pixels, _ = next(iter(batches))
    with torch.no_grad():
        logits = classifier.network(transforms.prepare_batch(pixels, manifest.mean, lighting=False))
    assert np.allclose(served, logits.softmax(1).numpy(), atol=1e-5)


def test_an_8x8_digit_is_resized_as_the_shard_stage_renders_digits(classifier):
    """A consumer's 8x8 digit becomes the 16x16 JPEG the shard stage made of it, byte for byte."""
    from sklearn.datasets import load_digits

    from pipeline import sources

    grey = np.round(load_digits().images[17] * 255 / 16).astype(np.uint8)
    rendered = sources.digits(0, 0.2, 0.2, 16)
    stored = next(r.data for split in rendered.splits.values() for r in split if r.key == "digits_0017")
    png = serving.images_from_arrays([grey])[0]
    assert serving.as_training_jpeg(png, classifier.setup) == to_rgb_jpeg(stored, classifier.setup.conversion).jpeg


def test_grey_rgb_and_rgba_images_of_a_digit_give_one_answer(classifier):
    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    arrays = [grey, np.repeat(grey[:, :, None], 3, 2), np.dstack([np.repeat(grey[:, :, None], 3, 2), np.full((8, 8), 255, np.uint8)])]
    out = classifier.predict(None, pd.DataFrame({"image": serving.images_from_arrays(arrays)}))
    assert len(set(out["class"])) == 1 and np.allclose(out["probabilities"][0], out["probabilities"][2])


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"image": [b"not an image at all"]}), "image[0]: not an image"),
        (pd.DataFrame({"image": [b""]}), "image[0]: empty file"),
        (pd.DataFrame({"image": ["a string"]}), "image[0]: expected encoded image bytes, got str"),
        (pd.DataFrame({"picture": [b"x"]}), "expected a DataFrame with a column 'image' of encoded images"),
        (pd.DataFrame({"image": []}), "no images"),
    ],
)
def test_bad_input_gets_one_line(classifier, frame, message):
    with pytest.raises(MlflowException) as caught:
        classifier.predict(None, frame)
    assert caught.value.message == message and caught.value.get_http_status_code() == 400


def test_a_tiny_image_is_refused_as_the_shard_stage_refuses_it(classifier):
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    with pytest.raises(MlflowException, match=r"image\[0\]: 4x4, a side under shard.min_side 8"):
        classifier.predict(None, pd.DataFrame({"image": [buffer.getvalue()]}))


def test_arrays_must_be_uint8_images():
    with pytest.raises(ValueError, match=r"array 0: expected uint8 HxW, HxWx3 or HxWx4, got float64 \(8, 8\)"):
        serving.images_from_arrays([np.zeros((8, 8))])
    with pytest.raises(ValueError, match=r"array 0: .* got uint8 \(2, 8, 8, 3\)"):
        serving.images_from_arrays([np.zeros((2, 8, 8, 3), np.uint8)])


def test_the_description_says_the_input_in_one_line(classifier):
    line = classifier.setup.describe()
    assert "\n" not in line and "column `image`" in line and "16x16" in line


def test_the_exported_network_takes_any_batch_size(tmp_path, classifier):
    path = Path(tmp_path) / serving.NETWORK
    serving.export(classifier.network, (16, 16), path)
    loaded = torch.export.load(path).module()
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16)
        assert torch.allclose(loaded(x), classifier.network(x), atol=1e-5)
