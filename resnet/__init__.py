"""The ResNet family of He et al. 2015, in pure PyTorch: `from resnet import build`."""

from resnet.model import (
    BOTTLENECK_VARIANTS,
    SHORTCUTS,
    SPECS,
    BasicBlock,
    Bottleneck,
    Projection,
    ResNet,
    Spec,
    ZeroPadShortcut,
    build,
    model_name,
    model_names,
    spec_for,
)

__all__ = [
    "BOTTLENECK_VARIANTS",
    "SHORTCUTS",
    "SPECS",
    "BasicBlock",
    "Bottleneck",
    "Projection",
    "ResNet",
    "Spec",
    "ZeroPadShortcut",
    "build",
    "model_name",
    "model_names",
    "spec_for",
]
