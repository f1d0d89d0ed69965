"""The register stage's rule: only val decides who holds the alias (the lower val error, then, on
a tie, the lower val loss), as a pure decision and on a real MLflow store; and it takes only the
test figures of the checkpoint the sweep chose."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import artifacts, register
from pipeline.artifacts import Evaluation
from pipeline.errors import UsageError
from tests.helpers import finished_trial

NAME, ALIAS = "resnet-digits", "champion"


def test_the_decision_lower_error_takes_it_equal_error_and_lower_loss_takes_it_equal_on_both_keeps_it():
    assert register.decide((0.1, 0.5), None) == (True, "no version held it")
    assert register.decide((0.1, 9.0), ("3", (0.2, 0.1)))[0]
    assert not register.decide((0.2, 0.1), ("3", (0.1, 9.0)))[0]
    assert register.decide((0.1, 0.2), ("3", (0.1, 0.3)))[0]
    keeps, why = register.decide((0.1, 0.3), ("3", (0.1, 0.3)))
    assert not keeps and "ties version 3's" in why and "does not beat" in why
    takes, why = register.decide((0.1, 0.3), ("3", (0.1, math.inf)))  # a champion without a recorded loss
    assert takes and why.endswith("beats unrecorded")


def test_a_versions_rank_comes_from_its_val_tags_and_one_without_them_ranks_last():
    assert register.version_rank({"val_top1_error": "0.05", "val_loss": "0.2", "test_top1_error": "0.9"}) == (0.05, 0.2)
    assert register.version_rank({"val_top1_error": "0.1", "val_loss": "nan"}) == (0.1, math.inf)
    assert register.version_rank({}) == (math.inf, math.inf)  # registered by hand, or by another tool


def test_a_lower_val_error_takes_the_alias_whatever_the_losses_and_says_whose_error_it_beats():
    takes, why = register.decide((0.01, 9.0), ("3", (0.02, 0.001)))
    assert takes and why == "val top-1 error 1.00% beats version 3's 2.00%"
    takes, why = register.decide((0.01, math.inf), ("3", (0.02, 0.5)))  # no loss of its own
    assert takes and "beats version 3's" in why


def test_a_higher_val_error_does_not_take_the_alias_whatever_the_losses():
    keeps, why = register.decide((0.02, 0.001), ("4", (0.01, 9.0)))
    assert not keeps and "2.00% does not beat version 4's 1.00%" in why
    assert not register.decide((0.02, 0.001), ("4", (0.01, math.inf)))[0]


def test_on_equal_val_errors_the_lower_val_loss_takes_the_alias_and_a_higher_or_equal_one_does_not():
    takes, why = register.decide((0.0, 0.05), ("2", (0.0, 0.1)))
    assert takes and "ties version 2's" in why and "0.05 beats 0.1" in why
    keeps, why = register.decide((0.0, 0.2), ("2", (0.0, 0.1)))
    assert not keeps and "ties version 2's" in why and "0.2 does not beat version 2's 0.1" in why
    assert not register.decide((0.0, 0.1), ("2", (0.0, 0.1)))[0]


def test_on_equal_val_errors_a_new_version_without_a_loss_never_takes_the_alias():
    keeps, why = register.decide((0.0, math.inf), ("2", (0.0, 0.1)))
    assert not keeps and "unrecorded does not beat version 2's 0.1" in why
    keeps, why = register.decide((0.0, math.inf), ("2", (0.0, math.inf)))  # neither has one: the champion stays
    assert not keeps and why.endswith("unrecorded does not beat version 2's unrecorded")


def test_no_champion_means_the_new_version_takes_the_alias_even_without_figures():
    assert register.decide((math.inf, math.inf), None) == (True, "no version held it")


def test_register_takes_only_the_test_figures_of_the_chosen_checkpoint(tmp_path):
    trial = finished_trial(20, "A", 0.01, 0.05, checkpoint="/ray/run-b/checkpoint_000004", mlflow_run_id="b")
    chosen = Evaluation(
        mlflow_run_id="b", checkpoint_name="checkpoint_000004", depth=20, shortcut="A", split="test", crop="single",
        top1_error=0.0, top5_error=0.0, loss=0.01, num_samples=360,
    )  # fmt: skip
    path = tmp_path / Evaluation.FILE
    artifacts.write(path, chosen.model_copy(update={"split": "val"}))
    with pytest.raises(UsageError, match="eval.json: measured on the 'val' split, expected 'test'; rerun"):
        register.read_eval(str(tmp_path), trial)
    artifacts.write(path, chosen.model_copy(update={"checkpoint_name": "checkpoint_000003"}))
    with pytest.raises(UsageError, match=r"figures of run b checkpoint_000003, not of the sweep's best trial \(run b checkpoint_000004\)"):
        register.read_eval(str(tmp_path), trial)
    artifacts.write(path, chosen)
    assert register.read_eval(str(tmp_path), trial) == chosen
    path.write_text(json.dumps({"top1_error": 0.0, "split": "test"}))  # from before eval.json had a schema
    with pytest.raises(UsageError, match=r"eval\.json: schema: missing key; expected 1$"):
        register.read_eval(str(tmp_path), trial)


@pytest.fixture
def registry(tmp_path) -> MlflowClient:
    """A real MLflow store (SQLite) holding the registered model, no version yet."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(NAME)
    os.makedirs(tmp_path / "model", exist_ok=True)
    return client


def new_version(client: MlflowClient, tmp_path: Path, **tags: float) -> str:
    """A version whose tags are what register writes (the model itself plays no part)."""
    version = client.create_model_version(NAME, str(tmp_path / "model"), tags={k: repr(v) for k, v in tags.items()})
    return str(version.version)


def champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, ALIAS).version)


def test_the_alias_moves_on_a_lower_val_error_or_an_equal_one_with_a_lower_val_loss(registry, tmp_path):
    def settle(**tags: float) -> bool:
        moved, message = register.settle_alias(registry, NAME, ALIAS, new_version(registry, tmp_path, **tags))
        assert ("does not beat" in message) != moved
        return moved

    # Both errors 0: the error alone could never move the alias again.
    assert settle(val_top1_error=0.0, val_loss=0.10, test_top1_error=0.01) and champion(registry) == "1"
    assert settle(val_top1_error=0.0, val_loss=0.05) and champion(registry) == "2"  # equal error, lower loss
    assert not settle(val_top1_error=0.0, val_loss=0.07) and champion(registry) == "2"  # equal error, higher loss
    assert not settle(val_top1_error=0.0, val_loss=0.05) and champion(registry) == "2"  # equal on both: it stays
    assert not settle(val_top1_error=0.01, val_loss=0.001) and champion(registry) == "2"  # higher error
    registry.set_registered_model_alias(NAME, ALIAS, "5")
    assert settle(val_top1_error=0.0, val_loss=0.9) and champion(registry) == "6"  # lower error, whatever the loss
    _, message = register.settle_alias(
        registry, NAME, ALIAS, new_version(registry, tmp_path, val_top1_error=0.0, val_loss=0.95)
    )
    assert message == (
        "version 7 registered without the alias: its val top-1 error 0.00% ties version 6's, and its val loss 0.95 "
        "does not beat version 6's 0.9, which keeps 'champion'"
    )


def test_a_champion_registered_by_hand_without_val_tags_gives_way_to_any_tagged_version(registry, tmp_path):
    by_hand = str(registry.create_model_version(NAME, str(tmp_path / "model")).version)
    registry.set_registered_model_alias(NAME, ALIAS, by_hand)
    moved, message = register.settle_alias(
        registry, NAME, ALIAS, new_version(registry, tmp_path, val_top1_error=0.3, val_loss=2.0)
    )
    assert moved and champion(registry) == "2"
    assert message == "alias 'champion' -> version 2 (version 1, which held it, has no val figures)"
