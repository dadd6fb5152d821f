"""The training configuration: one validated pydantic object, read from and written to JSON."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from cifarcam.errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda"]


class _Settings(BaseModel):
    """Unknown fields are refused, and so is true/false for any field that is not a plain bool
    (pydantic would otherwise read `"width": true` as width 1)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation is not bool:
            raise ValueError("true/false is not a value this field takes")
        return value


class AugmentConfig(_Settings):
    """Batched on-device augmentation applied to every training batch."""

    flip: bool = True  # random horizontal flip, p=0.5
    translate: int = Field(4, ge=0, le=16)  # max shift in pixels (reflect padding)
    cutout: int = Field(0, ge=0, le=32)  # side of the zeroed square; 0 = off


TORCHVISION_SETS = ("cifar10", "cifar100")  # the `data` values that torchvision downloads


class TrainConfig(_Settings):
    """Everything that decides what `cifarcam train` does. Saved as the run's config.json."""

    data: str = Field(
        "cifar10",
        description="'cifar10' or 'cifar100' (torchvision download) or PATH of an image-folder "
        "tree (PATH/train/<class>/*, PATH/test/<class>/*).",
    )
    data_dir: str | None = Field(
        None, description="Where CIFAR-10/100 are downloaded and decoded images are cached."
    )
    model: Literal["resnet18", "resnet34"] = Field("resnet18", description="resnet18 or resnet34.")
    width: int = Field(
        64, ge=1, le=1024, description="Channels of layer1 (64 = standard ResNet; 16 trains ~10x faster)."
    )
    norm: Literal["batch", "group"] = Field(
        "batch",
        description="batch (BatchNorm) or group (GroupNorm: no statistics across images, so a batch "
        "split over processes trains exactly as the whole batch).",
    )
    epochs: int = Field(20, ge=1, le=10_000, description="Training epochs.")
    batch_size: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Images per training step (unset: 512, halved down to 64 while the run would "
        "take fewer than 1,000 steps).",
    )
    lr: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Peak learning rate of the one-cycle schedule (unset: 0.4 x batch size / 512).",
    )
    warmup: float = Field(0.2, ge=0, le=1, description="Fraction of all steps spent rising to the peak lr.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum.")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay.")
    decay_norm_and_bias: bool = Field(
        True, description="Apply weight decay to BatchNorm weights and biases too."
    )
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="Label smoothing of the training loss (0 = off)."
    )
    subset: int | None = Field(
        None, ge=10, description="Train on a class-balanced, seeded subset of N training images."
    )
    epoch_images: int | None = Field(
        None,
        ge=1,
        description="At most N images per epoch, taken in turn from a fresh shuffle of the training "
        "images, so shorter epochs go through all of them in turn.",
    )
    val_split: int = Field(
        0,
        ge=0,
        description="Hold out N class-balanced training images for validation; keeps best.safetensors.",
    )
    device: DeviceName = Field("auto", description="auto, cpu or cuda.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto (fp16 autocast on CUDA, bf16 on CPUs with native bf16, else fp32), bf16, "
        "fp16 (CUDA only, static loss scale) or fp32.",
    )
    channels_last: bool = Field(True, description="Train in channels_last memory order.")
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Random seed (init, data order, augmentation, subsets)."
    )
    cuda_graphs: bool = Field(
        True,
        description="CUDA only: replay the training forward and backward of full batches from CUDA "
        "graphs (not under torchrun).",
    )
    cudnn_benchmark: bool = Field(
        True,
        description="CUDA only: let cuDNN time its kernels for the full-batch shape and keep the fastest.",
    )
    sync_bn: bool = Field(
        False, description="Under torchrun on CUDA: BatchNorm statistics over the global batch."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # An albumentations pipeline (A.to_dict form) run per sample in DataLoader workers;
    # when set it replaces `augment`. The "seed-albumentations" preset ships one.
    albumentations: dict[str, Any] | None = None
    workers: int = Field(2, ge=0, le=64, description="DataLoader workers for an albumentations pipeline.")

    @field_validator("data", "data_dir")
    @classmethod
    def _absolute_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Paths are kept absolute (~ expanded), so later commands find them from any folder."""
        if value is None or (info.field_name == "data" and value in TORCHVISION_SETS):
            return value
        if not value.strip():
            raise ValueError("an empty path; give a folder (or, for data, 'cifar10' or 'cifar100')")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of the file system, kept as surrogates
            raise ValueError(
                "a path that is not valid UTF-8 (config.json keeps paths as UTF-8 text)"
            ) from None
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("albumentations")
    @classmethod
    def _loads_in_albumentations(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from cifarcam.data.albumentations import check_pipeline  # imports torch: only when needed

            check_pipeline(value)
        return value


# CPU-sized: the whole chain (20 epochs, evaluate, misclassified, gradcam, plot) in about
# 10 minutes on 2 cores; docs/performance.md has its measured times and accuracy.
QUICK_PRESET: dict[str, Any] = {
    "width": 16,
    # Epochs of 25,000 images that go through all the training images in turn: the cost of a
    # fixed 25,000-image subset, 85.1-85.4% against its 83.9-84.6% (3 seeds; docs/performance.md)
    "epoch_images": 25_000,
    "batch_size": 256,
    "lr": 0.4,
    "decay_norm_and_bias": False,
    "augment": {"flip": True, "translate": 2, "cutout": 0},  # this small net underfits: shift less
}
PRESET_NAMES = ("quick", "seed-albumentations")


def preset_values(name: str) -> dict[str, Any]:
    """The settings a named preset contributes (config files and options override them)."""
    if name == "quick":
        return copy.deepcopy(QUICK_PRESET)
    if name == "seed-albumentations":
        from cifarcam.data.albumentations import seed_project_pipeline

        return {"albumentations": seed_project_pipeline()}
    raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESET_NAMES)}")


def build_config(values: Any) -> TrainConfig:
    """Validate a dict of settings into a TrainConfig; the error names the first field refused."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        raise ConfigError(f"unknown config field '{field}'")
    message = f"invalid value for '{field}': {first['msg'].removeprefix('Value error, ')}"
    given = first.get("input")
    if isinstance(given, dict | list):  # a whole pipeline: the message says what is wrong with it
        raise ConfigError(message)
    raise ConfigError(f"{message} (got {given!r})")


YAML_SUFFIXES = (".yaml", ".yml")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or, by its suffix, YAML config file into a dict (validated later, after the
    command-line options are merged in)."""
    kind = "YAML" if path.suffix.lower() in YAML_SUFFIXES else "JSON"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file '{path}': {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({kind} is expected)") from None
    if kind == "YAML":
        values = _parse_yaml(path, text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"config file '{path}' is not valid JSON: {error.msg} at line {error.lineno}"
            ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a {kind} mapping of settings")
    return values


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "unreadable"
        raise ConfigError(f"config file '{path}' is not valid YAML: {problem}{where}") from None


def config_to_yaml(config: TrainConfig) -> str:
    """The configuration as a YAML config file: every field, in TrainConfig's order."""
    import yaml

    header = (
        "# cifarcam train configuration: pass it back with --config FILE.yaml\n"
        "# batch_size and lr null: sized to the run (docs/cli.md)\n"
    )
    return header + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def merge_overrides(
    base: dict[str, Any], overrides: dict[str, Any], given_none: bool = False
) -> dict[str, Any]:
    """Return base updated with the overrides that were actually given: options left out are
    None, while a config file's null is given (`given_none`) and unsets a preset's value, as in
    {"epoch_images": null}. `augment` is merged field by field: {"augment": {"cutout": 8}}
    keeps the base's flip and translate."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None and not given_none:
            continue
        if key == "augment" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merged[key] | value
        merged[key] = value
    return merged


SIZED_TO_RUN = ("batch_size", "lr")  # left unset (None), they are sized to the run
FULL_BATCH, FULL_LR = 512, 0.4  # the default recipe's batch size and peak learning rate
MIN_STEPS, MIN_BATCH = 1000, 64


def batch_and_lr(config: TrainConfig, train_images: int) -> tuple[int, float]:
    """The batch size and peak lr of a run: as configured or, where unset, sized to it. A few steps
    of a large batch at a large lr diverge and leave BatchNorm's statistics stale, so the batch is
    halved from 512 (down to 64) while the run takes fewer than MIN_STEPS steps; lr = 0.4 x batch / 512."""
    per_epoch = min(config.epoch_images or train_images, train_images)
    batch = config.batch_size
    if batch is None:
        batch = FULL_BATCH
        while batch > MIN_BATCH and -(-per_epoch // batch) * config.epochs < MIN_STEPS:
            batch //= 2
    return batch, config.lr if config.lr is not None else FULL_LR * batch / FULL_BATCH


def data_dir_path(config: TrainConfig) -> Path | None:
    """Where downloads and decode caches go; None = the user cache."""
    return Path(config.data_dir).expanduser() if config.data_dir else None


def config_to_json(config: TrainConfig) -> str:
    return config.model_dump_json(indent=2) + "\n"
