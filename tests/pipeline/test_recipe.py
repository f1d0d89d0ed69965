"""The paper's recipe as pure functions."""

from __future__ import annotations

import pytest

from pipeline import params as params_module
from pipeline import recipe
from pipeline.cli import UsageError
from tests.conftest import REPO


def load(*overrides):
    return params_module.load(REPO / "params.yaml", overrides)


def test_global_batch_splits_evenly_or_is_an_error():
    assert recipe.per_worker_batch(128, 2) == 64
    with pytest.raises(UsageError, match="does not split evenly over train.num_workers=3"):
        recipe.per_worker_batch(128, 3)


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


def test_plateau_schedule_divides_when_val_error_stalls():
    s = recipe.schedule(load("train.plateau_patience=2"))
    for val in (0.5, 0.4, 0.4, 0.41):
        s.step(train_error=0.3, val_error=val)
    assert s.lr(10) == pytest.approx(0.01)
    restored = recipe.schedule(load("train.plateau_patience=2"))
    restored.load_state_dict(s.state_dict())
    assert restored.lr(10) == s.lr(10) and restored.best_val_error == 0.4
