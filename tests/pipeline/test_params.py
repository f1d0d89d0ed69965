"""params.yaml: schema, overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from pipeline import cli, params


def load(repo, *overrides):
    return params.load(repo / "params.yaml", overrides)


def error_of(repo, *overrides) -> str:
    with pytest.raises(params.ParamsError) as info:
        load(repo, *overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_repo_params_are_valid(repo):
    p = load(repo)
    assert p.data.source == "digits"
    assert (p.model.arch, p.model.depth, p.model.shortcut) == ("cifar", 20, "A")


def test_overrides_parse_values_as_yaml(repo):
    p = load(repo, "train.epochs=2", "tune.depths=[20, 32]", "data.root=/some/where", "train.use_gpu=true")
    assert p.train.epochs == 2
    assert p.tune.depths == [20, 32]
    assert p.data.root == "/some/where"
    assert p.train.use_gpu is True


def test_later_override_wins(repo):
    assert load(repo, "train.epochs=2", "train.epochs=3").train.epochs == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.shortcut=D", "model.shortcut: Input should be 'none', 'A', 'B' or 'C' (got 'D')"),
        ("train.epoch=3", "train.epoch: unknown key; valid keys under train: epochs, batch_size"),
        ("train.epochs=abc", "train.epochs: Input should be a valid integer"),
        ("data.source=mnist", "data.source: Input should be 'digits', 'imagenet', 'imagefolder' or 'cifar10'"),
        ("model.depth=21", "model.depth: CIFAR ResNet depth must be 6n+2"),
        ("model.arch=imagenet", "model.depth: not a depth of the ImageNet nets; valid: 18, 34, 50, 101, 152"),
        ("nosuch.key=1", "nosuch: unknown key; valid keys: paths, data, shard, model, train, tune, mlflow"),
        ("shard.maxcount=0", "shard.maxcount: Input should be greater than 0"),
        ("tune.shortcuts=[A, Z]", "tune.shortcuts.1: Input should be 'none', 'A', 'B' or 'C' (got 'Z')"),
        ("train.epochs.x=1", "--set train.epochs.x: train.epochs is a value, not a section"),
        ("train.epochs", "--set 'train.epochs': expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(repo, override, expected):
    assert expected in error_of(repo, override)


def test_missing_key_is_an_error_not_a_default(tmp_path, repo):
    text = (repo / "params.yaml").read_text().replace("  seed: 0\n", "", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(params.ParamsError, match="data.seed: missing key"):
        params.load(tmp_path / "params.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(params.ParamsError, match="no such params file"):
        params.load(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(params.ParamsError, match="not valid YAML"):
        params.load(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(params.ParamsError, match="expected a mapping"):
        params.load(tmp_path / "list.yaml")


def test_params_are_frozen(repo):
    p = load(repo)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        p.train.epochs = 5  # type: ignore[misc]


def test_cli_parse_reads_params_and_overrides(repo):
    p = cli.parse("test", "a test", ["--params", str(repo / "params.yaml"), "--set", "train.epochs=4"])
    assert p.train.epochs == 4


def test_run_turns_a_usage_error_into_one_line_and_exit_2(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "from pipeline import cli\n"
        "def main():\n"
        "    cli.parse('demo', 'demo', ['--params', 'params.yaml', '--set', 'model.shortcut=D'])\n"
        "cli.run(main)\n"
    )
    from tests.conftest import REPO

    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: params.yaml: model.shortcut: Input should be 'none', 'A', 'B' or 'C' (got 'D')"]


def test_sweep_depths_must_suit_the_arch(repo):
    params.check_sweep(load(repo))
    with pytest.raises(params.ParamsError, match="tune.depths: 21: CIFAR ResNet depth must be 6n\\+2"):
        params.check_sweep(load(repo, "tune.depths=[20, 21]"))
    with pytest.raises(params.ParamsError, match="tune.depths: 20: not a depth of the ImageNet nets"):
        params.check_sweep(load(repo, "model.arch=imagenet", "model.depth=50"))
