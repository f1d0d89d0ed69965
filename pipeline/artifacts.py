"""The JSON files one stage writes and later stages read, as typed, frozen values.

Each file has a pydantic model (`Artifact`): the manifest (pipeline.manifest), the sweep's
records (pipeline.records), eval.json and registry.json (here). `read` checks a file against its
model before any stage relies on it, and refuses one that is missing, cut short, edited into
something else or written by an older version of its stage, in one line that names the file, the
key and the stage to rerun. `write` writes one under a temporary name and renames it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from pipeline.errors import UsageError
from pipeline.files import open_url, write_json_atomic


class Record(BaseModel):
    """A part of an artifact: frozen, strict types (a count of "12" or true is an error, not 12
    or 1), no keys beyond its fields."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class Artifact(Record):
    """A whole file: its `schema` version, and the stage that writes it."""

    SCHEMA: ClassVar[int]
    STAGE: ClassVar[str]
    # "schema" is a method of pydantic's BaseModel: the field keeps the file's key by its alias.
    schema_version: int = Field(alias="schema")

    def __init__(self, **fields: Any):
        super().__init__(**{"schema": self.SCHEMA, **fields})


def read(url: str, model: type[Artifact]) -> Artifact:
    """The file at `url` (a path or an s3:// URL) as a `model`, or one UsageError line."""
    rerun = f"run `python -m pipeline.{model.STAGE}`"
    try:
        with open_url(url, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{url}: missing; {rerun} first") from None
    except IsADirectoryError:
        raise UsageError(f"{url}: a folder, not a file; {rerun} to write it") from None
    except NotADirectoryError:
        raise UsageError(f"{url}: {url.rsplit('/', 1)[0]} is a file, not a folder") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{url}: not a text file (byte {e.start} is not UTF-8)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"{url}: not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"{url}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{url}: a JSON {type(data).__name__}, expected an object; {rerun} again")
    if "schema" not in data:
        raise UsageError(f"{url}: schema: missing key; expected {model.SCHEMA}")
    schema = data["schema"]
    if type(schema) is int and 1 <= schema < model.SCHEMA:  # `type`: JSON's true is no schema 1
        raise UsageError(f"{url}: schema {schema}, expected {model.SCHEMA}, from an older version; {rerun} again")
    if type(schema) is not int or schema != model.SCHEMA:
        raise UsageError(f"{url}: schema: {schema!r}, expected {model.SCHEMA}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"{url}: {problem(e.errors()[0])}") from None


def write(path, artifact: Artifact) -> None:
    write_json_atomic(path, artifact.model_dump(mode="json", by_alias=True))


def problem(error: ErrorDetails) -> str:
    """One pydantic error as `dotted.key: what is wrong (got value)`."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{key}: missing key"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    value = error["input"]
    if isinstance(value, (dict, list)):  # a whole section: its key says enough
        return f"{key}: {message}"
    shown = repr(value)
    return f"{key}: {message} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


class Scores(Record):
    """A model's errors on every image of a split, with one way of cropping them."""

    top1_error: float
    top5_error: float
    loss: float
    num_samples: int


class Evaluation(Artifact):
    """metrics/eval.json: the sweep's best trial on the test split (pipeline.evaluate), a DVC
    metric. The centre crop's figures at the top level (what `dvc metrics show` lists first);
    ImageNet-size nets have the paper's 10-crop's too."""

    SCHEMA: ClassVar[int] = 1
    STAGE: ClassVar[str] = "evaluate"
    FILE: ClassVar[str] = "eval.json"  # in paths.metrics
    # Which model, without this machine's paths: a DVC metric is compared across machines.
    mlflow_run_id: str
    checkpoint_name: str
    depth: int
    shortcut: str
    split: str
    crop: str
    top1_error: float
    top5_error: float
    loss: float
    num_samples: int
    ten_crop: Scores | None = None


class Registration(Artifact):
    """metrics/registry.json: the version the register stage made, and who holds the alias."""

    SCHEMA: ClassVar[int] = 1
    STAGE: ClassVar[str] = "register"
    FILE: ClassVar[str] = "registry.json"  # in paths.metrics
    registered_model: str
    version: int
    alias: str
    alias_moved: bool
    champion_version: int
    val_top1_error: float
    val_loss: float
    test_top1_error: float
    test_top5_error: float
    model_uri: str
    message: str
