"""The evaluate stage on ImageNet-shaped shards: the centre crop and the paper's 10-crop of the
sweep's best trial, on the test split, into eval.json and the trial's MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import artifacts, checkpoints, evaluate, records, shard
from pipeline.artifacts import Evaluation
from pipeline.errors import UsageError
from pipeline.manifest import read_manifest
from tests.data_trees import imagenet_tree
from tests.helpers import failed_trial, finished_trial, imagenet_params, sweep_of


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(the raw tree, a folder holding its shards), 224-size images and a few per class."""
    tmp = tmp_path_factory.mktemp("evaluate")
    tree = imagenet_tree(tmp / "raw", size=(260, 240), quirks=False)
    shard.shard(imagenet_params(tmp, tree.root))
    return tree.root, tmp


def resnet18_checkpoint(folder: Path, num_classes: int) -> None:
    torch.manual_seed(0)
    args = checkpoints.ModelArgs(name="resnet18", shortcut="B", num_classes=num_classes, bottleneck="v1", zero_init_residual=False)
    state = checkpoints.CheckpointState(
        model_args=args, model=args.build().state_dict(), optimizer={}, schedule={}, epoch=0, history=[], mean=[0.5] * 3
    )
    folder.mkdir(parents=True)
    checkpoints.save(folder, state)


def test_imagenet_nets_get_the_single_and_the_ten_crop_of_every_test_image(imagenet_shards, tmp_path, monkeypatch):
    root, shards_home = imagenet_shards
    params = imagenet_params(tmp_path, root, f"paths.shards={shards_home / 'shards'}", "model.arch=imagenet", "model.depth=18")
    manifest = read_manifest(params.paths.shards)
    checkpoint = tmp_path / "ray" / "trial" / "checkpoint_000000"
    resnet18_checkpoint(checkpoint, len(manifest.classes))
    client = MlflowClient(params.mlflow.tracking_uri)
    run_id = client.create_run(client.create_experiment("resnet")).info.run_id
    best = finished_trial(18, "B", 0.5, 0.5, checkpoint=str(checkpoint), mlflow_run_id=run_id, best_epoch=0)
    sweep = sweep_of([failed_trial(34, "B"), best])
    artifacts.write(Path(params.paths.reports) / records.Sweep.FILE, sweep)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    evaluate.main(["--params", str(params_file(tmp_path, params))])

    result = artifacts.read(str(Path(params.paths.metrics) / Evaluation.FILE), Evaluation)
    test_images = manifest.splits["test"].num_samples
    assert (result.split, result.crop, result.checkpoint_name, result.mlflow_run_id) == ("test", "single", checkpoint.name, run_id)
    assert result.num_samples == result.ten_crop.num_samples == test_images > 0
    single = evaluate.evaluate_checkpoint(params, str(checkpoint), "single")
    assert (result.top1_error, result.top5_error, result.loss) == (single.top1_error, single.top5_error, single.loss)
    # Ten views of each image, averaged in probability: another loss than the centre crop's alone.
    assert result.ten_crop.loss != pytest.approx(single.loss, rel=1e-6)
    logged = client.get_run(run_id).data.metrics
    assert logged["test_ten_top1_error"] == result.ten_crop.top1_error
    assert logged["test_single_top1_error"] == result.top1_error


def test_a_sweep_without_a_finished_trial_is_one_line(tmp_path):
    params = imagenet_params(tmp_path, tmp_path / "raw")
    artifacts.write(Path(params.paths.reports) / records.Sweep.FILE, sweep_of([failed_trial(18, "A")]))
    with pytest.raises(UsageError, match="^the sweep has no finished trial$"):
        evaluate.main(["--params", str(params_file(tmp_path, params))])


def params_file(folder: Path, params) -> Path:
    """params as a file, as a stage reads them."""
    import yaml

    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path
