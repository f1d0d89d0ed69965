"""The ResNet family of He et al., "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

Pure PyTorch. One `ResNet` class built from a table of specs (`SPECS`, plus the CIFAR family
of depth 6n+2), in the manner of torchvision's `models/resnet.py`, whose parameter names this
module keeps (conv1, bn1, layer1..4, fc, downsample.0/.1) so its state_dicts load with
`strict=True`.

Where the paper and torchvision differ, the paper is the default and torchvision's choice is
an option:
- Bottleneck stride: the paper strides the first 1x1 conv ("v1", the default); torchvision
  strides the 3x3 conv ("v1.5"), which costs ~8% more multiply-adds in ResNet-50 and gains
  ~0.5% top-1 (NVIDIA's ResNet-50 v1.5 notes). Parameter counts are identical.
- Shortcuts: the paper's options of Table 3 are all offered by name (`SHORTCUTS`); each net's
  default is the one the paper used for it (A for ResNet-18/34 and the CIFAR nets, B for the
  bottleneck nets). torchvision is option B everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHORTCUTS = ("none", "A", "B", "C")
"""none: a plain net (no shortcut). A: identity, zero-padded channels and stride-2 subsampling
where dimensions grow (no parameters). B: 1x1 conv + BN projection where dimensions change,
identity elsewhere. C: projection on every shortcut."""

BOTTLENECK_VARIANTS = ("v1", "v1.5")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BN, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity with stride-2 subsampling and zero-padded extra channels.

    A module rather than a lambda so that the model pickles, scripts and exports.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pair pads dim 1 (channels) of an NCHW tensor.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class Projection(nn.Sequential):
    """Options B and C: a 1x1 conv + BN projection (torchvision's `downsample`)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


def make_shortcut(kind: str, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The module on a block's shortcut path for option `kind`; None means identity (or, for
    `none`, no shortcut at all: the block then reads `residual=False`)."""
    changes_shape = stride != 1 or in_planes != out_planes
    if kind == "C" or (kind == "B" and changes_shape):
        return Projection(in_planes, out_planes, stride)
    if kind == "A" and changes_shape:
        return ZeroPadShortcut(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 2 left); ResNet-18/34 and the CIFAR nets."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride)
        self.residual = shortcut != "none"

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right); ResNet-50/101/152."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str, variant: str = "v1") -> None:
        super().__init__()
        out_planes = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if variant == "v1" else (1, stride)
        self.conv1 = conv1x1(in_planes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride)
        self.residual = shortcut != "none"

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


@dataclass(frozen=True)
class Spec:
    """One row of the architecture table."""

    block: type[BasicBlock | Bottleneck]
    blocks_per_stage: tuple[int, ...]
    widths: tuple[int, ...]  # planes of each stage (a bottleneck's output is 4x this)
    stem: str  # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": one 3x3 conv
    default_shortcut: str  # the option the paper used for this net

    @property
    def depth(self) -> int:
        convs_per_block = 3 if self.block is Bottleneck else 2
        return convs_per_block * sum(self.blocks_per_stage) + 2  # + stem conv + fc


IMAGENET_WIDTHS = (64, 128, 256, 512)

# Table 1 of the paper. Option A for 18/34 (Table 2's comparison with plain nets at equal
# parameters); option B for the bottleneck nets (Sec. 4.1, "Deeper Bottleneck Architectures").
SPECS: dict[str, Spec] = {
    "resnet18": Spec(BasicBlock, (2, 2, 2, 2), IMAGENET_WIDTHS, "imagenet", "A"),
    "resnet34": Spec(BasicBlock, (3, 4, 6, 3), IMAGENET_WIDTHS, "imagenet", "A"),
    "resnet50": Spec(Bottleneck, (3, 4, 6, 3), IMAGENET_WIDTHS, "imagenet", "B"),
    "resnet101": Spec(Bottleneck, (3, 4, 23, 3), IMAGENET_WIDTHS, "imagenet", "B"),
    "resnet152": Spec(Bottleneck, (3, 8, 36, 3), IMAGENET_WIDTHS, "imagenet", "B"),
}

CIFAR_PREFIX = "cifar_resnet"
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)  # Table 6; any other 6n+2 builds as well


def cifar_spec(depth: int) -> Spec:
    """Sec. 4.2: 3 stages of n basic blocks at widths 16/32/64, depth 6n+2, option A."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
    n = (depth - 2) // 6
    return Spec(BasicBlock, (n, n, n), (16, 32, 64), "cifar", "A")


def model_names() -> list[str]:
    """The names `build` accepts (the CIFAR family is open-ended: any 6n+2 depth)."""
    return [*SPECS, *(f"{CIFAR_PREFIX}{d}" for d in CIFAR_DEPTHS)]


def spec_for(name: str) -> Spec:
    if name in SPECS:
        return SPECS[name]
    if name.startswith(CIFAR_PREFIX) and name[len(CIFAR_PREFIX) :].isdigit():
        return cifar_spec(int(name[len(CIFAR_PREFIX) :]))
    raise ValueError(
        f"unknown model {name!r}; valid: {', '.join(SPECS)}, or {CIFAR_PREFIX}<6n+2> "
        f"(e.g. {', '.join(f'{CIFAR_PREFIX}{d}' for d in CIFAR_DEPTHS)})"
    )


class ResNet(nn.Module):
    def __init__(
        self,
        spec: Spec,
        shortcut: str,
        num_classes: int = 1000,
        in_channels: int = 3,
        bottleneck: str = "v1",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
        if bottleneck not in BOTTLENECK_VARIANTS:
            raise ValueError(f"unknown bottleneck {bottleneck!r}; valid: {', '.join(BOTTLENECK_VARIANTS)}")
        if zero_init_residual and shortcut == "none":
            # With no shortcut, a zeroed last BN would cut every block's output to zero.
            raise ValueError("zero_init_residual needs a residual net (shortcut A, B or C), not 'none'")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")

        stem_width = spec.widths[0]
        if spec.stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, stem_width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        block: Callable[..., nn.Module] = spec.block
        if spec.block is Bottleneck:
            block = partial(Bottleneck, variant=bottleneck)
        in_planes = stem_width
        for index, (num_blocks, planes) in enumerate(zip(spec.blocks_per_stage, spec.widths)):
            first_stride = 1 if index == 0 else 2  # each later stage halves the feature map
            blocks = []
            for i in range(num_blocks):
                blocks.append(block(in_planes, planes, first_stride if i == 0 else 1, shortcut))
                in_planes = planes * spec.block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(spec.blocks_per_stage)

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)

        # He initialisation (the paper's ref. [13]), in torchvision's fan_out form.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017: each residual block starts as identity. Not in the paper.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(
    name: str,
    *,
    shortcut: str | None = None,
    num_classes: int = 1000,
    in_channels: int = 3,
    bottleneck: str = "v1",
    zero_init_residual: bool = False,
) -> ResNet:
    """Build a net of the family by name, e.g. `build("resnet50", shortcut="B")`.

    `shortcut=None` takes the paper's option for that net; `"none"` gives its plain counterpart.
    `bottleneck` ("v1" paper, "v1.5" torchvision) only affects ResNet-50/101/152.
    """
    spec = spec_for(name)
    return ResNet(
        spec,
        shortcut=spec.default_shortcut if shortcut is None else shortcut,
        num_classes=num_classes,
        in_channels=in_channels,
        bottleneck=bottleneck,
        zero_init_residual=zero_init_residual,
    )


def model_name(arch: str, depth: int) -> str:
    """The `build` name for params' (model.arch, model.depth), e.g. ("cifar", 20) -> "cifar_resnet20"."""
    if arch == "cifar":
        return f"{CIFAR_PREFIX}{depth}"
    if arch == "imagenet":
        return f"resnet{depth}"
    raise ValueError(f"unknown arch {arch!r}; valid: cifar, imagenet")
