"""The GPU path: bf16 autocast, channels_last, torch.compile, pinned-memory transfer. These run
wherever a CUDA device is present and are skipped, with the reason shown, elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet
from pipeline import shard, transforms
from tests.helpers import digits_loader, make_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]
MEAN = (0.48, 0.45, 0.40)


def batch(n: int = 32, side: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8).pin_memory()
    return pixels, torch.randint(0, 1000, (n,))


def test_prepare_batch_on_the_device_matches_the_cpu():
    pixels, _ = batch(8)
    on_gpu = transforms.prepare_batch(pixels.cuda(non_blocking=True), MEAN, lighting=False)
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(on_gpu.cpu(), transforms.prepare_batch(pixels, MEAN, lighting=False), atol=1e-6)


def test_bf16_channels_last_training_step_tracks_fp32():
    torch.manual_seed(0)
    model = resnet.build("resnet50").cuda().to(memory_format=torch.channels_last)
    pixels, labels = batch()
    images = transforms.prepare_batch(pixels.cuda(non_blocking=True), MEAN, lighting=True)
    labels = labels.cuda()
    with torch.no_grad():
        reference = model(images)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_compile_gives_the_eager_output():
    torch.manual_seed(0)
    model = resnet.build("cifar_resnet20", num_classes=10).cuda().eval()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-3, rtol=1e-3)


def test_pinned_batches_from_loader_workers_equal_unpinned_ones(tmp_path, monkeypatch):
    """With pin_memory (the trainer's GPU path) the batches leave the workers' reused buffers
    through pinned copies, and are the batches the unpinned loader gives."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    shard.shard(make_params(tmp_path, "shard.maxcount=170"))

    def epoch(pin_memory: bool) -> list[torch.Tensor]:
        return [x for x, _ in digits_loader(tmp_path / "shards", epoch=1, pin_memory=pin_memory)]  # all held

    pinned, unpinned = epoch(True), epoch(False)
    assert all(x.is_pinned() for x in pinned)
    assert len(pinned) == len(unpinned) and all(torch.equal(a, b) for a, b in zip(pinned, unpinned, strict=True))
