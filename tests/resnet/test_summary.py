from __future__ import annotations

import pytest

from resnet import summary


def test_summary_prints_layers_params_and_multiply_adds(capsys):
    summary.main(["resnet34", "--shortcut", "A"])
    out = capsys.readouterr().out
    assert "resnet34: 34 layers, shortcut option A" in out
    for layer in ("stem", "layer1", "layer2", "layer3", "layer4", "head", "total"):
        assert layer in out
    assert "21,797,672" not in out  # option A has no projections: fewer parameters than torchvision's B
    assert "3.6" in out.splitlines()[-1]  # Table 1: 3.6e9 multiply-adds


def test_summary_names_the_bottleneck_variant_it_counts(capsys):
    summary.main(["resnet50"])
    out = capsys.readouterr().out
    assert "bottleneck v1: stride on the first 1x1 conv (paper)" in out
    assert "25,557,032" in out
    summary.main(["resnet50", "--bottleneck", "v1.5"])
    assert "v1.5: stride on the 3x3 conv (torchvision)" in capsys.readouterr().out


def test_summary_of_a_cifar_net_defaults_to_32x32(capsys):
    summary.main(["cifar_resnet20"])
    out = capsys.readouterr().out
    assert "input 3x32x32, 10 classes" in out
    assert "269,722" in out


def test_summary_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as info:
        summary.main(["resnet19"])
    assert info.value.code == 2
    assert "valid: resnet18" in capsys.readouterr().err
