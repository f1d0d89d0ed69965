"""manifest.json as the shard stage writes it and every other stage reads it: a typed value, and
one line for a file that is not what the shard stage wrote. (Every kind of malformed manifest, as
the training stages refuse it: tests/pipeline/test_driver.py.)"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline import artifacts
from pipeline.errors import UsageError
from pipeline.manifest import MANIFEST, Manifest, read_manifest


def test_the_shard_stages_manifest_reads_back_as_the_same_value(digit_shards, tmp_path):
    manifest = read_manifest(str(digit_shards))
    assert manifest.schema_version == Manifest.SCHEMA and manifest.source == "digits"
    assert set(manifest.splits) == {"train", "val", "test"} and len(manifest.classes) == 10
    artifacts.write(tmp_path / MANIFEST, manifest)
    assert read_manifest(str(tmp_path)) == manifest
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert written["schema"] == Manifest.SCHEMA and "schema_version" not in written  # the file's key
    assert all("from" in c for split in written["splits"].values() for c in split["converted"])


def test_shard_list_gives_each_shards_url_and_count_in_manifest_order(digit_shards):
    manifest = read_manifest(str(digit_shards))
    listed = manifest.shard_list(f"{digit_shards}/", "val")
    assert [url for url, _ in listed] == [f"{digit_shards}/{s.name}" for s in manifest.splits["val"].shards]
    assert sum(count for _, count in listed) == manifest.splits["val"].num_samples


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (2, "schema 2, expected 3, from an older version; run `python -m pipeline.shard` again"),
        (4, "schema: 4, expected 3"),
        (True, "schema: True, expected 3"),
    ],
)
def test_a_manifest_of_another_schema_is_one_line_naming_the_stage_to_rerun(digit_shards, tmp_path, schema, expected):
    written = json.loads((digit_shards / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**written, "schema": schema}))
    with pytest.raises(UsageError) as raised:
        read_manifest(str(tmp_path))
    assert str(raised.value) == f"{tmp_path / MANIFEST}: {expected}"


def test_a_manifest_read_is_frozen(digit_shards):
    manifest = read_manifest(str(digit_shards))
    with pytest.raises(ValidationError, match="frozen"):
        manifest.source = "imagenet"
