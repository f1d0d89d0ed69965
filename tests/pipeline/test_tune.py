"""The tune stage's pure parts: the sweep's name (same experiment, same name: a rerun resumes it;
another experiment, another name), a trial's params and label, the console table."""

from __future__ import annotations

import pytest

from pipeline import params as params_module
from pipeline import tune
from pipeline.params import EXECUTION_KEYS
from tests.conftest import REPO
from tests.helpers import failed_trial, finished_trial

SHA = "a" * 64


def name_with(*overrides: str, manifest_sha: str = SHA) -> str:
    return tune.sweep_name(params_module.load(REPO / "params.yaml", list(overrides)), manifest_sha)


@pytest.mark.parametrize(
    "override",
    ["train.warmup_epochs=2", "train.epochs=3", "train.lr=0.05", "train.flip=true", "train.seed=1",
     "tune.depths=[20]", "tune.scheduler=asha", "model.bottleneck=v1.5", "model.zero_init_residual=true"],
)  # fmt: skip
def test_a_param_that_changes_a_result_renames_the_sweep(override):
    assert name_with(override) != name_with()


EXECUTION_OVERRIDES = {
    "num_workers": "2", "use_gpu": "true", "cpus_per_worker": "2", "loader_workers": "2", "compile": "true",
    "max_failures": "0", "checkpoints_to_keep": "5", "run_name": "mine", "max_concurrent_trials": "1", "name": "mine",
}  # fmt: skip


@pytest.mark.parametrize("section, key", [(s, k) for s, keys in EXECUTION_KEYS.items() if s != "shard" for k in keys])
def test_how_and_where_trials_run_does_not_rename_the_sweep(section, key):
    assert name_with(f"{section}.{key}={EXECUTION_OVERRIDES[key]}") == name_with()


def test_the_grid_varies_depth_and_shortcut_so_they_do_not_rename_it_but_the_data_does():
    assert name_with("model.depth=56", "model.shortcut=C") == name_with()
    assert name_with(manifest_sha="b" * 64) != name_with()
    assert name_with() == name_with() and name_with().startswith("sweep-")


def test_a_trials_params_and_label():
    base = params_module.load(REPO / "params.yaml").model_dump(mode="json")
    trial = tune.trial_params(base, 56, "C", "sweep-x-0001")
    assert (trial.model.depth, trial.model.shortcut, trial.train.run_name) == (56, "C", "sweep-x-0001")
    assert tune.trial_label("cifar", 56, "C") == "cifar_resnet56-C"


def test_the_console_table_has_a_row_a_trial_and_names_a_failure():
    table = tune.format_table([finished_trial(20, "A", 0.02, 0.05), failed_trial(56, "B")]).splitlines()
    assert table[0].split()[:2] == ["depth", "shortcut"] and len(table) == 4
    assert table[2].split()[:2] == ["20", "A"] and "5.00%" in table[2] and "2.00%" in table[2]
    assert table[3].split()[:3] == ["56", "B", "failed:"]
