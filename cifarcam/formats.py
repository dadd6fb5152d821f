"""The formats of cifarcam's safetensors files: what a checkpoint's and a training state's
header metadata hold, written and read back with every field a hand edit could break checked
(ValueError naming the first that is wrong)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cifarcam.config import MAX_WIDTH
from cifarcam.fileio import parse_json

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT = "cifarcam-checkpoint/1"
STATE_FORMAT = "cifarcam-training-state/1"


@dataclass
class CheckpointInfo:
    """What a checkpoint's header says about the model it holds."""

    kind: str
    model: str
    width: int
    num_classes: int
    epoch: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint_id: str
    norm: str = "batch"  # checkpoints written before the norm option hold BatchNorm


def checkpoint_metadata(info: dict[str, Any], checkpoint_id: str) -> dict[str, str]:
    """A checkpoint's header metadata: each of `info`'s values as JSON, its format and id."""
    metadata = {key: json.dumps(value) for key, value in info.items()}
    metadata["format"] = CHECKPOINT_FORMAT
    metadata["checkpoint_id"] = json.dumps(checkpoint_id)
    return metadata


def checkpoint_info(kind: str, metadata: dict[str, str]) -> CheckpointInfo:
    """What a checkpoint's header metadata says (ValueError, KeyError or TypeError if it is not
    one that `checkpoint_metadata` wrote)."""
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a cifarcam checkpoint")
    meta = {key: parse_json(value) for key, value in metadata.items() if key != "format"}
    return CheckpointInfo(
        kind=kind,
        model=str(meta["model"]),
        width=_count(meta["width"], "width", MAX_WIDTH),
        num_classes=_count(meta["num_classes"], "num_classes", len(meta["classes"])),
        epoch=int(meta["epoch"]),
        classes=list(meta["classes"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        checkpoint_id=str(meta["checkpoint_id"]),
        norm=str(meta.get("norm", "batch")),
    )


def _count(value: Any, name: str, most: int) -> int:
    """A checkpoint header's count (width, classes): an integer from 1 to `most`."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ValueError(f"its {name} is {json.dumps(value)}, not an integer from 1 to {most}")
    return value


def header_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ block of a safetensors file (the format: u64 header length, JSON header)."""
    if len(data) < 8:
        raise ValueError("file too short")
    length = int.from_bytes(data[:8], "little")
    header = parse_json(data[8 : 8 + length].decode("utf-8"))
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("bad metadata")
    return metadata


def state_metadata(record: dict[str, Any]) -> dict[str, str]:
    """A training state's header metadata: its format and `record` (epoch, records, optimizer and
    scheduler settings, the partial epoch, config and data facts) as JSON."""
    return {"format": STATE_FORMAT, "state": json.dumps(record)}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def state_record(metadata: dict[str, str]) -> dict[str, Any]:
    """The record `save_state` keeps in a training state's metadata, with the fields resuming
    relies on checked (ValueError naming the first that is wrong)."""
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError("not a cifarcam training state")
    record = parse_json(metadata["state"])
    if not isinstance(record, dict):
        raise ValueError("the state's record is not a JSON object")
    epoch, records = record.get("epoch"), record.get("records")
    if not _whole(epoch):
        raise ValueError(f"its epoch is {json.dumps(epoch)}, not a whole number")
    if not isinstance(records, list) or not all(isinstance(item, dict) for item in records):
        raise ValueError("its records are not a list of per-epoch records")
    if len(records) != epoch or any(item.get("epoch") != number for number, item in enumerate(records, 1)):
        raise ValueError(f"its records are not those of epochs 1 to {epoch}")
    config = record.get("config")
    if isinstance(config, dict) and _whole(config.get("epochs")) and epoch > config["epochs"]:
        raise ValueError(f"its epoch {epoch} is beyond the {config['epochs']} its config trains")
    groups = record.get("optimizer_param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(group, dict) for group in groups):
        raise ValueError("its optimizer_param_groups field is missing or malformed")
    if not isinstance(record.get("scheduler"), dict):
        raise ValueError("its scheduler field is missing or malformed")
    partial = record.get("partial")
    if partial is not None and not (
        isinstance(partial, dict)
        and all(_whole(partial.get(field)) for field in ("epoch", "seen", "steps"))
        and isinstance(partial.get("started_s"), int | float)
    ):
        raise ValueError("its partial epoch is malformed")
    return record


def check_state_tensors(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """The random-number states a resumed run restores are byte tensors, and a partial epoch's
    tensors are there (ValueError if not)."""
    import torch

    partial = record.get("partial") is not None
    for name in ["rng.torch"] + ["partial.augment_rng"] * partial:
        tensor = tensors.get(name)
        if tensor is None or tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ValueError(f"its tensor '{name}' is missing or not a random-number state")
    for name in ["partial.order", "partial.loss_sum", "partial.correct", "partial.first_bad_step"] * partial:
        if name not in tensors:
            raise ValueError(f"its partial epoch has no tensor '{name}'")
