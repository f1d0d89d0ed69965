"""A training worker's epoch, without Ray: one rank in a real gloo process group, its net in
DDP as `ray.train.torch.prepare_model` wraps it, on the digit shards. (The whole worker under
Ray Train: tests/integration/test_train.py.)"""

from __future__ import annotations

import copy
import socket
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline import checkpoints, recipe, worker
from pipeline.manifest import read_manifest
from pipeline.records import EpochMetrics
from tests.helpers import digits_loader, make_params


def one_rank_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def rank_state(tmp_path: Path, shards: Path, ddp: bool, *overrides: str) -> worker.RankState:
    """What `worker.set_up` makes on rank 0 of 1, on the CPU."""
    params = make_params(
        tmp_path, f"paths.shards={shards}", "model.depth=8", "train.batch_size=64", "train.epochs=2", *overrides
    )
    manifest = read_manifest(params.paths.shards)
    torch.manual_seed(params.train.seed)
    net = checkpoints.build_model(params, len(manifest.classes))
    model = DistributedDataParallel(net) if ddp else net
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.base_lr(params), momentum=0.9, weight_decay=1e-4)
    setup = worker.RunSetup(params=params, mlflow_run_id="r", tracking_uri="sqlite:///unused.db", say_epochs=False)
    return worker.RankState(
        params, setup, 0, 1, torch.device("cpu"), manifest, net, model, optimizer, recipe.schedule(params)
    )


def test_one_epoch_in_a_one_rank_gloo_group_is_the_epoch_without_one(tmp_path, digit_shards):
    """DDP's gradient all-reduce and the metrics' `all_reduce_sum` over one rank change nothing."""
    one_rank_group()
    try:
        in_group = worker.train_epoch(rank_state(tmp_path, digit_shards, ddp=True), 0)
    finally:
        dist.destroy_process_group()
    alone = worker.train_epoch(rank_state(tmp_path, digit_shards, ddp=False), 0)

    assert isinstance(in_group, EpochMetrics) and in_group.epoch == 0
    for key in ("train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "val_loss", "lr"):
        assert getattr(in_group, key) == pytest.approx(getattr(alone, key), rel=1e-5), key
    assert 0 < in_group.val_top5_error <= in_group.val_top1_error < 1 and in_group.train_loss > 0
    assert in_group.images_per_s > 0 and in_group.epoch_time_s > 0


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_an_epoch_resumed_from_a_step_checkpoint_ends_as_the_epoch_without_a_stop(
    tmp_path, digit_shards, monkeypatch, loader_workers
):
    """Every 5 steps a step checkpoint; resuming from the second gives the weights, optimizer
    state and epoch sums of the epoch that never stopped (one process: to the bit)."""
    overrides = ["train.checkpoint_every_steps=5", f"train.loader_workers={loader_workers}"]
    saved = []

    def keep(state, epoch_done, report, progress=None):  # rank 0's checkpoint, as save_and_report writes it
        saved.append((copy.deepcopy(state.net.state_dict()), copy.deepcopy(state.optimizer.state_dict()), progress))

    monkeypatch.setattr(worker, "save_and_report", keep)
    whole = rank_state(tmp_path, digit_shards, False, *overrides)
    uninterrupted = worker.train_epoch(whole, 1)
    steps = len(worker.epoch_batches(whole, "train", 1))
    assert [progress.steps for _, _, progress in saved] == list(range(5, steps, 5))  # the end has its own

    net, optimizer, progress = saved[1]
    resumed = rank_state(tmp_path, digit_shards, False, *overrides)
    resumed.net.load_state_dict(net)
    resumed.optimizer.load_state_dict(optimizer)
    resumed.progress = progress
    after_resume = worker.train_epoch(resumed, 1)

    for key, value in whole.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key
    timings = {"images_per_s", "epoch_time_s", "steps_s", "goodput"}
    assert after_resume.model_dump(exclude=timings) == uninterrupted.model_dump(exclude=timings)


def test_the_epoch_line_says_what_a_person_needs():
    metrics = EpochMetrics(
        epoch=2, train_loss=0.5, train_top1_error=0.125, val_top1_error=0.25, val_top5_error=0.0625, val_loss=0.7,
        lr=0.01, images_per_s=1234.4, epoch_time_s=1.26, world_size=2, steps_s=1.0, goodput=0.5, redone_steps=0,
    )  # fmt: skip
    assert worker.epoch_line(metrics, 45) == (
        "epoch 3/45  lr 0.01  train loss 0.5000  train err 12.50%  val err 25.00% (top-5 6.25%)  1234 img/s  1.3 s"
        "  2 workers"
    )


def test_a_step_in_pieces_of_max_worker_batch_makes_the_step_of_the_whole_batch(digit_shards):
    """Gradient accumulation: pieces weighted by their part of the global batch add up to the
    whole batch's mean-loss gradient (a net without BatchNorm, whose statistics would differ)."""
    manifest = read_manifest(str(digit_shards))

    def one_epoch(shape: worker.StepShape) -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 3, 10))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        batches = digits_loader(digit_shards, epoch=1, num_workers=0, batch_size=32)
        sums = worker.run_epoch(
            net, batches, optimizer, torch.device("cpu"), manifest.mean, False, nullcontext(), lambda _: 0.1,
            worker.EpochSums(), shape,
        )  # fmt: skip
        assert sums.seen == len(batches) * 32
        return net

    whole = one_epoch(worker.StepShape(world_size=1, global_batch=32))
    in_pieces = one_epoch(worker.StepShape(world_size=1, global_batch=32, max_piece=10))  # 11, 11, 10
    for (key, a), b in zip(whole.state_dict().items(), in_pieces.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), key
    assert worker.StepShape(world_size=2, global_batch=33).weight(17) == 34 / 33  # rank 0's share of 33 over 2
