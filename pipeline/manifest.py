"""manifest.json: what the shard stage writes beside the shards, and every later stage reads.

The manifest lists each split's shards (name, sample count, bytes, sha256), the class names in
label order, the train split's per-channel mean, and each split's image sizes. `read_manifest`
checks a manifest against `Manifest` before any stage relies on it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline import artifacts
from pipeline.artifacts import Artifact, Record

MANIFEST = "manifest.json"


class ManifestShard(Record):
    # Relative to the shards folder, and inside it: the loader joins it onto the folder's URL.
    name: str = Field(pattern=r"^[\w-]+/[\w.-]+\.tar$")
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)  # `verify` compares the file with these two
    sha256: str


class ImageSize(Record):
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


class Noted(Record):
    """An input the shard stage left out (rejected, or skipped as a hidden file), and why."""

    source: str
    reason: str


class Converted(Record):
    """An input re-encoded as an RGB baseline JPEG, and what it was (e.g. "CMYK JPEG")."""

    source: str
    from_: str = Field(alias="from")  # a Python keyword: the file's key is the alias


class ManifestSplit(Record):
    num_samples: int = Field(ge=0)
    shards: list[ManifestShard]
    rejected: list[Noted]
    converted: list[Converted]
    skipped: list[Noted]
    image_size: ImageSize | None  # null for a split without images


class Manifest(Artifact):
    """manifest.json as every stage that reads it relies on it. The shard stage writes it; one
    edited by hand, cut short or written by something else is refused when it is read, in one
    line that names the key, rather than as a KeyError in a Ray worker a minute later. Keys
    beyond these are allowed: the shard stage adds notes (class_names, a source's own) that no
    stage needs."""

    # 3: image sizes are always recorded (2 added the test split beside train and val)
    SCHEMA: ClassVar[int] = 3
    STAGE: ClassVar[str] = "shard"
    model_config = ConfigDict(extra="allow")
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

    def shard_list(self, shards: str, split: str) -> list[tuple[str, int]]:
        """(url, number of samples) of each shard of a split, in manifest order."""
        root = shards.rstrip("/")
        return [(f"{root}/{s.name}", s.num_samples) for s in self.splits[split].shards]


SCHEMA = Manifest.SCHEMA


def read_manifest(shards: str) -> Manifest:
    """The shards' manifest.json, checked against `Manifest`; any problem is one UsageError
    line that names the file (and the key)."""
    return artifacts.read(f"{shards.rstrip('/')}/{MANIFEST}", Manifest)
