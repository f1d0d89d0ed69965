"""Stream the shards to a training process with WebDataset, on one rank or many.

Each epoch the train shards are shuffled with a seed shared by every rank, then split by rank
(rank r of W takes shards r, r+W, ..., as `wds.split_by_node` would) and by DataLoader worker
(`wds.split_by_worker`), and samples are shuffled in a buffer seeded per (epoch, rank, worker).
Every DDP rank must run the same number of steps, or the ranks hang in all-reduce when one runs
out of data first; the manifest tells how many samples each worker will read, so each rank
stops at the number of full batches the poorest rank can make (`batches_per_epoch`). What the
other ranks skip this epoch, another shard order brings next epoch. Each DataLoader worker
decodes only its share of those batches (`worker_batch_quotas`).

Samples are decoded from their `.jpg` and `.cls` members only: no member is ever unpickled.
Shards may be local paths or `s3://` (any fsspec URL): WebDataset opens those through fsspec.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections.abc import Iterator
from functools import partial
from itertools import islice
from typing import Any

import fsspec
import torch
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, default_collate, get_worker_info
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import group_by_keys, url_opener

from pipeline.cli import UsageError
from pipeline.transforms import Transform

MANIFEST = "manifest.json"
# 2: a test split beside train and val (schema 1 had train and val, and val both chose and scored)
SCHEMA = 2
SHUFFLE_BUFFER = 1000


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    return fsspec.open(url, mode).open()


# WebDataset's own openers cover files, pipes, http and gs; object stores go through fsspec.
for _scheme in ("s3", "gcs", "az", "abfs"):
    gopen_schemes[_scheme] = _open_with_fsspec


# manifest.json as every stage that reads it relies on it. The shard stage writes it; one edited
# by hand, cut short or written by something else is refused when it is read, in one line that
# names the key, rather than as a KeyError in a Ray worker a minute later. Types are strict (a
# count of "12" or true is an error, not 12 or 1): the stages go on reading the dict itself.
# Keys beyond these are allowed: the shard stage adds notes (class_names, a source's own) that
# no stage needs.


class _ManifestPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class ManifestShard(_ManifestPart):
    # Relative to the shards folder, and inside it: the loader joins it onto the folder's URL.
    name: str = Field(pattern=r"^[\w-]+/[\w.-]+\.tar$")
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)  # `verify` compares the file with these two
    sha256: str


class ImageSize(_ManifestPart):
    """The sides of a split's images, in pixels; `uniform` is [width, height] when every image
    has that size, else null."""

    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    uniform: list[int] | None = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ordered(self) -> ImageSize:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is over max_side {self.max_side}")
        if self.uniform is not None and not (min(self.uniform) == self.min_side and max(self.uniform) == self.max_side):
            raise ValueError(
                f"uniform {self.uniform} disagrees with min_side {self.min_side}, max_side {self.max_side}"
            )
        return self


class ManifestSplit(_ManifestPart):
    num_samples: int = Field(ge=0)
    shards: list[ManifestShard]
    rejected: list[Any]
    converted: list[Any]
    # null for a split without images; absent from manifests written before sizes were recorded
    image_size: ImageSize | None = None


class Manifest(_ManifestPart):
    source: str
    classes: list[str] = Field(min_length=1)  # the net's outputs, in label order
    mean: list[float] = Field(min_length=3, max_length=3)  # per channel, subtracted from every image
    splits: dict[str, ManifestSplit]

    @field_validator("splits")
    @classmethod
    def _train_val_and_test(cls, splits: dict[str, ManifestSplit]) -> dict[str, ManifestSplit]:
        for split in ("train", "val", "test"):
            if split not in splits:
                raise ValueError(f"no {split!r} split; the shard stage writes train, val and test")
        return splits


def read_manifest(shards: str) -> dict[str, Any]:
    """The shards' manifest.json, checked against `Manifest`; any problem is one UsageError
    line that names the file (and the key)."""
    url = f"{shards.rstrip('/')}/{MANIFEST}"
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{url}: missing; run `python -m pipeline.shard` first") from None
    except IsADirectoryError:
        raise UsageError(f"{url}: a folder, not a file; run `python -m pipeline.shard` to write the shards") from None
    except NotADirectoryError:
        raise UsageError(f"{url}: {shards} is a file, not a folder of shards (paths.shards)") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{url}: not a text file (byte {e.start} is not UTF-8)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"{url}: not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"{url}: cannot be read ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{url}: a JSON {type(manifest).__name__}, expected an object")
    if "schema" not in manifest:
        raise UsageError(f"{url}: schema: missing key; expected {SCHEMA}")
    schema = manifest["schema"]
    if type(schema) is int and 1 <= schema < SCHEMA:  # `type`: JSON's true is no schema 1
        # Shards of an older shard stage (schema 1: no test split): the stage replaces them.
        raise UsageError(
            f"{url}: schema {schema}, expected {SCHEMA}; rerun the shard stage (`python -m pipeline.shard`)"
        )
    if type(schema) is not int or schema != SCHEMA:
        raise UsageError(f"{url}: schema: {schema!r}, expected {SCHEMA}")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        raise UsageError(f"{url}: {manifest_problem(e.errors()[0])}") from None
    return manifest


def manifest_problem(error: dict[str, Any]) -> str:
    """One pydantic error as `dotted.key: what is wrong (got value)`."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{key}: missing key"
    message = error["msg"].removeprefix("Value error, ")
    value = error["input"]
    if isinstance(value, (dict, list)):  # a whole section: its key says enough
        return f"{key}: {message}"
    shown = repr(value)
    return f"{key}: {message} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def shard_list(shards: str, manifest: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(url, number of samples) of each shard of a split, in manifest order."""
    root = shards.rstrip("/")
    return [(f"{root}/{s['name']}", s["num_samples"]) for s in manifest["splits"][split]["shards"]]


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


def batches_per_epoch(counts: list[int], world_size: int, num_workers: int, batch_size: int) -> int:
    """Full batches the poorest rank can make; each worker batches its own samples."""
    return min(
        sum(n // batch_size for n in worker_sample_counts(counts, rank, world_size, num_workers))
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
    sufficient rather than necessary. tests/pipeline/test_preflight.py compares it with every
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


def decode(sample: dict[str, Any], transform: Transform) -> tuple[torch.Tensor, int]:
    try:
        jpeg, label = sample["jpg"], int(sample["cls"])
    except (KeyError, ValueError):
        raise ValueError(
            f"{sample.get('__url__')}: sample {sample.get('__key__')} lacks a .jpg or an integer .cls"
        ) from None
    try:
        return transform(jpeg), label
    except ValueError as error:  # jpegcrop's, with libjpeg's reason
        raise ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {error}") from None


# The largest tar member read into memory (by the loader, and by `verify`). A member is read
# whole, and its header alone says how large it is: a shard someone else wrote can claim 16 GiB
# in a member that holds a few bytes. The shard stage writes nothing near this: a JPEG passed
# through is at most shard.max_bytes (64 MiB by default), and one it re-encodes has at most
# transforms.MAX_PIXELS pixels, ~180 MB even for pure noise at quality 100 (2 bytes a pixel).
MAX_MEMBER_BYTES = 256 * 1024 * 1024


def member_refusal(member: tarfile.TarInfo) -> str | None:
    """Why a regular tar member must not be read, or None. A sparse member (a GNU tar
    extension) stores only its data blocks and reads back as its full size with the holes
    zero-filled: 250 KB in the tar can read as 16 GiB. The shard stage never writes one."""
    if member.issparse():
        return f"a sparse file, {member.size} bytes once its holes are filled; shards hold no sparse files"
    if member.size > MAX_MEMBER_BYTES:
        return f"{member.size} bytes, over the limit of {MAX_MEMBER_BYTES} bytes for a member"
    return None


def tar_members(sources: Iterator[dict]) -> Iterator[dict]:
    """WebDataset's `tar_file_expander`, reading each member in one piece: WebDataset opens every
    tar in tarfile's stream mode, which copies a member 10 KiB at a time, a tenth of a JPEG's
    decode. Files and object stores (fsspec) seek; a pipe is read as a stream. A member
    `member_refusal` refuses is an error, before any of it is read."""
    for source in sources:
        url, stream = source["url"], source["stream"]
        try:
            seekable = isinstance(stream, io.IOBase) and stream.seekable()  # WebDataset's Pipe is neither
            with stream, tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
                for member in tar:
                    if member.isreg():
                        refusal = member_refusal(member)
                        if refusal:
                            raise ValueError(
                                f"{url}: {member.name}: {refusal}; check the shards with `python -m pipeline.verify`"
                            )
                        yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
                    tar.members = []  # the headers read so far, which tarfile would keep to the end
        except (tarfile.TarError, EOFError) as error:
            raise ValueError(
                f"{url}: not a readable tar ({error}); check the shards with `python -m pipeline.verify`"
            ) from None
        yield {}  # a shard's end: WebDataset's group_by_keys never joins members of two shards


def tar_samples(urls: Iterator[dict]) -> Iterator[dict]:
    """Shard URLs -> samples: `wds.tarfile_to_samples` with `tar_members` as its reader."""
    return group_by_keys(tar_members(url_opener(urls)))


def whole_shards(samples: Iterator[dict], counts: dict[str, int]) -> Iterator[dict]:
    """Every shard's samples, and an error at a shard that ends short of its manifest count.
    tarfile reads a tar cut off at a member's header as a shorter tar, and a rank left short of
    batches would hang the others in all-reduce."""
    url, seen = None, 0
    for sample in samples:
        if sample["__url__"] != url:
            _check_count(url, seen, counts)
            url, seen = sample["__url__"], 0
        seen += 1
        yield sample
    _check_count(url, seen, counts)


def _check_count(url: str | None, seen: int, counts: dict[str, int]) -> None:
    if url is not None and seen != counts[url]:
        raise ValueError(
            f"{url}: {seen} samples, the manifest says {counts[url]}; check the shards with `python -m pipeline.verify`"
        )


def split_by_rank(urls: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """`wds.split_by_node` with the rank fixed when the pipeline is built: split_by_node asks
    torch.distributed from inside the DataLoader worker, where the process group of the
    training process is not initialised, so every rank would read every shard."""
    return islice(urls, rank, None, world_size)


def seeded_shuffle(samples: Iterator[dict], seed: int, epoch: int, rank: int, bufsize: int) -> Iterator[dict]:
    info = get_worker_info()
    rng = random.Random(f"samples:{seed}:{epoch}:{rank}:{info.id if info else 0}")
    return wds.shuffle(bufsize, min(bufsize, 100), rng=rng)(samples)


def take_quota(samples: Iterator[dict], quotas: list[int], batch_size: int) -> Iterator[dict]:
    """A worker's share of the epoch's batches: it decodes no sample that no batch will use, and
    is done, not mid-batch, when the training process has its last batch."""
    info = get_worker_info()
    return islice(samples, quotas[info.id if info else 0] * batch_size)


class BatchBuffers:
    """Shared-memory batch buffers that each DataLoader worker fills again and again.

    DataLoader's default collate stacks every batch into a new shared-memory segment, and
    writing a fresh segment costs a page fault per 4 KiB: on these machines as much as a
    quarter of the JPEG decode. Here each worker stacks into one of its own buffers instead,
    taking one whose previous batch the training process has let go of. The training process
    keeps a weak reference to each batch's storage and marks the buffer free once no tensor
    (nor any view of one) holds it, so a batch stays valid for as long as anything uses it.
    A worker that finds no buffer free maps another, up to `per_worker`, and past that stacks
    into a fresh segment as DataLoader does.
    """

    def __init__(self, num_workers: int, per_worker: int) -> None:
        self.num_workers, self.per_worker = num_workers, per_worker
        self.busy = self._new_flags()
        self.storages: dict[int, torch.UntypedStorage] = {}  # in a worker: its buffers
        self.held: list[tuple[torch.Tensor, int, StorageWeakRef]] = []  # in the training process

    def _new_flags(self) -> torch.Tensor:
        return torch.zeros(self.num_workers, self.per_worker, dtype=torch.uint8).share_memory_()

    def __getstate__(self) -> dict[str, Any]:
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


class Batches:
    """An epoch of batches: `num_batches` of them in training (the workers' quotas add up to
    it), every sample's in evaluation (None)."""

    def __init__(self, loader: DataLoader, num_batches: int | None, buffers: BatchBuffers | None) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.buffers = buffers

    def __iter__(self) -> Iterator:
        if self.buffers is None:
            return iter(self.loader)
        self.buffers.start_pass()
        return self._through_buffers(iter(self.loader))

    def _through_buffers(self, batches: Iterator) -> Iterator:
        for images, labels, buffer in batches:
            self.buffers.received(images, buffer)
            yield images, labels
            del images  # the caller's reference is the one that counts
            self.buffers.release()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an eval epoch reads every sample of its shards; its length is not fixed per rank")
        return self.num_batches


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
    manifest: dict[str, Any] | None = None,
    pin_memory: bool = False,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Batches:
    """This rank's batches of one epoch. Train: shuffled, equal batch count on every rank.
    Eval: every sample once across the ranks (sum their metrics)."""
    manifest = manifest or read_manifest(shards)
    shard_files = shard_list(shards, manifest, split)
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # torch.distributed's, or RANK/WORLD_SIZE
    if train:
        shard_files = epoch_order(shard_files, seed, epoch)
    if len(shard_files) < world_size:
        raise UsageError(
            f"{split}: {len(shard_files)} shards for {world_size} ranks; shard with a smaller shard.maxcount"
        )

    stages = [
        wds.SimpleShardList([url for url, _ in shard_files]),
        partial(split_by_rank, rank=rank, world_size=world_size),
        wds.split_by_worker,
        tar_samples,
        partial(whole_shards, counts=dict(shard_files)),
    ]

    num_batches = None
    if train:
        counts = [n for _, n in shard_files]
        num_batches = batches_per_epoch(counts, world_size, num_workers, batch_size)
        if num_batches == 0:
            raise UsageError(
                f"{split}: no full batch of {batch_size} for some rank ({world_size} ranks x "
                f"{max(num_workers, 1)} loader workers over {len(shard_files)} shards); "
                "lower train.batch_size or shard.maxcount"
            )
        quotas = worker_batch_quotas(
            worker_sample_counts(counts, rank, world_size, num_workers), batch_size, num_batches
        )
        stages.append(partial(seeded_shuffle, seed=seed, epoch=epoch, rank=rank, bufsize=shuffle_buffer))
        stages.append(partial(take_quota, quotas=quotas, batch_size=batch_size))
    stages.append(wds.map(partial(decode, transform=transform)))

    generator = torch.Generator().manual_seed(hash((seed, epoch, rank)) & 0x7FFFFFFF)
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
        collate_fn=buffers.collate if buffers else None,
    )
    return Batches(loader, num_batches, buffers)
