"""Fixtures of the tests of pipeline/'s modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import shard
from tests.helpers import make_params


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """Digits with 7 train shards of at most 170: an odd count, uneven sizes."""
    tmp = tmp_path_factory.mktemp("digits")
    shard.shard(make_params(tmp, "shard.maxcount=170"))
    return tmp / "shards"


@pytest.fixture
def single_process(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
