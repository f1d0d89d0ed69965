"""Stream the shards to a training process with WebDataset, on one rank or many.

Each epoch the train shards are shuffled with a seed shared by every rank, then split by rank
(rank r of W takes shards r, r+W, ..., as `wds.split_by_node` would) and by DataLoader worker
(`wds.split_by_worker`), and samples are shuffled in a buffer seeded per (epoch, rank, worker).
Every DDP rank must run the same number of steps, or the ranks hang in all-reduce when one runs
out of data first; the manifest tells how many samples each worker will read, so each rank
stops at the number of full batches the poorest rank can make (`batches_per_epoch`). What the
other ranks skip this epoch, another shard order brings next epoch. Each DataLoader worker
decodes only its share of those batches (`worker_batch_quotas`).

An epoch resumes mid-way exactly (`Resume`, from a step checkpoint): every worker reads its
samples again up to where the checkpoint was taken, without decoding them, then takes back the
torch RNG state it had there (the random crops are drawn from it), and the DataLoader's turn
starts at the worker whose batch came next. The batches that follow are those an uninterrupted
run makes.

Samples are decoded from their `.jpg` and `.cls` members only: no member is ever unpickled.
Shards may be local paths or `s3://` (any fsspec URL): WebDataset opens those through fsspec.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline.buffers import BatchBuffers
from pipeline.errors import UsageError
from pipeline.manifest import Manifest, read_manifest
from pipeline.tars import tar_samples, whole_shards
from pipeline.transforms import Transform

SHUFFLE_BUFFER = 1000


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A rank's seed for an epoch (its DataLoader's generator, and the training process's torch
    RNG): the same on every run of the same params. In [0, 2**31): a Generator's seed range."""
    return hash((seed, epoch, rank)) % 2**31


def epoch_order(shards: list[tuple[str, int]], seed: int, epoch: int) -> list[tuple[str, int]]:
    """The same shuffled order on every rank, another one each epoch."""
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def worker_sample_counts(counts: list[int], rank: int, world_size: int, num_workers: int) -> list[int]:
    """Samples each DataLoader worker of `rank` reads: WebDataset's split_by_node, then split_by_worker."""
    mine = counts[rank::world_size]
    workers = max(num_workers, 1)
    return [sum(mine[w::workers]) for w in range(workers)]


def batch_shares(global_batch: int, world_size: int) -> list[int]:
    """Each rank's part of a step's global batch: equal where the world size divides it, else the
    first ranks take one more (the ranks weigh their losses by their shares: pipeline.worker)."""
    if global_batch < world_size:
        raise UsageError(f"train.batch_size: {global_batch} leaves some of {world_size} ranks no sample a step")
    return [global_batch // world_size + (rank < global_batch % world_size) for rank in range(world_size)]


def batches_per_epoch(counts: list[int], world_size: int, num_workers: int, shares: list[int]) -> int:
    """Full batches the poorest rank can make (rank r's of `shares[r]` samples); each worker
    batches its own samples."""
    return min(
        sum(n // shares[rank] for n in worker_sample_counts(counts, rank, world_size, num_workers))
        for rank in range(world_size)
    )


def sure_worker_samples(counts: list[int], world_size: int, num_workers: int) -> int:
    """Samples that the busiest DataLoader worker of every rank is sure to read, whatever shard
    order an epoch draws: a lower bound on the worst case over all orders. Each worker batches
    its own samples, so if this is at least the per-rank batch, every rank makes a full batch in
    every epoch (`batches_per_epoch` >= 1) and none fails at epoch 5 for an unlucky shuffle.

    Why it is a lower bound. Sort the counts: s_1 <= ... <= s_n. An epoch's order deals its p-th
    shard to rank p mod W, so a rank gets k = floor(n/W) shards, or one more; the rank's i-th
    shard goes to its worker i mod L (L = max(num_workers, 1)), so worker w holds
    m_w = ceil((k - w) / L) of the first k, with m_0 >= m_1 >= ..., and g = min(k, L) workers
    hold any. A rank with k + 1 shards deals its first k as a k-shard rank does and the extra
    shard only adds samples, so a bound for every k-shard rank holds for every rank. Any k
    shards of a rank, sorted, t_1 <= ... <= t_k, have t_i >= s_i (the i-th smallest of some of
    the counts is at least the i-th smallest of all). Then the busiest worker of the rank holds
    at least:
      (a) for each j <= g: a j-th of what the j workers with the most shards hold together,
          which is M_j = m_0 + ... + m_{j-1} shards, so at least s_1 + ... + s_{M_j} samples
          (a j-th rounded up, as samples are whole);
      (b) for each h >= 0 with g*h + 1 <= k: among the rank's g*h + 1 largest shards, h + 1
          share a worker (pigeonhole over g workers), together at least
          s_{k-gh} + ... + s_{k-gh+h}; that worker holds c >= h + 1 shards (c the smallest m_w
          that is), and its other c - h - 1 hold at least s_1 + ... + s_{c-h-1}.
    The bound is the largest of these. It is exact (some order reaches it, by dealing the k
    smallest shards to a rank with k) when L = 1 (a, j = 1: s_1 + ... + s_k), when k <= L (b,
    h = 0: s_k, one shard a worker) and when the shards are all one size (a, j = 1: m_0 * s);
    elsewhere it may fall short of the true worst case by a little, so the check it makes is
    sufficient rather than necessary. tests/pipeline/test_driver.py compares it with every
    order of small cases. k = 0 (fewer shards than ranks) leaves a rank nothing: 0.
    """
    workers = max(num_workers, 1)
    s = sorted(counts)
    k = len(s) // world_size
    if k == 0:
        return 0
    m = [len(range(w, k, workers)) for w in range(min(k, workers))]  # shards per worker, descending
    g = len(m)
    prefix = [0]
    for count in s:
        prefix.append(prefix[-1] + count)  # prefix[i] = s_1 + ... + s_i

    best, held = 0, 0
    for j in range(1, g + 1):  # (a)
        held += m[j - 1]
        best = max(best, -(-prefix[held] // j))
    for h in range(m[0]):  # (b)
        if g * h + 1 > k:
            break
        c = m[-1] if m[-1] >= h + 1 else m[0]  # m holds at most two sizes, m[0] and m[0] - 1
        shared = prefix[k - g * h + h] - prefix[k - g * h - 1]
        best = max(best, shared + prefix[c - h - 1])
    return best


def worker_batch_quotas(counts: list[int], batch_size: int, num_batches: int) -> list[int]:
    """How many of the rank's `num_batches` each worker makes, from its sample `counts`: one
    batch per worker in turn, as DataLoader asks them, skipping a worker that has no full batch left."""
    if num_batches > sum(count // batch_size for count in counts):
        raise ValueError(f"{num_batches} batches of {batch_size} from workers with {counts} samples")
    quotas = [0] * len(counts)
    while sum(quotas) < num_batches:
        for worker, count in enumerate(counts):
            if sum(quotas) < num_batches and (quotas[worker] + 1) * batch_size <= count:
                quotas[worker] += 1
    return quotas


def turns(quotas: list[int]) -> list[int]:
    """The worker that makes each of a rank's batches, in DataLoader's order: one from each
    worker in turn, a worker with its quota made skipped."""
    order, made, turn = [], [0] * len(quotas), 0
    while len(order) < sum(quotas):
        if made[turn] < quotas[turn]:
            made[turn] += 1
            order.append(turn)
        turn = (turn + 1) % len(quotas)
    return order


def round_robin(quotas: list[int], steps: int) -> tuple[list[int], int]:
    """After `steps` batches taken in DataLoader's order (`turns`): the batches each worker
    made, and the worker whose turn is next."""
    if steps > sum(quotas):
        raise ValueError(f"{steps} batches taken from workers with quotas {quotas}")
    taken = turns(quotas)[:steps]
    return [taken.count(worker) for worker in range(len(quotas))], (taken[-1] + 1) % len(quotas) if taken else 0


@dataclass(frozen=True)
class Resume:
    """Where a rank's train loader was when a step checkpoint was taken: batches taken this
    epoch, and each loader worker's torch RNG state after its last batch taken (None: it had
    made none). With no loader workers the training process loads, and its own RNG state, which
    the checkpoint keeps, covers the transforms.

    `replay_deal`: set when the epoch's batches were dealt for another number of ranks, or
    were being replayed already: (ranks, loader workers) they were dealt for at the epoch's
    start. The rest of the epoch is then replayed (`Replay`), every remaining sample once."""

    steps: int
    worker_rng: list[bytes | None] = field(default_factory=list)
    replay_deal: tuple[int, int] | None = None


def loader_worker(offset: int) -> int:
    """The worker this DataLoader process plays: its id, turned by `offset` when an epoch
    resumes at another worker's turn (DataLoader starts its turns at process 0)."""
    info = get_worker_info()
    return (info.id + offset) % info.num_workers if info else 0


def split_by_worker(urls: Iterator[dict], offset: int) -> Iterator[dict]:
    """`wds.split_by_worker`, by the worker this process plays."""
    info = get_worker_info()
    return islice(urls, loader_worker(offset), None, info.num_workers) if info else urls


def decode(sample: dict[str, bytes | str], transform: Transform, keyed: bool = False) -> tuple:
    """(image, label), and the sample's key (its shard's name and `__key__`) if `keyed`."""
    try:
        jpeg, label = sample["jpg"], int(sample["cls"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{sample.get('__url__')}: sample {sample.get('__key__')} lacks a .jpg or an integer .cls"
        ) from None
    try:
        image = transform(jpeg)
    except ValueError as error:  # jpegcrop's, with libjpeg's reason
        raise ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {error}") from None
    return (image, label, sample_key(sample)) if keyed else (image, label)


def sample_key(sample: dict) -> str:
    return f"{Path(str(sample['__url__'])).name}/{sample['__key__']}"


def split_by_rank(urls: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """`wds.split_by_node` with the rank fixed when the pipeline is built: split_by_node asks
    torch.distributed from inside the DataLoader worker, where the process group of the
    training process is not initialised, so every rank would read every shard."""
    return islice(urls, rank, None, world_size)


def seeded_shuffle(
    samples: Iterator[dict], seed: int, epoch: int, rank: int, bufsize: int, worker: int
) -> Iterator[dict]:
    """A shuffle buffer whose order is a function of (seed, epoch, rank, loader worker)."""
    rng = random.Random(f"samples:{seed}:{epoch}:{rank}:{worker}")
    return wds.shuffle(bufsize, min(bufsize, 100), rng=rng)(samples)


def shuffled(samples: Iterator[dict], seed: int, epoch: int, rank: int, bufsize: int, offset: int) -> Iterator[dict]:
    """`seeded_shuffle` in a DataLoader process, as the worker it plays."""
    return seeded_shuffle(samples, seed, epoch, rank, bufsize, loader_worker(offset))


def take_quota(samples: Iterator[dict], quotas: list[int], batch_size: int, offset: int) -> Iterator[dict]:
    """A worker's share of the epoch's batches: it decodes no sample that no batch will use, and
    is done, not mid-batch, when the training process has its last batch."""
    return islice(samples, quotas[loader_worker(offset)] * batch_size)


def skip_made(
    samples: Iterator[dict], made: list[int], worker_rng: list[bytes | None], batch_size: int, offset: int
) -> Iterator[dict]:
    """Resuming: pass over the samples of the batches this worker made before the checkpoint,
    undecoded, then draw on from the RNG state it had after them (or, having made none, from
    the seed DataLoader gives the process that plays it: its base seed plus the worker id)."""
    worker = loader_worker(offset)
    samples = iter(samples)
    for _ in islice(samples, made[worker] * batch_size):
        pass
    info = get_worker_info()
    if info is not None:
        state = worker_rng[worker] if worker < len(worker_rng) else None
        if state is None:
            torch.manual_seed(info.seed - info.id + worker)
        else:
            torch.set_rng_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    yield from samples


class TrackedCollate:
    """The batch, and which worker made it with what RNG state after it (None in the training
    process, whose RNG a checkpoint keeps whole): what a step checkpoint records; and the
    samples' keys, where they were decoded with theirs (for the batch log), else None."""

    def __init__(self, collate, offset: int) -> None:
        self.collate, self.offset = collate, offset

    def __call__(self, samples: list) -> tuple:
        info = get_worker_info()
        state = torch.get_rng_state().numpy().tobytes() if info else None
        keys = [key for _, _, key in samples] if len(samples[0]) == 3 else None
        if keys is not None:
            samples = [(image, label) for image, label, _ in samples]
        return (*self.collate(samples), loader_worker(self.offset), state, keys)


def plain_collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`BatchBuffers.collate`'s (images, labels, buffer) where there are no buffers (-1)."""
    images, labels = default_collate(samples)
    return images, labels, -1


class Replay(IterableDataset):
    """The rest of a training epoch, from step `start`, that was dealt for other ranks
    (`deal`: ranks, loader workers), for rank `rank` of `world_size`. Each step's global batch is
    the one the dealt ranks would have made (in their rank order), and this rank takes its share
    of it (`batch_shares`): the steps, their samples and so the epoch's remaining samples are
    those of the epoch as dealt, each trained on once, whatever the world size now.

    Every stream the dealt ranks' loader workers would have read that holds some of this rank's
    part is read again from the epoch's start (the samples before `start` undecoded); only this
    rank's part of each step is decoded. A loader worker here reads some of those streams, and
    yields for every step its pieces of it (`ReplayBatches` joins them): one item per step each,
    so DataLoader's turns keep the steps in order."""

    def __init__(
        self, shard_files: list[tuple[str, int]], deal: tuple[int, int], global_batch: int, start: int,
        rank: int, world_size: int, transform: Transform, seed: int, epoch: int, bufsize: int, keyed: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.shard_files, self.start, self.transform, self.keyed = shard_files, start, transform, keyed
        self.seed, self.epoch, self.bufsize = seed, epoch, bufsize
        self.dealt_ranks, self.dealt_workers = deal
        counts = [n for _, n in shard_files]
        self.dealt_shares = batch_shares(global_batch, self.dealt_ranks)
        self.num_batches = batches_per_epoch(counts, self.dealt_ranks, self.dealt_workers, self.dealt_shares)
        self.turns = [
            turns(worker_batch_quotas(
                worker_sample_counts(counts, r, self.dealt_ranks, self.dealt_workers), share, self.num_batches
            ))
            for r, share in enumerate(self.dealt_shares)
        ]  # fmt: skip
        shares = batch_shares(global_batch, world_size)
        mine = range(sum(shares[:rank]), sum(shares[: rank + 1]))  # this rank's places in a global batch
        self.parts: dict[int, slice] = {}  # dealt rank -> the part of its batch that is this rank's
        for r, share in enumerate(self.dealt_shares):
            first = sum(self.dealt_shares[:r])
            low, high = max(mine.start, first), min(mine.stop, first + share)
            if low < high:
                self.parts[r] = slice(low - first, high - first)

    def streams(self) -> dict[tuple[int, int], Iterator[dict]]:
        """The dealt (rank, loader worker) streams this process reads, past the batches made before `start`."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        wanted = [(r, w) for r in self.parts for w in range(max(self.dealt_workers, 1))][worker::workers]
        streams = {}
        for r, w in wanted:
            urls = [{"url": url} for url, _ in self.shard_files][r :: self.dealt_ranks][w :: max(self.dealt_workers, 1)]
            samples = whole_shards(tar_samples(iter(urls)), counts=dict(self.shard_files))
            samples = iter(seeded_shuffle(samples, self.seed, self.epoch, r, self.bufsize, w))
            for _ in islice(samples, self.turns[r][: self.start].count(w) * self.dealt_shares[r]):
                pass
            streams[(r, w)] = samples
        return streams

    def __iter__(self) -> Iterator[tuple[int, list]]:
        streams = self.streams()
        for step in range(self.start, self.num_batches):
            pieces = []
            for (r, w), samples in streams.items():
                if self.turns[r][step] == w:
                    batch = list(islice(samples, self.dealt_shares[r]))[self.parts[r]]
                    decoded = [decode(sample, self.transform, keyed=True) for sample in batch]
                    pieces.append((r, torch.stack([image for image, _, _ in decoded]),
                                   torch.tensor([label for _, label, _ in decoded]),
                                   [key for _, _, key in decoded] if self.keyed else None))  # fmt: skip
            yield step, pieces


class ReplayBatches:
    """`Batches` for a replayed epoch (`Replay`): each step's pieces, from whichever loader
    workers read them, joined in the dealt ranks' order."""

    def __init__(self, replay: Replay, loader: DataLoader, log: tuple[BatchLog, int] | None) -> None:
        self.replay, self.loader, self.log = replay, loader, log
        self.steps = replay.start

    def __iter__(self) -> Iterator:
        log_line(self.log, f"start {self.steps}")
        arrived, items = [], 0
        for step, pieces in self.loader:
            if step != self.steps:  # DataLoader's turns give every worker's item of a step in a row
                raise RuntimeError(f"replayed step {step + 1} came while step {self.steps + 1} was joined")
            arrived += pieces
            items += 1
            if items < max(self.loader.num_workers, 1):
                continue
            items = 0
            arrived.sort(key=lambda piece: piece[0])
            images = torch.cat([images for _, images, _, _ in arrived])
            labels = torch.cat([labels for _, _, labels, _ in arrived])
            keys = [key for _, _, _, keys in arrived for key in keys or []]
            arrived = []
            self.steps += 1
            if self.log is not None:  # the hash reads every pixel: only where asked
                log_line(self.log, f"{self.steps} {batch_hash(images, labels)} {','.join(keys)}")
            yield (images.pin_memory() if self.loader.pin_memory else images), labels

    def position(self) -> Resume:
        return Resume(self.steps, [], (self.replay.dealt_ranks, self.replay.dealt_workers))

    def __len__(self) -> int:
        return self.replay.num_batches


BATCH_LOG_ENV = "RESNET_BATCH_LOG"


@dataclass(frozen=True)
class BatchLog:
    """Where a rank logs its train batches (`Batches`), and the run attempt it is part of (the
    same on every rank: a restart is another attempt)."""

    path: Path
    attempt: str


def batch_hash(images: torch.Tensor, labels: torch.Tensor) -> str:
    return hashlib.sha256(labels.numpy().tobytes() + images.contiguous().numpy().tobytes()).hexdigest()


def log_line(log: tuple[BatchLog, int] | None, line: str) -> None:
    if log is not None:
        batch_log, epoch = log
        with batch_log.path.open("a") as f:
            f.write(f"{time.time():.6f} {batch_log.attempt} {epoch} {line}\n")


class Batches:
    """An epoch of batches: `num_batches` of them in training (the workers' quotas add up to
    it; a resumed epoch yields those after `resume.steps`), every sample's in evaluation (None).
    `position()` says where it is, for a step checkpoint.

    With `log` (a training run's ranks set it from $RESNET_BATCH_LOG), the epoch's start (or
    resumption) appends a line "<time> <attempt> <epoch> start <step>", and each batch taken a
    line "<time> <attempt> <epoch> <step> <sha256 of its labels and pixels> <its samples' keys>".
    Two runs took the same batches exactly when their hashes agree; a step a resumed run takes
    again is logged again, by a later attempt."""

    def __init__(
        self,
        loader: DataLoader,
        num_batches: int | None,
        buffers: BatchBuffers | None,
        resume: Resume,
        log: tuple[BatchLog, int] | None = None,
    ) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.buffers = buffers
        self.steps = resume.steps
        self.worker_rng = list(resume.worker_rng) or [None] * max(loader.num_workers, 1)
        self.log = log

    def __iter__(self) -> Iterator:
        if self.buffers is not None:
            self.buffers.start_pass()
        log_line(self.log, f"start {self.steps}")
        for images, labels, buffer, worker, rng, keys in self.loader:
            if self.buffers is not None:
                self.buffers.received(images, buffer)
            self.steps += 1
            self.worker_rng[worker] = rng
            if self.log is not None:  # the hash reads every pixel: only where asked
                log_line(self.log, f"{self.steps} {batch_hash(images, labels)} {','.join(keys or [])}")
            yield images, labels
            del images  # the caller's reference is the one that counts
            if self.buffers is not None:
                self.buffers.release()

    def position(self) -> Resume:
        """Where the batches taken so far leave this epoch: what resuming after them needs."""
        return Resume(self.steps, list(self.worker_rng))

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an eval epoch reads every sample of its shards; its length is not fixed per rank")
        return self.num_batches


EpochBatches = Batches | ReplayBatches  # a training epoch's, as dealt or replayed


def batch_count(
    shard_files: list[tuple[str, int]], split: str, world_size: int, num_workers: int, shares: list[int]
) -> int:
    """The batches every rank makes this epoch (`batches_per_epoch`); none is an error."""
    num_batches = batches_per_epoch([n for _, n in shard_files], world_size, num_workers, shares)
    if num_batches == 0:
        raise UsageError(
            f"{split}: no full batch of {max(shares)} for some rank ({world_size} ranks x "
            f"{max(num_workers, 1)} loader workers over {len(shard_files)} shards); "
            "lower train.batch_size or shard.maxcount"
        )
    return num_batches


def make_loader(
    shards: str,
    split: str,
    transform: Transform,
    *,
    batch_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    train: bool,
    manifest: Manifest | None = None,
    pin_memory: bool = False,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    resume: Resume | None = None,
    log: BatchLog | None = None,
    global_batch: int | None = None,
) -> EpochBatches:
    """This rank's batches of one epoch. Train: shuffled, equal batch count on every rank, from
    `resume` on if given; `batch_size` is this rank's share of `global_batch` (`batch_shares`;
    None: every rank's is batch_size). Eval: every sample once across the ranks (sum their metrics)."""
    manifest = manifest or read_manifest(shards)
    shard_files = manifest.shard_list(shards, split)
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # torch.distributed's, or RANK/WORLD_SIZE
    if train:
        shard_files = epoch_order(shard_files, seed, epoch)
    if len(shard_files) < world_size:
        raise UsageError(
            f"{split}: {len(shard_files)} shards for {world_size} ranks; shard with a smaller shard.maxcount"
        )

    resume = resume or Resume(0)
    num_batches, made, offset = None, [], 0
    if train:
        shares = batch_shares(global_batch or batch_size * world_size, world_size)
        if shares[rank] != batch_size:
            raise ValueError(
                f"rank {rank}'s share of {global_batch} over {world_size} ranks is {shares[rank]}, not {batch_size}"
            )
        if resume.replay_deal is not None:
            replay = Replay(
                shard_files, resume.replay_deal, global_batch or batch_size * world_size, resume.steps, rank,
                world_size, transform, seed, epoch, shuffle_buffer, keyed=log is not None,
            )  # fmt: skip
            generator = torch.Generator().manual_seed(hash((seed, epoch, rank, resume.steps)) % 2**31)
            loader = DataLoader(
                replay, batch_size=None, num_workers=num_workers, generator=generator, pin_memory=pin_memory
            )
            return ReplayBatches(replay, loader, (log, epoch) if log else None)
        num_batches = batch_count(shard_files, split, world_size, num_workers, shares)
        quotas = worker_batch_quotas(
            worker_sample_counts([n for _, n in shard_files], rank, world_size, num_workers), batch_size, num_batches
        )
        made, offset = round_robin(quotas, resume.steps)
    stages = [
        wds.SimpleShardList([url for url, _ in shard_files]),
        partial(split_by_rank, rank=rank, world_size=world_size),
        partial(split_by_worker, offset=offset),
        tar_samples,
        partial(whole_shards, counts=dict(shard_files)),
    ]
    if train:
        stages.append(partial(shuffled, seed=seed, epoch=epoch, rank=rank, bufsize=shuffle_buffer, offset=offset))
        stages.append(partial(take_quota, quotas=quotas, batch_size=batch_size, offset=offset))
        if resume.steps:
            stages.append(
                partial(skip_made, made=made, worker_rng=resume.worker_rng, batch_size=batch_size, offset=offset)
            )
    stages.append(wds.map(partial(decode, transform=transform, keyed=log is not None)))

    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
    # Two buffers in flight per worker (DataLoader's prefetch), one or two held by the trainer.
    buffers = BatchBuffers(num_workers, per_worker=4) if num_workers > 0 else None
    loader = DataLoader(
        wds.DataPipeline(*stages),
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
        collate_fn=TrackedCollate(buffers.collate if buffers else plain_collate, offset),
    )
    return Batches(loader, num_batches, buffers, resume, (log, epoch) if log else None)
