"""manifest.json: what the shard stage writes beside the shards, and every later stage reads.

The manifest lists each split's shards (name, sample count, bytes, sha256), the class names in
label order, the train split's per-channel mean, and each split's image sizes. `read_manifest`
checks a manifest against `Manifest` before any stage relies on it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UsageError
from pipeline.files import open_url

MANIFEST = "manifest.json"
# 2: a test split beside train and val (schema 1 had train and val, and val both chose and scored)
SCHEMA = 2


# manifest.json as every stage that reads it relies on it. The shard stage writes it; one edited
# by hand, cut short or written by something else is refused when it is read, in one line that
# names the key, rather than as a KeyError in a Ray worker a minute later. Types are strict (a
# count of "12" or true is an error, not 12 or 1): the stages go on reading the dict itself.
# Keys beyond these are allowed: the shard stage adds notes (class_names, a source's own) that
# no stage needs.


class _ManifestPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class ManifestShard(_ManifestPart):
    # Relative to the shards folder, and inside it: the loader joins it onto the folder's URL.
    name: str = Field(pattern=r"^[\w-]+/[\w.-]+\.tar$")
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)  # `verify` compares the file with these two
    sha256: str


class ImageSize(_ManifestPart):
    """The sides of a split's images, in pixels; `uniform` is [width, height] when every image
    has that size, else null."""

    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    uniform: list[int] | None = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ordered(self) -> ImageSize:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is over max_side {self.max_side}")
        if self.uniform is not None and not (min(self.uniform) == self.min_side and max(self.uniform) == self.max_side):
            raise ValueError(
                f"uniform {self.uniform} disagrees with min_side {self.min_side}, max_side {self.max_side}"
            )
        return self


class ManifestSplit(_ManifestPart):
    num_samples: int = Field(ge=0)
    shards: list[ManifestShard]
    rejected: list[Any]
    converted: list[Any]
    # null for a split without images; absent from manifests written before sizes were recorded
    image_size: ImageSize | None = None


class Manifest(_ManifestPart):
    source: str
    classes: list[str] = Field(min_length=1)  # the net's outputs, in label order
    mean: list[float] = Field(min_length=3, max_length=3)  # per channel, subtracted from every image
    splits: dict[str, ManifestSplit]

    @field_validator("splits")
    @classmethod
    def _train_val_and_test(cls, splits: dict[str, ManifestSplit]) -> dict[str, ManifestSplit]:
        for split in ("train", "val", "test"):
            if split not in splits:
                raise ValueError(f"no {split!r} split; the shard stage writes train, val and test")
        return splits


def read_manifest(shards: str) -> dict[str, Any]:
    """The shards' manifest.json, checked against `Manifest`; any problem is one UsageError
    line that names the file (and the key)."""
    url = f"{shards.rstrip('/')}/{MANIFEST}"
    try:
        with open_url(url, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{url}: missing; run `python -m pipeline.shard` first") from None
    except IsADirectoryError:
        raise UsageError(f"{url}: a folder, not a file; run `python -m pipeline.shard` to write the shards") from None
    except NotADirectoryError:
        raise UsageError(f"{url}: {shards} is a file, not a folder of shards (paths.shards)") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{url}: not a text file (byte {e.start} is not UTF-8)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"{url}: not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"{url}: cannot be read ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{url}: a JSON {type(manifest).__name__}, expected an object")
    if "schema" not in manifest:
        raise UsageError(f"{url}: schema: missing key; expected {SCHEMA}")
    schema = manifest["schema"]
    if type(schema) is int and 1 <= schema < SCHEMA:  # `type`: JSON's true is no schema 1
        # Shards of an older shard stage (schema 1: no test split): the stage replaces them.
        raise UsageError(
            f"{url}: schema {schema}, expected {SCHEMA}; rerun the shard stage (`python -m pipeline.shard`)"
        )
    if type(schema) is not int or schema != SCHEMA:
        raise UsageError(f"{url}: schema: {schema!r}, expected {SCHEMA}")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        raise UsageError(f"{url}: {manifest_problem(e.errors()[0])}") from None
    return manifest


def manifest_problem(error: dict[str, Any]) -> str:
    """One pydantic error as `dotted.key: what is wrong (got value)`."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{key}: missing key"
    message = error["msg"].removeprefix("Value error, ")
    value = error["input"]
    if isinstance(value, (dict, list)):  # a whole section: its key says enough
        return f"{key}: {message}"
    shown = repr(value)
    return f"{key}: {message} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def shard_list(shards: str, manifest: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(url, number of samples) of each shard of a split, in manifest order."""
    root = shards.rstrip("/")
    return [(f"{root}/{s['name']}", s["num_samples"]) for s in manifest["splits"][split]["shards"]]
