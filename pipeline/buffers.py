"""Batch buffers in shared memory that DataLoader workers fill again and again.

Contract: a worker's `collate` stacks a batch into one of its own buffers that no batch still in
use occupies; the training process calls `received` for each batch it takes and `release` after
each step, and a buffer is reused only once no tensor (nor any view of one) holds its batch.
"""

from __future__ import annotations

import math

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import default_collate, get_worker_info


class BatchBuffers:
    """Why: DataLoader's default collate stacks every batch into a new shared-memory segment,
    and the first write to each 4 KiB page of a new segment is a page fault. Reusing a few
    segments per worker avoids those faults (BENCHMARKS.md, `worker_collate_ms`, measures the saving).

    How: shared flags say which buffers are busy. A worker takes a free buffer (mapping a new
    one while it has fewer than `per_worker`), marks it busy and stacks the batch into it; with
    none free it falls back to a fresh segment, as DataLoader does. The training process keeps a
    weak reference to each batch's storage, and once the reference is dead (no tensor, nor any
    view of one, holds the batch) it clears the buffer's flag.
    """

    def __init__(self, num_workers: int, per_worker: int) -> None:
        self.num_workers, self.per_worker = num_workers, per_worker
        self.busy = self._new_flags()
        self.storages: dict[int, torch.UntypedStorage] = {}  # in a worker: its buffers
        self.held: list[tuple[torch.Tensor, int, StorageWeakRef]] = []  # in the training process

    def _new_flags(self) -> torch.Tensor:
        return torch.zeros(self.num_workers, self.per_worker, dtype=torch.uint8).share_memory_()

    def __getstate__(self) -> dict[str, object]:
        """For workers started by pickling (spawn, forkserver): the shared flags, none of the
        training process's weak references, which mean nothing in another process."""
        return {**self.__dict__, "storages": {}, "held": []}

    def start_pass(self) -> None:
        """Before a pass's workers start: fresh flags, which the batches still held from an
        earlier pass, whose buffers belonged to workers that are gone, never touch."""
        self.busy = self._new_flags()

    def collate(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """In a worker: (images, labels, buffer), the buffer -1 for a batch in a segment of its own."""
        images = [image for image, _ in samples]
        labels = torch.tensor([label for _, label in samples])
        shape = (len(images), *images[0].shape)
        numel = math.prod(shape)
        worker = get_worker_info().id
        index = self._take_free(worker, numel * images[0].element_size())
        if index < 0:
            return default_collate(images), labels, -1
        out = torch.empty(0, dtype=images[0].dtype).set_(self.storages[index])[:numel].view(shape)
        torch.stack(images, out=out)
        return out, labels, worker * self.per_worker + index

    def _take_free(self, worker: int, nbytes: int) -> int:
        for index in range(self.per_worker):
            if not self.busy[worker, index]:
                if index not in self.storages or self.storages[index].nbytes() < nbytes:
                    self.storages[index] = torch.UntypedStorage(nbytes).share_memory_()
                self.busy[worker, index] = 1
                return index
        return -1

    def received(self, images: torch.Tensor, buffer: int) -> None:
        """In the training process: a batch arrived in `buffer`; free it once nothing holds it."""
        if buffer >= 0:
            self.held.append((self.busy, buffer, StorageWeakRef(images.untyped_storage())))

    def release(self) -> None:
        still_held = []
        for busy, buffer, batch in self.held:
            if batch.expired():
                busy.view(-1)[buffer] = 0
            else:
                still_held.append((busy, buffer, batch))
        self.held = still_held
