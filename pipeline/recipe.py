"""The paper's training recipes as pure functions of params: batch split, learning rate and
its schedule. Used by every worker of a training run, so each must give the same answer on
every rank.

- CIFAR-size (Sec. 4.2): global batch 128, lr 0.1, divided by 10 at 32k and 48k of 64k
  iterations, i.e. at 50% and 75% of training (`train.milestones`); CIFAR nets of depth >= 110
  (`train.warmup_depth`) start at lr/10 until the training error falls below 80% (the paper's
  ResNet-110 warm-up, which it describes for CIFAR only).
- ImageNet-size (Sec. 3.4): global batch 256, lr 0.1, divided by 10 when the val error
  plateaus (`train.plateau_patience`) or at the milestones.
- Either way the lr scales linearly with the global batch (Goyal et al. 2017) relative to the
  paper's, and the global batch is the same whatever the number of workers.
- What a tiny data set needs: the paper trains for 64k iterations; 45 epochs of the 1,077 train
  digits at batch 32 are about 1,500, and deep nets started at the full lr then often never
  recover (a 56-layer net stuck at 60-70% training error). `train.warmup_epochs` raises the lr linearly, step by
  step, from near zero to its value over the first epochs (Goyal et al. 2017, Sec. 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UsageError
from pipeline.manifest import ImageSize
from pipeline.params import Params


@dataclass(frozen=True)
class Profile:
    """What the paper does differently for its two sizes of net (Sec. 3.4: ImageNet; Sec. 4.2:
    CIFAR). Horizontal flips are not here: whether a mirrored image is still its class depends
    on the data (a mirrored digit is another symbol), so `train.flip` says."""

    reference_batch: int  # the paper's global batch: train.lr is the lr at this batch
    lighting: bool  # AlexNet's PCA colour noise in training
    test_crops: tuple[str, ...]  # what `evaluate` reports: the single (centre) crop, the 10-crop
    whole_images: bool  # the net takes each image whole (one size per batch), not 224x224 crops
    slow_start: bool  # the ResNet-110 rule: nets of train.warmup_depth and deeper start at lr/10


PROFILES = {
    "cifar": Profile(reference_batch=128, lighting=False, test_crops=("single",), whole_images=True, slow_start=True),
    "imagenet": Profile(
        reference_batch=256, lighting=True, test_crops=("single", "ten"), whole_images=False, slow_start=False
    ),
}
WARMUP_LR_FACTOR = 0.1  # the paper's 0.01 for a base lr of 0.1
WARMUP_UNTIL_TRAIN_ERROR = 0.8


def check_image_size(arch: str, split: str, size: ImageSize | None, batch: int, shards: str) -> None:
    """What the arch asks of a split's image sizes (manifest `image_size`; None: not recorded,
    or no images). ImageNet-size nets scale and crop every image to 224x224, from any size.
    CIFAR-size nets take each image whole (padded and cropped back to its own size), so a batch
    stacks images as they are and needs one size throughout; and the net halves the sides twice,
    so images of 4x4 or less reach its last stage as 1x1, where BatchNorm cannot train on a batch
    of one (one value per channel)."""
    if not PROFILES[arch].whole_images or size is None:
        return
    if size.uniform is None:
        raise UsageError(
            f"model.arch: cifar nets take images whole, so a batch needs one image size, but the {split} images in "
            f"{shards} have sides from {size.min_side} to {size.max_side} pixels; use model.arch=imagenet "
            "(224x224 crops of any size) or resize the images to one size"
        )
    width, height = size.uniform
    if split == "train" and batch == 1 and (width + 3) // 4 * ((height + 3) // 4) == 1:
        raise UsageError(
            f"train.batch_size: 1 image a rank of {width}x{height} pixels leaves the cifar net's BatchNorm one value "
            "per channel in its last stage; use at least 2 images a rank, or larger images"
        )


def micro_batches(share: int, max_worker_batch: int | None) -> list[int]:
    """A rank's share of a step's batch in the pieces it trains on, each at most
    `max_worker_batch`, their gradients summed before the step (gradient accumulation): a global
    batch larger than the ranks hold at once, such as the paper's 256 on fewer GPUs."""
    pieces = 1 if max_worker_batch is None else -(-share // max_worker_batch)
    return [share // pieces + (i < share % pieces) for i in range(pieces)]


def base_lr(params: Params) -> float:
    """train.lr is the paper's lr at its batch size; scaled linearly to train.batch_size."""
    return params.train.lr * params.train.batch_size / PROFILES[params.model.arch].reference_batch


def milestone_epochs(epochs: int, milestones: list[float]) -> list[int]:
    """Fractions of training -> the epochs at whose start the lr is divided by 10."""
    return sorted({max(1, round(epochs * m)) for m in milestones})


@dataclass
class Schedule:
    """The lr of each epoch: milestones or plateau, after an optional warm-up.

    State is small and plain (it goes into checkpoints): the number of divisions made on
    plateaus, the best val error, epochs since it improved, and whether warm-up is over.
    """

    base: float
    milestones: list[int]
    patience: int | None  # None: milestones; else divide when val error stalls this many epochs
    warmup: bool  # the paper's ResNet-110 warm-up: lr/10 until train error < 80%
    linear_warmup_epochs: float = 0.0  # Goyal et al.'s linear warm-up over this many epochs
    plateau_divisions: int = 0
    best_val_error: float = float("inf")
    stalled_epochs: int = 0

    def lr(self, epoch: int, progress: float = 1.0) -> float:
        """The lr of a step `progress` (0..1] of the way through `epoch`."""
        if self.warmup:
            return self.base * WARMUP_LR_FACTOR
        if self.patience is not None:
            lr = self.base * 0.1**self.plateau_divisions
        else:
            lr = self.base * 0.1 ** sum(epoch >= m for m in self.milestones)
        position = epoch + progress
        if position < self.linear_warmup_epochs:
            lr *= position / self.linear_warmup_epochs
        return lr

    def step(self, train_error: float, val_error: float) -> None:
        """Call at the end of each epoch."""
        if self.warmup and train_error < WARMUP_UNTIL_TRAIN_ERROR:
            self.warmup = False
        if val_error < self.best_val_error - 1e-4:
            self.best_val_error, self.stalled_epochs = val_error, 0
        else:
            self.stalled_epochs += 1
            if self.patience is not None and self.stalled_epochs >= self.patience:
                self.plateau_divisions += 1
                self.stalled_epochs = 0

    def state_dict(self) -> dict:
        return {
            "warmup": self.warmup,
            "plateau_divisions": self.plateau_divisions,
            "best_val_error": self.best_val_error,
            "stalled_epochs": self.stalled_epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def schedule(params: Params) -> Schedule:
    train = params.train
    return Schedule(
        base=base_lr(params),
        milestones=milestone_epochs(train.epochs, train.milestones),
        patience=train.plateau_patience,
        warmup=PROFILES[params.model.arch].slow_start and params.model.depth >= train.warmup_depth,
        linear_warmup_epochs=train.warmup_epochs,
    )
