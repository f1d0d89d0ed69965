"""Print a net's layers, parameter count and multiply-adds at an input size, as a table.

    python -m resnet.summary resnet34 --shortcut A
    python -m resnet.summary resnet50 --bottleneck v1.5 --input-size 224
    python -m resnet.summary cifar_resnet110 --input-size 32

Multiply-adds are counted as in the paper's Table 1: those of the convolutions and the fc
layer (BN, ReLU, pooling and the shortcut additions are not counted). torch's own
FlopCounterMode does the counting; one multiply-add is two FLOPs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resnet.model import (
    BOTTLENECK_VARIANTS,
    SHORTCUTS,
    Bottleneck,
    ResNet,
    build,
    model_names,
    spec_for,
)


@dataclass(frozen=True)
class Row:
    layer: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(model: ResNet, input_size: int, in_channels: int = 3) -> list[Row]:
    """One row per top-level part of the net (stem, each stage, head), in forward order."""
    parts = {
        "stem": ["conv1", "bn1", "relu", "maxpool"],
        **{f"layer{i + 1}": [f"layer{i + 1}"] for i in range(model.num_stages)},
        "head": ["avgpool", "fc"],
    }
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        getattr(model, attrs[-1]).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name, attrs in parts.items()
    ]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    # FlopCounterMode keys its counts by module path, rooted at the class name.
    flops = counter.get_flop_counts()
    root = type(model).__name__
    return [
        Row(
            layer=name,
            output_shape=shapes[name],
            params=sum(count_params(getattr(model, attr)) for attr in attrs),
            macs=sum(sum(flops.get(f"{root}.{attr}", {}).values()) for attr in attrs) // 2,
        )
        for name, attrs in parts.items()
    ]


def format_table(rows: list[Row]) -> str:
    total_macs = sum(r.macs for r in rows)
    scale, unit = (1e9, "G") if total_macs >= 1e9 else (1e6, "M")
    header = ("layer", "output (C, H, W)", "params", "mult-adds")
    body = [(r.layer, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs / scale:.3f}{unit}") for r in rows]
    total = ("total", "", f"{sum(r.params for r in rows):,}", f"{total_macs / scale:.3f}{unit}")
    widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])


def describe(name: str, shortcut: str, bottleneck: str) -> str:
    spec = spec_for(name)
    kind = "plain" if shortcut == "none" else f"shortcut option {shortcut}"
    blocks = " + ".join(f"{n}" for n in spec.blocks_per_stage)
    text = f"{name}: {spec.depth} layers, {kind}, {blocks} {spec.block.__name__} blocks"
    if spec.block is Bottleneck:
        where = "first 1x1 conv (paper)" if bottleneck == "v1" else "3x3 conv (torchvision)"
        text += f", bottleneck {bottleneck}: stride on the {where}"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m resnet.summary", description=__doc__.split("\n")[0])
    parser.add_argument("name", help=f"one of {', '.join(model_names())}, or cifar_resnet<6n+2>")
    parser.add_argument("--shortcut", choices=SHORTCUTS, help="default: the paper's option for this net")
    parser.add_argument("--bottleneck", choices=BOTTLENECK_VARIANTS, default="v1")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 1000 (ImageNet), 10 (CIFAR)")
    parser.add_argument("--input-size", type=int, default=None, help="default: 224 (ImageNet), 32 (CIFAR)")
    args = parser.parse_args(argv)
    try:
        spec = spec_for(args.name)
    except ValueError as e:
        parser.error(str(e))
    imagenet = spec.stem == "imagenet"
    shortcut = args.shortcut or spec.default_shortcut
    num_classes = args.num_classes or (1000 if imagenet else 10)
    input_size = args.input_size or (224 if imagenet else 32)
    model = build(args.name, shortcut=shortcut, num_classes=num_classes, bottleneck=args.bottleneck)
    print(describe(args.name, shortcut, args.bottleneck))
    print(f"input 3x{input_size}x{input_size}, {num_classes} classes; mult-adds of convs and fc\n")
    print(format_table(summarize(model, input_size)))


if __name__ == "__main__":
    main()
