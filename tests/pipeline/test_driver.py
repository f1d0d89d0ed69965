"""Errors before work: what params and the manifest decide is refused before Ray starts, as one
`error:` line and exit code 2, rather than as tracebacks from every Ray worker a minute later.

- `loader.sure_worker_samples`, the shard-order worst case, against every order of small cases;
- `driver.preflight` and its checks, as pure functions;
- `read_manifest` on every kind of malformed manifest;
- the `train` and `tune` commands themselves, with Ray and MLflow left unstarted.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
from itertools import permutations
from pathlib import Path

import pytest
import ray
import torch

import resnet
from pipeline import driver, loader, recipe, shard
from pipeline import params as params_module
from pipeline.errors import UsageError
from pipeline.manifest import MANIFEST, ImageSize, read_manifest
from tests.conftest import REPO

# --- the shard-order worst case ---------------------------------------------------------------


def worst_busiest_worker(counts: list[int], world_size: int, num_workers: int) -> int:
    """By brute force: the fewest samples the busiest loader worker of a rank gets, over every
    shard order an epoch could draw and every rank."""
    return min(
        max(loader.worker_sample_counts(list(order), rank, world_size, num_workers))
        for order in set(permutations(counts))
        for rank in range(world_size)
    )


def small_cases(number: int, seed: int = 0) -> list[tuple[list[int], int, int]]:
    """(counts, ranks, loader workers): up to 7 shards, so that every order can be tried. Sizes
    repeat, as real shards do (full ones, and a few short ones)."""
    rng = random.Random(seed)
    return [
        (
            [rng.choice([0, 1, 2, 3, 5, 8, 10, 10, 10]) for _ in range(rng.randint(1, 7))],
            rng.randint(1, 3),
            rng.randint(0, 4),
        )
        for _ in range(number)
    ]


CASES = small_cases(600)


def test_the_bound_never_exceeds_the_worst_order_and_mostly_meets_it():
    exact = 0
    for counts, world_size, workers in CASES:
        bound = loader.sure_worker_samples(counts, world_size, workers)
        worst = worst_busiest_worker(counts, world_size, workers)
        assert bound <= worst, (counts, world_size, workers)
        exact += bound == worst
    # Tight enough: the check refuses a run that would have worked in few cases (about 1 in 100).
    assert exact >= 0.95 * len(CASES)


def test_a_batch_the_bound_allows_is_made_by_every_rank_in_every_order():
    """Through the loader's own count: at the largest per-rank batch the check accepts, every
    order gives every rank a batch."""
    for counts, world_size, workers in CASES:
        batch = loader.sure_worker_samples(counts, world_size, workers)
        if batch == 0:
            continue
        for order in set(permutations(counts)):
            assert loader.batches_per_epoch(list(order), world_size, workers, [batch] * world_size) >= 1, (
                counts,
                world_size,
                workers,
            )


@pytest.mark.parametrize(
    "kind",
    [
        "one loader worker",  # (a), j = 1: the k smallest shards
        "one shard a worker",  # (b), h = 0: the k-th smallest shard
        "equal shards",  # (a), j = 1: m_0 full shards
    ],
)
def test_the_bound_is_exact_where_its_docstring_says(kind):
    rng = random.Random(1)
    tried = 0
    for counts, world_size, workers in small_cases(600, seed=2):
        k = len(counts) // world_size
        if kind == "one loader worker":
            workers = rng.choice([0, 1])
        elif kind == "one shard a worker" and k > max(workers, 1):
            continue
        elif kind == "equal shards":
            counts = [counts[0]] * len(counts)
        tried += 1
        assert loader.sure_worker_samples(counts, world_size, workers) == worst_busiest_worker(
            counts, world_size, workers
        ), (kind, counts, world_size, workers)
    assert tried > 50


def test_fewer_shards_than_ranks_leaves_a_rank_nothing():
    assert loader.sure_worker_samples([100, 100], 3, 0) == 0


def test_the_bound_takes_imagenets_many_shards():
    # A bound that tried shard orders would never end here (1,282 shards): this one counts them.
    counts = [1000] * 1281 + [167]  # ImageNet's train set at shard.maxcount=1000
    assert loader.sure_worker_samples(counts, 8, 4) == 40 * 1000  # 160 shards a rank, 40 a worker
    assert loader.sure_worker_samples(counts, 1, 1) == sum(counts)


def test_a_shuffle_that_fails_only_at_a_later_epoch_is_refused_up_front():
    """The digits at shard.maxcount=358 (train shards 4 x 358 and 5), 2 ranks, 400 a rank: epoch
    0's order gives every rank a batch, epoch 1's leaves the rank with the short shard and one
    full one (363 samples) without one. Before the check, such a run died at epoch 2."""
    counts = [358, 358, 358, 358, 5]
    shards = [(f"train/shard-{i:06d}.tar", n) for i, n in enumerate(counts)]
    per_epoch = [
        loader.batches_per_epoch([n for _, n in loader.epoch_order(shards, seed=2, epoch=e)], 2, 0, [400, 400])
        for e in range(3)
    ]
    assert per_epoch[0] == 1 and 0 in per_epoch
    with pytest.raises(UsageError, match="is sure of only 363 samples"):
        driver.check_train_batches(counts, 2, 0, 800, "shards")
    driver.check_train_batches(counts, 2, 0, 726, "shards")  # 363 a rank: every order has it
    assert worst_busiest_worker(counts, 2, 0) == 363


# --- the checks of driver.preflight ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (([200, 200], 3, 0, 6), "train: 2 shards in shards for train.num_workers=3 ranks"),
        (([200, 37], 2, 0, 256), "train.batch_size: 256 is more than the 237 train samples"),
        (([200, 200, 200, 37], 2, 0, 512), "is sure of only 237 samples"),  # a rank may get 200 + 37
        (([200, 200, 200, 200], 1, 4, 256), "busiest loader worker (of 4, train.loader_workers=4) is sure of only 200"),
    ],
)
def test_train_batches_refused(args, expected):
    with pytest.raises(UsageError) as info:
        driver.check_train_batches(*args, "shards")
    assert expected in str(info.value)


def test_train_batches_accepted():
    driver.check_train_batches([200, 200, 200, 37], 2, 0, 128, "shards")
    driver.check_train_batches([200, 200, 200, 200], 1, 4, 200, "shards")


def test_val_needs_a_shard_a_rank_and_a_sample():
    driver.check_val_shards([200, 160], 2, "shards")
    driver.check_val_shards([0, 1], 2, "shards")  # a rank with an empty shard evaluates nothing
    with pytest.raises(UsageError, match="^val: 2 shards in shards for train.num_workers=3 ranks"):
        driver.check_val_shards([200, 160], 3, "shards")
    with pytest.raises(UsageError, match="^val: no samples in shards"):
        driver.check_val_shards([0, 0], 2, "shards")


MIXED = ImageSize(min_side=32, max_side=40, uniform=None)


def test_cifar_nets_need_one_image_size_imagenet_nets_take_any():
    with pytest.raises(
        UsageError, match="^model.arch: cifar nets .* the val images in shards have sides from 32 to 40"
    ):
        recipe.check_image_size("cifar", "val", MIXED, 64, "shards")
    recipe.check_image_size("imagenet", "train", MIXED, 64, "shards")
    recipe.check_image_size("cifar", "train", ImageSize(min_side=16, max_side=16, uniform=[16, 16]), 64, "shards")
    recipe.check_image_size("cifar", "train", None, 64, "shards")  # not recorded: nothing to check


def test_cifar_nets_need_more_than_one_value_per_channel_in_training():
    tiny = ImageSize(min_side=4, max_side=4, uniform=[4, 4])
    with pytest.raises(UsageError, match="^train.batch_size: 1 image a rank of 4x4 pixels"):
        recipe.check_image_size("cifar", "train", tiny, 1, "shards")
    recipe.check_image_size("cifar", "train", tiny, 2, "shards")
    recipe.check_image_size("cifar", "val", tiny, 1, "shards")  # evaluation: BatchNorm's running stats
    recipe.check_image_size("cifar", "train", ImageSize(min_side=4, max_side=5, uniform=[5, 4]), 1, "shards")


def test_the_image_size_rule_is_the_nets():
    """The rule above, tried on a CIFAR net: 4x4 with one image fails in training, 5x5 does not."""
    net = resnet.build(resnet.model_name("cifar", 8), shortcut="A", num_classes=10).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.zeros(1, 3, 4, 4))
    net(torch.zeros(1, 3, 5, 4))


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """The digits at shard.maxcount=358: train shards of 358 x 3 and 3, val and test 358 and 2."""
    tmp = tmp_path_factory.mktemp("digits")
    shard.shard(load_params(f"paths.shards={tmp / 'shards'}", "shard.maxcount=358", "shard.workers=1"))
    return tmp / "shards"


def load_params(*overrides: str) -> params_module.Params:
    return params_module.load(REPO / "params.yaml", overrides)


def test_preflight_accepts_the_shard_stages_manifest_with_the_default_params(digit_shards):
    manifest = read_manifest(str(digit_shards))
    assert [s.num_samples for s in manifest.splits["train"].shards] == [358, 358, 358, 3]
    driver.preflight(load_params(f"paths.shards={digit_shards}"), manifest)


def test_preflight_checks_every_world_size_of_an_elastic_run_a_line_for_each_that_cannot_work(digit_shards):
    """The digits' 4 train shards (358, 358, 358, 3) at batch 32: 1 or 2 ranks always make a batch,
    3 or 4 ranks of one shard each may be dealt the 3-sample shard."""
    manifest = read_manifest(str(digit_shards))
    driver.preflight(load_params(f"paths.shards={digit_shards}", "train.num_workers=[1, 2]"), manifest)
    with pytest.raises(UsageError) as refused:
        driver.preflight(load_params(f"paths.shards={digit_shards}", "train.num_workers=[1, 4]"), manifest)
    lines = str(refused.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "with 3 of train.num_workers=[1, 4]",
        "with 4 of train.num_workers=[1, 4]",
    ]
    assert all("is sure of only 3 samples" in line for line in lines)


def test_a_batch_the_world_size_does_not_divide_is_dealt_unequally(digit_shards):
    driver.preflight(
        load_params(f"paths.shards={digit_shards}", "train.num_workers=2", "train.batch_size=33"),
        read_manifest(str(digit_shards)),
    )
    assert loader.batch_shares(33, 2) == [17, 16] and loader.batch_shares(32, 3) == [11, 11, 10]
    with pytest.raises(UsageError, match="^train.batch_size: 2 leaves some of 3 ranks no sample a step"):
        loader.batch_shares(2, 3)


# --- manifest.json ----------------------------------------------------------------------------


def edited(manifest: dict, path: str, value: object = KeyError) -> dict:
    """A copy of `manifest` with the dotted `path` set to `value`, or deleted (KeyError)."""
    out = copy.deepcopy(manifest)
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = out
    for part in parents:
        node = node[part]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("schema", KeyError, "schema: missing key; expected 3"),
        ("schema", 1, "schema 1, expected 3, from an older version; run `python -m pipeline.shard` again"),
        ("schema", 2, "schema 2, expected 3, from an older version; run `python -m pipeline.shard` again"),
        ("schema", 4, "schema: 4, expected 3"),
        ("schema", True, "schema: True, expected 3"),
        ("classes", KeyError, "classes: missing key"),
        ("classes", "0123456789", "classes: Input should be a valid list (got '0123456789')"),
        ("classes", [], "classes: List should have at least 1 item"),
        ("mean", [0.5], "mean: List should have at least 3 items"),
        ("source", KeyError, "source: missing key"),
        ("splits", KeyError, "splits: missing key"),
        ("splits", [], "splits: Input should be a valid dictionary"),
        ("splits.val", KeyError, "splits: no 'val' split"),
        ("splits.test", KeyError, "splits: no 'test' split; the shard stage writes train, val and test"),
        ("splits.train.shards", KeyError, "splits.train.shards: missing key"),
        ("splits.train.shards", {"name": "x"}, "splits.train.shards: Input should be a valid list"),
        ("splits.train.shards.3.name", KeyError, "splits.train.shards.3.name: missing key"),
        ("splits.train.shards.3.name", "", "splits.train.shards.3.name: String should match pattern"),
        ("splits.train.shards.3.name", "../../etc/x.tar", "splits.train.shards.3.name: String should match pattern"),
        ("splits.train.shards.3.name", "/etc/x.tar", "splits.train.shards.3.name: String should match pattern"),
        ("splits.train.shards.3.num_samples", KeyError, "splits.train.shards.3.num_samples: missing key"),
        ("splits.train.shards.3.num_samples", -1, "num_samples: Input should be greater than or equal to 0 (got -1)"),
        ("splits.train.shards.3.num_samples", "358", "num_samples: Input should be a valid integer (got '358')"),
        ("splits.train.shards.3.num_samples", 358.0, "num_samples: Input should be a valid integer (got 358.0)"),
        ("splits.val.num_samples", True, "splits.val.num_samples: Input should be a valid integer (got True)"),
        ("splits.val.image_size.uniform", [16], "splits.val.image_size.uniform: List should have at least 2 items"),
        ("splits.val.image_size.min_side", 99, "splits.val.image_size: min_side 99 is over max_side 16"),
        ("splits.val.image_size", KeyError, "splits.val.image_size: missing key"),
        ("splits.val.skipped", KeyError, "splits.val.skipped: missing key"),
        ("splits.val.shards.0.extra", 1, "splits.val.shards.0.extra: unknown key"),
        ("splits.train.rejected", [{"source": "a.jpg"}], "splits.train.rejected.0.reason: missing key"),
        ("splits.train.converted", [{"source": "a.png"}], "splits.train.converted.0.from: missing key"),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_file_and_key(digit_shards, tmp_path, path, value, expected):
    manifest = json.loads((digit_shards / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps(edited(manifest, path, value)))
    with pytest.raises(UsageError) as info:
        read_manifest(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / MANIFEST}: ") and expected in message
    assert "\n" not in message


def test_manifests_from_before_image_sizes_were_always_recorded_are_refused(digit_shards, tmp_path):
    """Schema 2 left image sizes out at will; schema 3 records them, null for a split without
    images. A schema 2 manifest is refused as an older version's, and a schema 3 one without
    them names the key."""
    manifest = json.loads((digit_shards / MANIFEST).read_text())
    for split in ("train", "val"):
        manifest = edited(manifest, f"splits.{split}.image_size")
    url = tmp_path / MANIFEST
    for schema, expected in (
        (2, f"{url}: schema 2, expected 3, from an older version; run `python -m pipeline.shard` again"),
        (3, f"{url}: splits.train.image_size: missing key"),
    ):
        url.write_text(json.dumps(edited(manifest, "schema", schema)))
        with pytest.raises(UsageError) as info:
            read_manifest(str(tmp_path))
        assert str(info.value) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("folder", "manifest.json: a folder, not a file"),
        (bytes(range(256)), "manifest.json: not a text file (byte 128 is not UTF-8)"),
        (b"", "manifest.json: not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (b"{'schema': 1}", "manifest.json: not valid JSON (Expecting property name"),
        (b"[" * 100_000, "manifest.json: not valid JSON (maximum recursion depth exceeded"),
        (b"[1, 2]", "manifest.json: a JSON list, expected an object"),
    ],
    ids=["folder", "binary", "empty", "not-json", "nested-too-deep", "list"],
)
def test_an_unreadable_manifest_is_one_line(tmp_path, content, expected):
    if content == "folder":
        (tmp_path / MANIFEST).mkdir()
    else:
        (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(UsageError) as info:
        read_manifest(str(tmp_path))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_shards_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "shards").write_text("")
    with pytest.raises(UsageError) as info:
        read_manifest(str(tmp_path / "shards"))
    assert str(info.value) == f"{tmp_path / 'shards' / MANIFEST}: {tmp_path / 'shards'} is a file, not a folder"


# --- the stages, run as commands --------------------------------------------------------------


def manifest_variant(digit_shards: Path, folder: Path, path: str, value: object = KeyError) -> Path:
    """A shards folder holding only an edited manifest: the checks never open a shard."""
    folder.mkdir()
    manifest = json.loads((digit_shards / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(edited(manifest, path, value)))
    return folder


def run_in(tmp_path: Path, monkeypatch, run_stage, stage: str, *args: str) -> subprocess.CompletedProcess:
    """`run_stage` with every output, MLflow's store included, in tmp_path, so that the test can
    tell none was written."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    outputs = [f"paths.{key}={tmp_path / key}" for key in ("ray_storage", "reports", "metrics")]
    return run_stage(stage, *args, *[x for o in outputs for x in ("--set", o)])


def assert_refused_before_work(result: subprocess.CompletedProcess, tmp_path: Path, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]
    assert not ray.is_initialized(), "Ray was started"
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow run was opened"


@pytest.mark.parametrize("stage", ["train", "tune"])
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.num_workers=[2, 3]"], "with 3 of train.num_workers=[2, 3]: train.batch_size: 32 makes batches of 11"),
        (
            ["train.num_workers=2", "train.batch_size=800", "train.seed=2"],
            "some epoch's shard order may leave a rank without one",
        ),
    ],
    ids=["elastic-range", "shuffle-dependent-batch"],
)
def test_stage_refuses_batches_before_ray(digit_shards, tmp_path, monkeypatch, run_stage, stage, overrides, expected):
    sets = [x for o in [f"paths.shards={digit_shards}", *overrides] for x in ("--set", o)]
    assert_refused_before_work(run_in(tmp_path, monkeypatch, run_stage, stage, *sets), tmp_path, expected)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("splits", KeyError, "manifest.json: splits: missing key"),
        ("splits.train.image_size", MIXED.model_dump(), "model.arch: cifar nets take images whole"),
    ],
    ids=["manifest-without-splits", "mixed-image-sizes"],
)
def test_train_refuses_the_data_before_ray(digit_shards, tmp_path, monkeypatch, run_stage, path, value, expected):
    shards = manifest_variant(digit_shards, tmp_path / "shards", path, value)
    result = run_in(tmp_path, monkeypatch, run_stage, "train", "--set", f"paths.shards={shards}")
    assert_refused_before_work(result, tmp_path, expected)


def test_train_refuses_a_manifest_that_is_a_folder(tmp_path, monkeypatch, run_stage):
    (tmp_path / "shards" / MANIFEST).mkdir(parents=True)
    result = run_in(tmp_path, monkeypatch, run_stage, "train", "--set", f"paths.shards={tmp_path / 'shards'}")
    assert_refused_before_work(result, tmp_path, "manifest.json: a folder, not a file")


def test_train_refuses_a_params_folder(tmp_path, monkeypatch, run_stage):
    result = run_in(tmp_path, monkeypatch, run_stage, "train", "--params", str(tmp_path))
    assert_refused_before_work(result, tmp_path, f"{tmp_path}: a folder, not a params file")
