"""The formats of cifarcam's safetensors files: what a checkpoint's and a training state's
header metadata hold, written and read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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
    norm: str


def checkpoint_metadata(info: dict[str, Any], checkpoint_id: str) -> dict[str, str]:
    """A checkpoint's header metadata: each of `info`'s values as JSON, its format and id."""
    metadata = {key: json.dumps(value) for key, value in info.items()}
    metadata["format"] = CHECKPOINT_FORMAT
    metadata["checkpoint_id"] = json.dumps(checkpoint_id)
    return metadata


def checkpoint_info(kind: str, metadata: dict[str, str]) -> CheckpointInfo:
    """What a checkpoint's header says; ValueError, KeyError or TypeError if not `checkpoint_metadata`'s."""
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a cifarcam checkpoint")
    meta = {key: json.loads(value) for key, value in metadata.items() if key != "format"}
    return CheckpointInfo(
        kind=kind,
        model=str(meta["model"]),
        width=int(meta["width"]),
        num_classes=int(meta["num_classes"]),
        epoch=int(meta["epoch"]),
        classes=list(meta["classes"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        checkpoint_id=str(meta["checkpoint_id"]),
        norm=str(meta["norm"]),
    )


def state_metadata(record: dict[str, Any]) -> dict[str, str]:
    """A training state's header metadata: its format and `record` as JSON."""
    return {"format": STATE_FORMAT, "state": json.dumps(record)}


def state_record(metadata: dict[str, str]) -> dict[str, Any]:
    """The record in a training state's metadata (ValueError if it is not a training state)."""
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError("not a cifarcam training state")
    return json.loads(metadata["state"])
