"""params.yaml: its schema, loading, and `--set key.path=value` overrides.

params.yaml is the one place every knob lives, so the schema below has no defaults: a key
missing from the file is an error, not a silent fallback. Every section rejects unknown keys,
so a typo (`train.epoch`) is caught instead of ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

from pipeline.errors import UsageError

# The depths `resnet.build` takes, written here so that params does not import the model (an edit
# of resnet/model.py would rerun every stage that reads params); tests/pipeline/test_params.py
# holds the two together. ImageNet: resnet.SPECS. CIFAR (Sec. 4.2): 6n+2 for any n >= 1.
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
CIFAR_DEPTH_RULE = "CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...)"


def is_cifar_depth(depth: int) -> bool:
    return depth >= 8 and (depth - 2) % 6 == 0


# data.seed goes to scikit-learn's train_test_split, whose random_state (numpy's) takes 0 to
# 2**32 - 1; train.seed goes to torch, which takes more, but one range for both is one rule.
MAX_SEED = 2**32 - 1

# Params that say how and where a run executes, not which experiment it is: how many processes
# and which device (these change the arithmetic, e.g. BatchNorm's per-rank batches, bf16, the
# order samples meet in, but not the recipe), retries, checkpoints kept, names. Changing them
# neither renames a run or a sweep, so a rerun resumes, nor makes DVC rerun `tune`: dvc.yaml
# lists every other key of these sections (tests/test_layout.py holds the two together).
EXECUTION_KEYS = {
    "train": (
        "num_workers",
        "max_worker_batch",
        "resize_check_seconds",
        "use_gpu",
        "cpus_per_worker",
        "loader_workers",
        "compile",
        "max_failures",
        "checkpoints_to_keep",
        "checkpoint_every_steps",
        "preemption_check_steps",
        "max_preemption_failures",
        "async_upload",
        "run_name",
    ),
    "tune": ("max_concurrent_trials", "name", "max_failures"),
    "shard": ("workers",),  # the shards are the same bytes whatever the number of processes
}


class ParamsError(UsageError):
    """A params file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    shards: str
    ray_storage: str
    reports: str
    metrics: str


class Data(Section):
    source: Literal["digits", "imagenet", "imagefolder", "cifar10"]
    root: str | None
    seed: int = Field(ge=0, le=MAX_SEED)
    val_fraction: float = Field(gt=0, lt=1)  # digits: the stratified val split, of all images
    test_fraction: float = Field(gt=0, lt=1)  # digits: the stratified test split, of all images
    # cifar10, imagenet, and imagefolder without test/: images a class held out of train as val
    val_per_class: int = Field(ge=1)
    image_size: int = Field(ge=8)  # digits: the side the 8x8 digits are rendered at

    @field_validator("test_fraction")
    @classmethod
    def _leaves_a_train_split(cls, test_fraction: float, info: ValidationInfo) -> float:
        val_fraction = info.data.get("val_fraction")
        if val_fraction is not None and val_fraction + test_fraction >= 1:
            raise ValueError(
                f"with data.val_fraction {val_fraction}, leaves no train images (the two must sum under 1)"
            )
        return test_fraction


class Shard(Section):
    maxcount: int = Field(gt=0)
    maxsize: float = Field(gt=0)
    workers: int = Field(ge=1)
    max_reject_fraction: float = Field(ge=0, le=1)
    jpeg_quality: int = Field(ge=1, le=100)  # for images that must be re-encoded
    max_side: int | None = Field(ge=8)  # shrink images whose longer side exceeds this; null: never
    min_side: int = Field(ge=1)  # reject images with a shorter side (1x1 tracking pixels)
    max_pixels: int = Field(ge=1)  # reject images with more pixels, before decoding them
    max_bytes: int = Field(ge=1)  # reject files larger than this, before reading them


class Model(Section):
    arch: Literal["cifar", "imagenet"]
    depth: int
    shortcut: Literal["none", "A", "B", "C"]
    bottleneck: Literal["v1", "v1.5"]
    zero_init_residual: bool

    @field_validator("depth")
    @classmethod
    def _depth_fits_arch(cls, depth: int, info: ValidationInfo) -> int:
        arch = info.data.get("arch")
        if arch == "imagenet" and depth not in IMAGENET_DEPTHS:
            raise ValueError(f"not a depth of the ImageNet nets; valid: {', '.join(map(str, IMAGENET_DEPTHS))}")
        if arch == "cifar" and not is_cifar_depth(depth):
            raise ValueError(CIFAR_DEPTH_RULE)
        return depth


class Train(Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    # N, or [min, max]: an elastic group, which Ray restarts smaller when nodes are lost and
    # larger when they come back (the global batch and the lr stay as params say)
    num_workers: int | tuple[int, int]
    max_worker_batch: int | None = Field(ge=1)  # a rank's larger share is split in steps of this (null: none)
    resize_check_seconds: float = Field(gt=0)  # an elastic group looks for more nodes this often
    use_gpu: bool
    max_failures: int = Field(ge=-1)
    seed: int = Field(ge=0, le=MAX_SEED)
    milestones: list[float]  # fractions of training at which the lr is divided by 10
    plateau_patience: int | None = Field(ge=1)  # set: divide on a val-error plateau instead
    warmup_depth: int = Field(ge=1)  # CIFAR nets this deep start at lr/10 until train error < 80%
    warmup_epochs: float = Field(ge=0)  # linear lr warm-up over this many epochs (0: none)
    flip: bool  # random horizontal flips in training (the paper's; not for digits)
    cpus_per_worker: int = Field(ge=1)
    loader_workers: int = Field(ge=0)  # DataLoader processes per training worker
    checkpoints_to_keep: int = Field(ge=1)
    checkpoint_every_steps: int | None = Field(ge=1)  # null: at each epoch's end only
    preemption_check_steps: int | None = Field(ge=1)  # null: no step checkpoint on a preemption notice
    max_preemption_failures: int = Field(ge=-1)  # restarts after preemptions (-1: any number)
    async_upload: bool  # to remote storage, checkpoints upload while training goes on
    run_name: str | None  # null: derived from the config, so the same command resumes
    compile: bool  # torch.compile the model (GPU runs)

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (workers, workers) if isinstance(workers, int) else workers
        if low < 1 or high < low:
            raise ValueError("a worker count >= 1, or [min, max] with 1 <= min <= max")
        return workers

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may train with."""
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        return range(low, high + 1)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, milestones: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in milestones):
            raise ValueError("milestones are fractions of training, each in (0, 1)")
        return milestones


class Tune(Section):
    depths: list[int] = Field(min_length=1)
    shortcuts: list[Literal["none", "A", "B", "C"]] = Field(min_length=1)
    max_concurrent_trials: int | None = Field(ge=1)  # null: as many as the cluster's CPUs/GPUs fit
    scheduler: Literal["none", "asha"]
    grace_period: int = Field(ge=1)  # ASHA: epochs every trial gets before it may be stopped
    max_failures: int = Field(ge=0)  # retries of a failed trial, from its checkpoint, before the sweep gives up on it
    name: str | None  # null: derived from the config, so rerunning a sweep resumes it


class MLflow(Section):
    tracking_uri: str
    experiment: str
    registered_model: str
    alias: str
    retry_seconds: float = Field(gt=0)  # how long a call waits out an unanswering store before it fails


class Params(Section):
    paths: Paths
    data: Data
    shard: Shard
    model: Model
    train: Train
    tune: Tune
    mlflow: MLflow


def check_sweep(params: Params) -> None:
    """tune.depths must suit model.arch (checked where the sweep runs: other stages ignore it)."""
    for depth in params.tune.depths:
        try:
            Model.model_validate({**params.model.model_dump(), "depth": depth})
        except ValidationError as e:
            raise ParamsError(f"tune.depths: {depth}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def load(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read a params file, apply `key.path=value` overrides (values parsed as YAML), validate.
    A file that cannot be read as a mapping of sections is one ParamsError line naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: a folder, not a params file") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected YAML") from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}:{yaml_problem(e)}") from None
    if raw is None:
        raise ParamsError(f"{path}: empty; expected a mapping of sections ({', '.join(Params.model_fields)})")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got a {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source=str(path))


def yaml_problem(error: yaml.YAMLError) -> str:
    """` line N not valid YAML (why)`, on one line. A parser error has a problem and a mark; a
    reader error (a control character such as NUL, as in a binary file) has a reason and a
    position, and its str() runs over two lines."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f" line {mark.line + 1} not valid YAML ({' '.join(str(error.problem).split())})"
    if isinstance(error, yaml.reader.ReaderError):
        code = error.character if isinstance(error.character, int) else ord(error.character)
        return f" not valid YAML (character #x{code:04x} at position {error.position}: {error.reason})"
    return f" not valid YAML ({' '.join(str(error).split())})"


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ParamsError(f"--set {key}: value {text!r} is not valid YAML") from None
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})  # unknown sections are reported by validate()
        if not isinstance(node, dict):
            raise ParamsError(f"--set {key}: {'.'.join(parents[: depth + 1])} is a value, not a section")
    node[leaf] = value


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"{source}: {describe(e.errors()[0])}") from None


def describe(error: ErrorDetails) -> str:
    """One line for a pydantic error: the dotted key, what is wrong, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        parent = _section_model(loc[:-1])
        return f"{key}: unknown key; valid keys{' under ' + '.'.join(loc[:-1]) if loc[:-1] else ''}: {', '.join(parent.model_fields)}"
    if error["type"] == "missing":
        return f"{key}: missing key"
    message = error["msg"].removeprefix("Value error, ")
    got = "" if isinstance(error["input"], dict) else f" (got {error['input']!r})"
    return f"{key}: {message}{got}" if key else f"{message}{got}"


def _section_model(loc: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model
