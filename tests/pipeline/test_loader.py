"""The WebDataset loader and the paper's transforms."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

import jpegcrop
from pipeline import loader, shard, transforms
from pipeline.buffers import BatchBuffers
from pipeline.manifest import SCHEMA, read_manifest
from pipeline.tars import tar_samples
from tests.data_trees import imagenet_tree, jpeg_bytes, picture
from tests.pipeline.test_shard import imagenet_params, make_params

MEAN = (0.5, 0.4, 0.3)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """Digits with 7 train shards of at most 170: an odd count, uneven sizes."""
    tmp = tmp_path_factory.mktemp("digits")
    shard.shard(make_params(tmp, "shard.maxcount=170"))
    return tmp / "shards"


@pytest.fixture
def single_process(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


def digits_loader(shards: Path | str, epoch: int = 0, train: bool = True, **kw):
    kw = {"batch_size": 32, "num_workers": 2, "seed": 0, **kw}
    transform = transforms.train_transform("cifar", flip=False) if train else transforms.eval_transform("cifar")
    return loader.make_loader(str(shards), "train" if train else "val", transform, epoch=epoch, train=train, **kw)


def test_batches_per_epoch_takes_the_poorest_rank():
    counts = [170, 170, 170, 170, 170, 170, 170, 170, 77]
    # rank 0 reads shards 0,2,4,6,8 (worker 0: 0,4,8 = 417; worker 1: 2,6 = 340); rank 1 reads 1,3,5,7.
    assert loader.worker_sample_counts(counts, 0, 2, 2) == [417, 340]
    assert loader.worker_sample_counts(counts, 1, 2, 2) == [340, 340]
    assert loader.batches_per_epoch(counts, 2, 2, 32) == min(13 + 10, 10 + 10)
    assert loader.batches_per_epoch(counts, 1, 0, 32) == sum(counts) // 32
    # Rank 0 makes only the poorest rank's 20 of its 13 + 10 batches: its workers in turn.
    assert loader.worker_batch_quotas([417, 340], 32, 20) == [10, 10]
    assert loader.worker_batch_quotas([417, 100], 32, 12) == [9, 3]
    with pytest.raises(ValueError):
        loader.worker_batch_quotas([417, 100], 32, 17)


def test_workers_decode_only_the_samples_of_the_epochs_batches(digit_shards, single_process, monkeypatch):
    decoded = mp.get_context("fork").Value("i", 0)
    decode = loader.decode

    def counted(sample, transform):
        with decoded.get_lock():
            decoded.value += 1
        return decode(sample, transform)

    monkeypatch.setattr(loader, "decode", counted)
    batches = digits_loader(digit_shards, num_workers=2)
    assert sum(len(y) for _, y in batches) == len(batches) * 32
    assert decoded.value == len(batches) * 32


def test_epoch_order_is_shared_by_ranks_and_changes_with_epoch():
    shards = [(f"s{i}", 1) for i in range(9)]
    assert loader.epoch_order(shards, 0, 1) == loader.epoch_order(shards, 0, 1)
    assert loader.epoch_order(shards, 0, 1) != loader.epoch_order(shards, 0, 2)
    assert sorted(loader.epoch_order(shards, 0, 1)) == shards


def test_train_epoch_is_reproducible_and_reshuffled(digit_shards, single_process):
    def labels(epoch):
        torch.manual_seed(0)
        return torch.cat([y for _, y in digits_loader(digit_shards, epoch)]).tolist()

    first = labels(0)
    assert len(first) == len(digits_loader(digit_shards)) * 32
    assert labels(0) == first
    assert labels(1) != first


def test_eval_reads_every_sample_once(digit_shards, single_process):
    batches = list(digits_loader(digit_shards, train=False))
    x, _ = batches[0]
    assert x.shape[1:] == (16, 16, 3) and x.dtype == torch.uint8
    assert sum(len(y) for _, y in batches) == 360


def _rank_main(rank: int, world_size: int, shards: str, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    batches = digits_loader(Path(shards), epoch=0)
    steps = 0
    for x, _ in batches:
        # A DDP step's all-reduce: a rank with more batches than another would wait here forever.
        dist.all_reduce(torch.ones(1))
        steps += 1
    evaluated = torch.tensor([sum(len(y) for _, y in digits_loader(Path(shards), train=False))])
    dist.all_reduce(evaluated)
    Path(results, f"rank{rank}").write_text(f"{steps} {len(batches)} {int(evaluated)}")
    dist.destroy_process_group()


def test_two_ranks_get_equal_batch_counts_on_uneven_shards(digit_shards, tmp_path):
    manifest = read_manifest(str(digit_shards))
    counts = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    assert len(counts) % 2 == 1 and len(set(counts)) > 1  # the uneven case
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    ctx = mp.get_context("fork")  # as Ray Train workers are: their DataLoader workers fork too
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, str(digit_shards), str(tmp_path / "init"), str(tmp_path)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [tuple(map(int, (tmp_path / f"rank{r}").read_text().split())) for r in range(2)]
    steps = {r[0] for r in results}
    assert len(steps) == 1 and steps == {r[1] for r in results}, results
    assert all(r[2] == 360 for r in results)  # val: every sample once across the two ranks


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


def test_loader_never_unpickles_a_member(tmp_path, single_process):
    """A .pyd member holding a pickle that would write a file when loaded is never loaded."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))

    jpeg = jpeg_bytes(picture(np.random.default_rng(0), 16, 16))
    batches = one_shard_loader(tmp_path / "shards", [{"jpg": jpeg, "cls": b"3", "pyd": pickle.dumps(Exploit())}] * 4)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [3, 3, 3, 3]
    assert not marker.exists()


def test_an_undecodable_sample_is_named_in_the_error(tmp_path, single_process):
    """A shard that bypassed `verify` (a JPEG cut short at its header): the error names the
    shard, the sample and libjpeg's reason."""
    jpeg = jpeg_bytes(picture(np.random.default_rng(0), 16, 16))
    batches = one_shard_loader(tmp_path / "shards", [{"jpg": jpeg, "cls": b"1"}, {"jpg": jpeg[:100], "cls": b"2"}])
    with pytest.raises(ValueError, match=r"shard-000000\.tar: sample s1: .*JPEG"):
        list(batches)


def one_shard_loader(shards: Path, samples: list[dict[str, bytes]]) -> loader.Batches:
    """The train loader over one hand-written shard of `samples` (members by extension)."""
    (shards / "train").mkdir(parents=True)
    with tarfile.open(shards / "train" / "shard-000000.tar", "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = {
        "schema": SCHEMA,
        "classes": [str(i) for i in range(10)],
        "splits": {"train": {"shards": [{"name": "train/shard-000000.tar", "num_samples": len(samples)}]}},
    }
    return loader.make_loader(
        str(shards),
        "train",
        transforms.train_transform("cifar", flip=False),
        batch_size=2,
        num_workers=0,
        epoch=0,
        seed=0,
        train=True,
        manifest=manifest,
        shuffle_buffer=1,
    )


def test_too_few_samples_for_a_batch_is_a_clear_error(digit_shards, single_process):
    with pytest.raises(loader.UsageError, match="no full batch of 4096"):
        digits_loader(digit_shards, batch_size=4096)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(loader.UsageError, match="manifest.json: missing"):
        read_manifest(str(tmp_path))


# --- transforms -------------------------------------------------------------------------------


def photo(width=500, height=375, **save) -> bytes:
    return jpeg_bytes(picture(np.random.default_rng(1), width, height), **save)


def full_decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


@pytest.mark.parametrize(
    "save",
    [{"subsampling": 2}, {"subsampling": 1}, {"subsampling": 0}, {"progressive": True}],
    ids=["4:2:0", "4:2:2", "4:4:4", "progressive"],
)
def test_cropped_decode_gives_the_pixels_of_a_full_decode(save):
    """Any rectangle, iMCU-aligned or not, at the image's edges or inside: the same pixels as
    PIL's decode of the whole image."""
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (333, 500), (101, 77)]:
        jpeg = photo(width, height, **save)
        assert jpegcrop.size(jpeg) == (width, height)
        full = np.asarray(full_decode(jpeg))
        assert np.array_equal(transforms.decode(jpeg).numpy(), full)
        for i in range(40):
            w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if i % 2:
                left = left // 16 * 16  # on an iMCU boundary
            region = np.frombuffer(jpegcrop.decode(jpeg, left, top, w, h, 1), np.uint8).reshape(h, w, 3)
            assert np.array_equal(region, full[top : top + h, left : left + w]), (width, height, left, top, w, h)


def test_cropped_decode_of_a_grayscale_jpeg_is_rgb():
    jpeg = jpeg_bytes(picture(np.random.default_rng(2), 64, 48), mode="L")
    assert np.array_equal(transforms.decode(jpeg).numpy(), np.asarray(full_decode(jpeg)))


def test_cropped_decode_rejects_bad_input_with_a_reason():
    jpeg = photo(64, 48)
    with pytest.raises(ValueError, match="Not a JPEG file"):
        transforms.decode(b"GIF89a not a jpeg")
    with pytest.raises(ValueError, match="outside the 64 x 48 image"):
        jpegcrop.decode(jpeg, 60, 0, 10, 10, 1)
    with pytest.raises(ValueError, match="valid: 1, 2, 4, 8"):
        jpegcrop.decode(jpeg, 0, 0, 10, 10, 3)


def test_decode_resized_equals_cropping_and_resizing_the_full_decode():
    jpeg = photo(500, 375)
    for box, size in [
        ((37.4, 81.9, 301.2, 345.7), (224, 224)),
        ((100, 50, 250, 200), (224, 224)),
        ((0, 0, 500, 375), (341, 256)),
    ]:
        whole = (round(box[0]), round(box[1]), round(box[2]), round(box[3]))
        reference = np.asarray(full_decode(jpeg).crop(whole).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        got = transforms.decode_resized(jpeg, (500, 375), box, size).numpy().astype(np.int16)
        assert got.shape == (size[1], size[0], 3)
        assert np.abs(got - reference).max() <= 1  # torch's antialiased bilinear vs PIL's: rounding only


def test_decode_resized_returns_whole_rows_of_pixels():
    """HWC with each row's RGB values adjacent: stacking a batch of them is then a plain copy
    (a channel-planar result made every batch a byte-by-byte gather)."""
    got = transforms.decode_resized(photo(500, 375), (500, 375), (37.4, 81.9, 301.2, 345.7), (224, 224))
    assert got.shape == (224, 224, 3) and got.is_contiguous()


def test_decode_resized_decodes_big_images_at_a_reduced_scale(monkeypatch):
    """A box 2x (4x, 8x) the output is decoded at 1/2 (1/4, 1/8) scale: libjpeg's DCT scaling,
    never below the output's resolution, and close to resizing the full decode."""
    jpeg = photo(1200, 900)
    denominators = []
    decode = jpegcrop.decode
    monkeypatch.setattr(jpegcrop, "decode", lambda *args: denominators.append(args[-1]) or decode(*args))
    for box, expected in [((0, 0, 600, 600), 2), ((0, 0, 224 * 2 - 1, 224 * 2 - 1), 1), ((100, 0, 1100, 900), 4)]:
        got = transforms.decode_resized(jpeg, (1200, 900), box, (224, 224)).float()
        reference = full_decode(jpeg).crop(box).resize((224, 224), Image.Resampling.BILINEAR)
        assert denominators[-1] == expected
        assert (got - torch.from_numpy(np.asarray(reference, dtype=np.float32))).abs().mean() < 1.5
    transforms.decode_resized(jpeg, (1200, 900), (0, 0, 1200, 900), (128, 96))
    assert denominators[-1] == 8


def test_imagenet_train_transform_shape():
    torch.manual_seed(0)
    pixels = transforms.train_transform("imagenet", flip=True)(photo())
    assert pixels.shape == (224, 224, 3) and pixels.dtype == torch.uint8


def test_scale_crop_equals_resize_then_crop():
    """One resize of the crop's region gives the pixels of resizing the image, then cropping."""
    jpeg = photo(500, 375)
    fused = transforms.RandomScaleCrop(300, 300, 224)
    torch.manual_seed(3)
    got = np.asarray(fused(jpeg), dtype=np.float32)
    torch.manual_seed(3)
    side = transforms.randint(300, 300)
    width = round(500 * side / 375)
    left, top = transforms.randint(0, width - 224), transforms.randint(0, 300 - 224)
    resized = full_decode(jpeg).resize((width, side), Image.Resampling.BILINEAR)
    reference = resized.crop((left, top, left + 224, top + 224))
    assert np.abs(got - np.asarray(reference, dtype=np.float32)).mean() < 1.0  # same pixels, up to rounding


def test_scale_crop_fits_any_image_size():
    crop = transforms.RandomScaleCrop(256, 480, 224)
    centre = transforms.CentreCrop(256, 224)
    rng = np.random.default_rng(0)
    for seed in range(100):
        torch.manual_seed(seed)
        jpeg = jpeg_bytes(np.zeros((int(rng.integers(60, 900)), int(rng.integers(60, 900)), 3), np.uint8))
        assert crop(jpeg).shape == (224, 224, 3) and centre(jpeg).shape == (224, 224, 3)


def test_imagenet_shards_stream_through_the_imagenet_transforms(tmp_path, single_process):
    """Every sample the shard stage writes from an ImageNet tree with its quirks (CMYK, PNG,
    grayscale, progressive) decodes through the cropped decoder, in training and in both tests."""
    tree = imagenet_tree(tmp_path / "raw", size=(300, 260))
    shard.shard(imagenet_params(tmp_path, tree.root, "shard.maxcount=100"))
    shards = str(tmp_path / "shards")
    common = {"batch_size": 2, "num_workers": 0, "epoch": 0, "seed": 0}
    train = loader.make_loader(shards, "train", transforms.train_transform("imagenet", True), train=True, **common)
    assert len(train) > 0 and all(x.shape == (2, 224, 224, 3) for x, _ in train)
    for crop, shape in (("single", (224, 224, 3)), ("ten", (10, 224, 224, 3))):
        batches = loader.make_loader(shards, "val", transforms.eval_transform("imagenet", crop), train=False, **common)
        seen = [x.shape[1:] for x, _ in batches]
        assert seen and all(s == shape for s in seen)


def test_imagenet_eval_single_and_ten_crop():
    jpeg = photo(600, 400)  # 384x256 at test scale: the centre crop sits symmetrically
    single = transforms.eval_transform("imagenet", "single")(jpeg).float()
    ten = transforms.eval_transform("imagenet", "ten")(jpeg).float()
    assert single.shape == (224, 224, 3)
    assert ten.shape == (10, 224, 224, 3)
    assert (ten[4] - single).abs().mean() < 2  # the 5th crop is the centre
    assert torch.equal(ten[9], ten[4].flip(1))  # and the 10th its mirror image
    assert transforms.prepare_batch(ten[None].to(torch.uint8), MEAN, lighting=False).shape == (10, 3, 224, 224)


def test_cifar_train_transform_pads_and_crops():
    jpeg = jpeg_bytes(np.full((32, 32, 3), 255, dtype=np.uint8))
    torch.manual_seed(0)
    crops = [transforms.train_transform("cifar", flip=True)(jpeg) for _ in range(20)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert any((c == 0).any() for c in crops)  # some take in zero padding
    assert all((c[12:20, 12:20] == 255).all() for c in crops)  # all keep the interior
    with pytest.raises(ValueError, match="single image"):
        transforms.eval_transform("cifar", "ten")


def test_digits_are_never_flipped():
    asymmetric = np.zeros((16, 16, 3), dtype=np.uint8)
    asymmetric[:, :4] = 255  # a bar on the left
    jpeg = jpeg_bytes(asymmetric)
    torch.manual_seed(0)
    for _ in range(30):
        out = transforms.train_transform("cifar", flip=False)(jpeg).float()
        assert out[:, :8].sum() > out[:, 8:].sum()


def test_prepare_batch_scales_subtracts_the_mean_and_adds_colour_noise():
    pixels = torch.full((4, 8, 8, 3), 255, dtype=torch.uint8)
    plain = transforms.prepare_batch(pixels, MEAN, lighting=False)
    assert plain.shape == (4, 3, 8, 8)
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, (1 - torch.tensor(MEAN)).view(1, 3, 1, 1).expand(4, 3, 8, 8))
    torch.manual_seed(0)
    lit = transforms.prepare_batch(pixels, MEAN, lighting=True)
    shift = (lit - plain).flatten(2)
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6)  # one colour shift per image
    assert not torch.allclose(shift[0], shift[1])  # drawn per image
    assert shift.abs().max() < 0.2


def test_prepare_batch_reuses_the_buffer_it_is_given():
    pixels = torch.randint(0, 256, (4, 8, 6, 3), dtype=torch.uint8)
    first = transforms.prepare_batch(pixels, MEAN, lighting=False)
    expected = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)).clone()
    assert torch.allclose(first, expected, atol=1e-6)
    again = transforms.prepare_batch(pixels.flip(1), MEAN, lighting=False, out=first)
    assert again.data_ptr() == first.data_ptr() and torch.allclose(again, expected.flip(2), atol=1e-6)
    smaller = transforms.prepare_batch(pixels[:3], MEAN, lighting=False, out=first)  # a last, short batch
    assert smaller.shape == (3, 3, 8, 6) and smaller.data_ptr() != first.data_ptr()


def test_streams_shards_from_s3(digit_shards, s3_server, single_process):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("shards-bucket")
    fs.put(str(digit_shards), "shards-bucket/digits", recursive=True)
    url = "s3://shards-bucket/digits"
    assert read_manifest(url) == read_manifest(str(digit_shards))

    def labels(shards: str) -> list[int]:
        torch.manual_seed(0)
        return torch.cat([y for _, y in digits_loader(shards, epoch=2)]).tolist()

    assert labels(url) == labels(str(digit_shards))


def shard_samples(url: str) -> list[tuple[str, bytes, bytes]]:
    return [(s["__key__"], s["jpg"], s["cls"]) for s in wds.DataPipeline(wds.SimpleShardList([url]), tar_samples)]


def test_tar_members_read_a_stream_as_a_file(digit_shards):
    """Files seek, and each member is read in one piece; a pipe cannot, and is read as a stream."""
    path = min((digit_shards / "train").glob("*.tar"))
    from_file = shard_samples(str(path))
    assert len(from_file) == 170
    assert shard_samples(f"pipe:cat {path}") == from_file


def test_a_truncated_shard_is_named_in_the_loaders_error(digit_shards, tmp_path, single_process):
    copy = tmp_path / "shards"
    shutil.copytree(digit_shards, copy)
    path = min((copy / "train").glob("*.tar"))
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        # The header of the 41st sample's first member.
        first_members = {m.name.partition(".")[0]: m.offset for m in reversed(tar.getmembers())}
        at_header = sorted(first_members.values())[40]
    # Cut inside a member: tarfile reports it. Cut at a header: tarfile sees a shorter tar, and
    # the count in the manifest tells.
    cuts = {1000: r"not a readable tar \(unexpected end of data\)", at_header: "40 samples, the manifest says 170"}
    for size, error in cuts.items():
        path.write_bytes(whole[:size])
        with pytest.raises(ValueError, match=f"{path}: {error}; check the shards with `python -m pipeline.verify`"):
            list(digits_loader(copy, num_workers=0))
