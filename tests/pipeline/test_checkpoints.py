"""What a checkpoint holds (`CheckpointState`), saved and loaded as tensors and plain data only,
and the net rebuilt from it."""

from __future__ import annotations

import pytest
import torch

from pipeline import checkpoints
from pipeline.errors import UsageError
from pipeline.records import EpochMetrics

ARGS = checkpoints.ModelArgs(name="cifar_resnet8", shortcut="B", num_classes=10, bottleneck="v1", zero_init_residual=False)


def state_of(net: torch.nn.Module) -> checkpoints.CheckpointState:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.zeros(2, 3, 16, 16)).sum().backward()
    optimizer.step()  # a momentum buffer per parameter: the optimizer's state has tensors
    epoch = EpochMetrics(
        epoch=3, train_loss=0.5, train_top1_error=0.1, val_top1_error=0.2, val_top5_error=0.0, val_loss=0.6,
        lr=0.1, images_per_s=100.0, epoch_time_s=1.0, world_size=1, steps_s=1.0, goodput=0.5, redone_steps=0,
    )  # fmt: skip
    return checkpoints.CheckpointState(
        model_args=ARGS, model=net.state_dict(), optimizer=optimizer.state_dict(), schedule={"milestones": [2, 3]},
        epoch=3, history=[epoch], mean=[0.1, 0.2, 0.3],
    )  # fmt: skip


def test_a_checkpoint_loads_as_it_was_saved_and_rebuilds_the_same_net(tmp_path):
    torch.manual_seed(0)
    net = ARGS.build()
    state = state_of(net)
    checkpoints.save(tmp_path, state)
    loaded = checkpoints.load(tmp_path)
    assert (loaded.model_args, loaded.epoch, loaded.history, loaded.mean) == (ARGS, 3, state.history, state.mean)
    assert loaded.model.keys() == state.model.keys()
    assert all(torch.equal(loaded.model[k], state.model[k]) for k in state.model)
    assert loaded.optimizer["state"][0]["momentum_buffer"].shape == next(net.parameters()).shape
    rebuilt = checkpoints.model_from_checkpoint(tmp_path)
    images = torch.randn(4, 3, 16, 16)
    assert torch.equal(rebuilt(images), net.eval()(images)) and not rebuilt.training


def test_a_checkpoint_of_another_version_or_of_anything_else_is_one_line(tmp_path):
    torch.save({"model": {}, "epoch": 1}, tmp_path / checkpoints.CHECKPOINT_FILE)  # from before CheckpointState
    with pytest.raises(UsageError, match="not a checkpoint of this version of the pipeline; train it again$"):
        checkpoints.load(tmp_path)


def test_a_checkpoint_that_holds_code_is_refused_before_it_runs(tmp_path):
    """torch.load(weights_only=True): a pickled object (which could run anything) is an error."""

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"schema_version": 1, "model": Payload()}, tmp_path / checkpoints.CHECKPOINT_FILE)
    with pytest.raises(UsageError, match=r"checkpoint\.pt: holds more than tensors and plain data; refused unread$"):
        checkpoints.load(tmp_path)
