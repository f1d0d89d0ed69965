"""The model family against the paper's tables and against torchvision."""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

import resnet
from resnet.summary import count_params, summarize

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CIFAR = [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)]  # 1202 has tests of its own

# torchvision 0.29's documented parameter counts (the num_params of its ResNet weights' docs).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# Paper, Table 1: multiply-adds at 224x224.
PAPER_MACS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9, "resnet152": 11.3e9}
# Paper, Table 6: parameters of the CIFAR nets (option A), to the precision printed there.
PAPER_CIFAR_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M", 1202: "19.4M"}


def randomize_bn_statistics(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give BN non-trivial running statistics, so that eval-mode comparisons exercise them."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("name", IMAGENET)
def test_matches_torchvision(name):
    generator = torch.Generator().manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    randomize_bn_statistics(reference, generator)
    ours = resnet.build(name, shortcut="B", bottleneck="v1.5").eval()

    assert count_params(ours) == count_params(reference) == TORCHVISION_PARAMS[name]
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=generator)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff < 1e-4


def test_v1_bottleneck_differs_from_torchvision():
    """v1 (the paper) strides the 1x1 conv: same weights, different function."""
    reference = torchvision.models.resnet50().eval()
    ours = resnet.build("resnet50", shortcut="B", bottleneck="v1").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() > 1e-3
    assert ours.layer2[0].conv1.stride == (2, 2) and ours.layer2[0].conv2.stride == (1, 1)


@pytest.mark.parametrize("name", IMAGENET)
def test_multiply_adds_match_paper_table1(name):
    model = resnet.build(name, bottleneck="v1")  # the paper's variant and shortcut option
    macs = sum(row.macs for row in summarize(model, 224))
    assert abs(macs / PAPER_MACS[name] - 1) < 0.05, f"{name}: {macs / 1e9:.3f}G vs {PAPER_MACS[name] / 1e9}G"


def test_v15_costs_more_multiply_adds_than_v1():
    v1 = sum(r.macs for r in summarize(resnet.build("resnet50", bottleneck="v1"), 224))
    v15 = sum(r.macs for r in summarize(resnet.build("resnet50", bottleneck="v1.5"), 224))
    assert v15 > v1 * 1.05


@pytest.mark.parametrize("depth", sorted(PAPER_CIFAR_PARAMS))
def test_cifar_parameter_counts_match_paper_table6(depth):
    params = count_params(resnet.build(f"cifar_resnet{depth}", shortcut="A", num_classes=10))
    printed = PAPER_CIFAR_PARAMS[depth]
    decimals = len(printed.rstrip("M").split(".")[1])
    assert f"{params / 1e6:.{decimals}f}M" == printed


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "cifar_resnet20", "cifar_resnet56"])
def test_shortcut_parameter_order(name):
    params = {s: count_params(resnet.build(name, shortcut=s, num_classes=10)) for s in resnet.SHORTCUTS}
    assert params["A"] == params["none"], "option A must be parameter-free"
    assert params["C"] > params["B"] > params["A"]


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
@pytest.mark.parametrize("shortcut", resnet.SHORTCUTS)
def test_forward_backward_every_parameter_gets_a_gradient(name, shortcut):
    torch.manual_seed(0)
    model = resnet.build(name, shortcut=shortcut, num_classes=50)
    size = 64 if name in IMAGENET else 32
    out = forward_backward(model, torch.randn(2, 3, size, size))
    assert out.shape == (2, 50)
    assert torch.isfinite(out).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


def test_cifar_resnet1202_forward_backward():
    model = resnet.build("cifar_resnet1202", num_classes=50)
    out = forward_backward(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 50) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar_resnet20"])
@pytest.mark.parametrize("shortcut", resnet.SHORTCUTS)
def test_channels_last_input_gives_the_same_output(name, shortcut):
    model = resnet.build(name, shortcut=shortcut, num_classes=50).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar_resnet20"])
def test_every_shortcut_gives_the_same_output_shape(name):
    x = torch.randn(2, 3, 64, 64)
    shapes = {s: resnet.build(name, shortcut=s, num_classes=50).eval()(x).shape for s in resnet.SHORTCUTS}
    assert len(set(shapes.values())) == 1, shapes


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "resnet50"])
def test_option_a_pickles_exports_and_loads_from_state_dict(name):
    model = resnet.build(name, shortcut="A", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

        assert torch.equal(pickle.loads(pickle.dumps(model))(x), expected)

        program = torch.export.export(model, (x,))
        assert torch.allclose(program.module()(x), expected, atol=1e-5)

        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        fresh = resnet.build(name, shortcut="A", num_classes=10).eval()
        fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        assert torch.equal(fresh(x), expected)


def test_option_a_zero_pads_and_subsamples():
    shortcut = resnet.ZeroPadShortcut(2, 5, stride=2)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = shortcut(x)
    assert y.shape == (1, 5, 2, 2)
    assert torch.equal(y[:, :2], x[:, :, ::2, ::2])
    assert not y[:, 2:].any()
    assert list(shortcut.parameters()) == []


def test_option_b_projects_only_where_shape_changes_and_c_everywhere():
    b = resnet.build("resnet18", shortcut="B")
    c = resnet.build("resnet18", shortcut="C")
    b_projections = [n for n, m in b.named_modules() if isinstance(m, resnet.Projection)]
    c_projections = [n for n, m in c.named_modules() if isinstance(m, resnet.Projection)]
    assert b_projections == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]
    assert len(c_projections) == 8  # every block


def test_plain_net_has_no_shortcut():
    model = resnet.build("cifar_resnet20", shortcut="none")
    blocks = [m for m in model.modules() if isinstance(m, resnet.BasicBlock)]
    assert blocks and all(not b.residual and b.downsample is None for b in blocks)


def test_zero_init_residual():
    default = resnet.build("resnet50")
    assert all(m.bn3.weight.abs().sum() > 0 for m in default.modules() if isinstance(m, resnet.Bottleneck))
    zeroed = resnet.build("resnet50", zero_init_residual=True)
    assert all(not m.bn3.weight.any() for m in zeroed.modules() if isinstance(m, resnet.Bottleneck))
    with pytest.raises(ValueError, match="residual net"):
        resnet.build("resnet18", shortcut="none", zero_init_residual=True)


def test_he_initialisation():
    model = resnet.build("resnet34")
    conv = model.layer3[1].conv1  # fan_out = 256 * 3 * 3
    expected_std = (2 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet19"}, "valid: resnet18, resnet34, resnet50, resnet101, resnet152"),
        ({"name": "cifar_resnet21"}, "6n\\+2"),
        ({"name": "resnet18", "shortcut": "D"}, "valid: none, A, B, C"),
        ({"name": "resnet50", "bottleneck": "v2"}, "valid: v1, v1.5"),
    ],
)
def test_unknown_names_and_options_list_the_valid_ones(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        resnet.build(name, **kwargs)


def test_default_shortcuts_follow_the_paper():
    assert resnet.spec_for("resnet34").default_shortcut == "A"
    assert resnet.spec_for("resnet50").default_shortcut == "B"
    assert resnet.spec_for("cifar_resnet110").default_shortcut == "A"
    assert resnet.spec_for("resnet152").depth == 152
    assert resnet.spec_for("cifar_resnet1202").depth == 1202


def test_model_name_maps_params_to_builders():
    assert resnet.model_name("cifar", 20) == "cifar_resnet20"
    assert resnet.model_name("imagenet", 50) == "resnet50"
    with pytest.raises(ValueError, match="valid: cifar, imagenet"):
        resnet.model_name("vit", 50)


def test_resnet_imports_no_orchestration_library():
    forbidden = {"ray", "mlflow", "dvc", "webdataset", "pipeline"}
    package = Path(resnet.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for imported in names:
                assert imported.split(".")[0] not in forbidden, f"{source.name} imports {imported}"
