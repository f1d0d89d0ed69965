"""Shared-memory batch buffers: reused, and never under a batch still held."""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from pipeline.buffers import BatchBuffers
from tests.helpers import digits_loader


def arrivals(batches, hold: str) -> list[torch.Tensor]:
    """Each batch's images as they arrive, and what the caller still sees of them at the end:
    `hold` "nothing" (a copy kept, the batch dropped), "batch" or "view" (a slice of it kept)."""
    arrived, kept = [], []
    for x, _ in batches:
        arrived.append(x.clone())
        kept.append(x.clone() if hold == "nothing" else x if hold == "batch" else x[1:3])
    return arrived, kept


@pytest.mark.parametrize("hold", ["nothing", "batch", "view"])
def test_reused_batch_buffers_never_overwrite_a_batch_still_held(digit_shards, single_process, monkeypatch, hold):
    """Workers refill shared buffers; the batches equal DataLoader's fresh ones, and a batch (or
    a view of one) the caller keeps is never refilled under it."""
    received = []
    record = BatchBuffers.received
    monkeypatch.setattr(BatchBuffers, "received", lambda self, x, i: received.append(i) or record(self, x, i))
    arrived, kept = arrivals(digits_loader(digit_shards, epoch=3), hold)
    buffer_ids = [i for i in received if i >= 0]
    if hold == "nothing":
        assert len(set(buffer_ids)) < len(buffer_ids)  # buffers were refilled
    for a, k in zip(arrived, kept, strict=True):
        assert torch.equal(a[1:3] if hold == "view" else a, k)

    monkeypatch.setattr(BatchBuffers, "_take_free", lambda self, worker, nbytes: -1)  # DataLoader's own
    fresh, _ = arrivals(digits_loader(digit_shards, epoch=3), "batch")
    assert len(fresh) == len(arrived) and all(torch.equal(a, f) for a, f in zip(arrived, fresh, strict=True))


def test_batch_buffers_reach_a_spawned_worker_without_the_trainers_references():
    buffers = BatchBuffers(num_workers=2, per_worker=4)
    held = torch.zeros(8)
    buffers.received(held, 3)
    copy = ForkingPickler.loads(ForkingPickler.dumps(buffers))
    assert copy.held == [] and copy.storages == {}
    copy.busy[0, 2] = 1
    assert buffers.busy[0, 2] == 1  # the same shared flags
