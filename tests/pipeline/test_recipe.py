"""The paper's recipe as pure functions."""

from __future__ import annotations

import pytest

from pipeline import params as params_module
from pipeline import recipe
from tests.conftest import REPO


def load(*overrides):
    """The paper's CIFAR recipe (batch 128, no linear warm-up), then the overrides."""
    paper = ("train.batch_size=128", "train.num_workers=2", "train.warmup_epochs=0")
    return params_module.load(REPO / "params.yaml", [*paper, *overrides])


def test_a_share_above_max_worker_batch_trains_in_pieces_that_add_up_to_it():
    assert recipe.micro_batches(64, None) == [64]
    assert recipe.micro_batches(64, 64) == [64]
    assert recipe.micro_batches(64, 32) == [32, 32]
    assert recipe.micro_batches(65, 32) == [22, 22, 21]
    assert recipe.micro_batches(256, 100) == [86, 85, 85]


def test_lr_scales_linearly_with_the_global_batch():
    assert recipe.base_lr(load()) == pytest.approx(0.1)  # CIFAR: 0.1 at 128
    assert recipe.base_lr(load("train.batch_size=256")) == pytest.approx(0.2)
    imagenet = load("model.arch=imagenet", "model.depth=50", "train.batch_size=256")
    assert recipe.base_lr(imagenet) == pytest.approx(0.1)  # ImageNet: 0.1 at 256


def test_cifar_milestones_at_half_and_three_quarters():
    # The paper: 64k iterations, lr / 10 at 32k and 48k.
    assert recipe.milestone_epochs(160, [0.5, 0.75]) == [80, 120]
    s = recipe.schedule(load("train.epochs=160"))
    assert [s.lr(e) for e in (0, 79, 80, 119, 120, 159)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_deep_nets_warm_up_until_train_error_below_80_percent():
    s = recipe.schedule(load("model.depth=110"))
    assert s.lr(0) == pytest.approx(0.01)
    s.step(train_error=0.85, val_error=0.9)
    assert s.lr(1) == pytest.approx(0.01)
    s.step(train_error=0.75, val_error=0.8)
    assert s.lr(2) == pytest.approx(0.1)
    assert not recipe.schedule(load("model.depth=56")).warmup


def test_the_paper_warm_up_is_for_deep_cifar_nets_only():
    """Sec. 4.2 describes it for ResNet-110 on CIFAR-10; the ImageNet nets train without it."""
    assert recipe.schedule(load("model.depth=110")).warmup
    assert recipe.schedule(load("model.depth=1202")).warmup
    for depth in (101, 152):
        assert not recipe.schedule(load("model.arch=imagenet", f"model.depth={depth}")).warmup


def test_linear_warm_up_rises_per_step_then_follows_the_milestones():
    s = recipe.schedule(load("train.warmup_epochs=2", "train.epochs=8"))  # milestones at epochs 4, 6
    assert s.lr(0, 0.25) == pytest.approx(0.1 * 0.125)
    assert s.lr(0, 1.0) == pytest.approx(0.05)
    assert s.lr(1, 0.5) == pytest.approx(0.075)
    assert [s.lr(e) for e in (1, 2, 3, 4, 6)] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])
    assert recipe.schedule(load()).lr(0, 0.01) == pytest.approx(0.1)  # warmup_epochs=0: none
    assert recipe.schedule(params_module.load(REPO / "params.yaml")).lr(0, 0.5) == pytest.approx(0.025 * 0.5)


def test_plateau_schedule_divides_when_val_error_stalls():
    s = recipe.schedule(load("train.plateau_patience=2"))
    for val in (0.5, 0.4, 0.4, 0.41):
        s.step(train_error=0.3, val_error=val)
    assert s.lr(10) == pytest.approx(0.01)
    restored = recipe.schedule(load("train.plateau_patience=2"))
    restored.load_state_dict(s.state_dict())
    assert restored.lr(10) == s.lr(10) and restored.best_val_error == 0.4
