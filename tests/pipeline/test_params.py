"""params.yaml: schema, overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from pipeline import cli, params
from pipeline.errors import UsageError


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


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("folder", "a folder, not a params file"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)), "not a text file (byte 8 is not UTF-8); expected YAML"),
        ("paths: caf\xe9\n".encode("latin-1"), "not a text file (byte 10 is not UTF-8)"),
        (b"paths:\x00\n", "not valid YAML (character #x0000 at position 6: special characters are not allowed)"),
        (b"", "empty; expected a mapping of sections (paths, data, shard, model, train, tune, mlflow)"),
        (b"# nothing but a comment\n", "empty; expected a mapping of sections"),
        (b"just a string\n", "expected a mapping of sections at the top level, got a str"),
        (b"!!python/object:os.system {}\n", "line 1 not valid YAML (could not determine a constructor"),
    ],
    ids=["folder", "binary", "latin-1", "nul-byte", "empty", "comment-only", "scalar", "python-tag"],
)
def test_a_params_file_that_is_not_a_mapping_is_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    if content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(params.ParamsError) as info:
        params.load(path)
    assert str(info.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["data.seed", "train.seed"])
def test_seeds_are_in_the_range_numpy_and_sklearn_take(repo, key):
    assert load(repo, f"{key}=0") and load(repo, f"{key}={2**32 - 1}")
    assert f"{key}: Input should be greater than or equal to 0 (got -1)" in error_of(repo, f"{key}=-1")
    assert f"{key}: Input should be less than or equal to 4294967295 (got 4294967296)" in error_of(
        repo, f"{key}={2**32}"
    )


def test_a_val_fraction_that_leaves_a_class_without_train_images_is_one_line():
    """data.val_fraction stays (0, 1) here: how far it may go depends on the data set (digits:
    10 classes of 1,797 images), and the digits source turns scikit-learn's refusal into a line."""
    from sklearn.datasets import load_digits

    from pipeline.sources import digits_split

    labels = load_digits().target
    for fraction in (0.999, 0.001):
        with pytest.raises(UsageError, match=f"^data.val_fraction: {fraction} cannot split 1797 images by class"):
            digits_split(labels, 0, fraction, 0.2)
        with pytest.raises(UsageError, match=f"^data.test_fraction: {fraction} cannot split 1797 images by class"):
            digits_split(labels, 0, 0.2, fraction)


def test_val_and_test_fractions_must_leave_train_images(repo):
    assert load(repo, "data.val_fraction=0.3", "data.test_fraction=0.3")
    assert (
        "data.test_fraction: with data.val_fraction 0.5, leaves no train images (the two must sum under 1) (got 0.5)"
        in error_of(repo, "data.val_fraction=0.5", "data.test_fraction=0.5")
    )
    assert "data.val_per_class: Input should be greater than or equal to 1 (got 0)" in error_of(
        repo, "data.val_per_class=0"
    )


def test_the_depths_params_accept_are_those_resnet_builds():
    """params writes resnet's depth rules down rather than importing the model: the two agree."""
    import resnet

    assert params.IMAGENET_DEPTHS == tuple(spec.depth for spec in resnet.SPECS.values())
    for depth in range(2000):
        try:
            resnet.spec_for(resnet.model_name("cifar", depth))
            builds = True
        except ValueError as e:
            builds = False
            assert str(e).startswith(params.CIFAR_DEPTH_RULE)
        assert params.is_cifar_depth(depth) is builds, depth
