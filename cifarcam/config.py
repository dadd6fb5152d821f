"""The training configuration: one validated pydantic object, read from and written to JSON."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from cifarcam.errors import ConfigError
from cifarcam.fileio import parse_json, read_text

ModelName = Literal["resnet18", "resnet34"]
DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
NormName = Literal["batch", "group"]


MAX_WIDTH = 1024  # channels of layer1 (layer4 has 8x as many)
NEW_SETTINGS = "new settings"  # validation context of `build_config`


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


class TrainConfig(_Settings):
    """Everything that decides what `cifarcam train` does. Saved as the run's config.json."""

    data: str = "cifar10"  # "cifar10" (torchvision) or a path to an image-folder tree
    data_dir: str | None = None  # where downloads and decode caches go; None = user cache
    model: ModelName = "resnet18"
    width: int = Field(64, ge=1, le=MAX_WIDTH)  # channels of layer1; 64 = the standard ResNet
    # "group": GroupNorm, no statistics across images, so a batch split over processes
    # trains exactly as the whole batch does (BatchNorm normalises each process's share)
    norm: NormName = "batch"
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(512, ge=1, le=65_536)
    lr: float = Field(0.4, gt=0, le=100)  # peak learning rate of the one-cycle schedule
    warmup: float = Field(0.2, ge=0, le=1)  # fraction of all steps spent rising to the peak
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    decay_norm_and_bias: bool = True  # False: BatchNorm weights and biases skip weight decay
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # Weight EMA: per-step decay of an average of the weights (0 = off), which evaluation and
    # the checkpoints use from the step a fraction `ema_start` of the way through training.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    ema_start: float = Field(0.5, ge=0, le=1)
    subset: int | None = Field(None, ge=10)  # class-balanced training subset size
    # At most this many images per epoch, taken in turn from a seeded shuffle of the training
    # images that is drawn afresh each time it runs out, so successive epochs see different
    # images and every image is seen about equally often; None = every training image, each epoch.
    epoch_images: int | None = Field(None, ge=1)
    val_split: int = Field(0, ge=0)  # class-balanced validation images held out of training
    device: DeviceName = "auto"
    # auto: fp16 autocast on CUDA, bf16 on CPUs that support it, else fp32; fp16 is CUDA only
    # and trains with a static loss scale (precision.FP16_LOSS_SCALE)
    precision: Precision = "auto"
    channels_last: bool = True
    seed: int = Field(0, ge=0, le=2**63 - 1)
    compile: bool = False  # torch.compile the training forward pass
    # CUDA only: replay the training forward and backward of full batches from CUDA graphs
    # (ignored on the CPU, with --compile and under torchrun)
    cuda_graphs: bool = True
    # CUDA only: cuDNN's benchmark mode, which times its kernels for the full-batch shape in the
    # first steps and keeps the fastest; off: its heuristics choose. Short batches never time.
    cudnn_benchmark: bool = True
    sync_bn: bool = False  # under torchrun on CUDA: BatchNorm statistics over the global batch
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # An albumentations pipeline (A.to_dict form) run per sample in DataLoader workers;
    # when set it replaces `augment`. The "seed-albumentations" preset ships one.
    albumentations: dict[str, Any] | None = None
    workers: int = Field(2, ge=0, le=64)  # DataLoader workers for the albumentations path

    @field_validator("data", "data_dir")
    @classmethod
    def _absolute_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Paths are kept absolute (~ expanded), so later commands find them from any folder."""
        if value is None or (info.field_name == "data" and value == "cifar10"):
            return value
        if not value.strip():
            raise ValueError("an empty path; give a folder (or, for data, 'cifar10')")
        if "\x00" in value:
            raise ValueError("a path with a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of the file system, kept as surrogates
            raise ValueError(
                "a path that is not valid UTF-8 (config.json keeps paths as UTF-8 text)"
            ) from None
        return os.path.abspath(os.path.expanduser(value))

    @field_validator("albumentations")
    @classmethod
    def _loads_in_albumentations(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        if value is not None:
            # Parameters albumentations would drop are refused in new settings (`build_config`),
            # not in the config.json of a run already trained with them.
            from cifarcam.augment import check_pipeline  # augment imports this module

            check_pipeline(value, refuse_dropped=bool(info.context and info.context.get(NEW_SETTINGS)))
        return value


# CPU-sized: the whole chain (20 epochs, evaluate, misclassified, gradcam, plot) in about
# 10 minutes on 2 cores; see benchmarks/RESULTS.md for its measured times and accuracy.
QUICK_PRESET: dict[str, Any] = {
    "width": 16,
    # Epochs of 25,000 images that go through all the training images in turn: the cost of a
    # fixed 25,000-image subset, 85.1-85.4% against its 83.9-84.6% (3 seeds; benchmarks/RESULTS.md)
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
        from cifarcam.augment import seed_project_pipeline

        return {"albumentations": seed_project_pipeline()}
    raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESET_NAMES)}")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config field '{field}'"
    given = first.get("input")
    if isinstance(given, dict | list):  # a whole pipeline: the message says what is wrong with it
        return f"invalid value for '{field}': {message}"
    return f"invalid value for '{field}': {message} (got {given!r})"


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validate a dict of settings into a TrainConfig; errors name the field."""
    try:
        return TrainConfig.model_validate(values, context={NEW_SETTINGS: True})
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def validate_saved(values: Any) -> TrainConfig:
    """A run's config.json as a TrainConfig, checked as new settings are but for parameters an
    albumentations pipeline loses (the run trained with them); a ConfigError names the field."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON config file into a dict (validated later, after CLI overrides)."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file '{path}': {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (a JSON object is expected)") from None
    try:
        values = parse_json(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"config file '{path}' is not valid JSON: {error.msg} at line {error.lineno}"
        ) from None
    except ValueError as error:
        raise ConfigError(f"config file '{path}' is not a cifarcam config: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a JSON object")
    return values


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


def data_dir_path(config: TrainConfig) -> Path | None:
    """Where downloads and decode caches go (`data_dir`, ~ expanded); None = the user cache."""
    return Path(config.data_dir).expanduser() if config.data_dir else None


def config_to_json(config: TrainConfig) -> str:
    return config.model_dump_json(indent=2) + "\n"
