"""What a saved training state may continue under: `train --resume` checks config.json and the data
against the state's records, and tells a finished run, or one whose last epoch's files were not all
written, from one to continue."""

from __future__ import annotations

import json
from typing import Any

import torch

from cifarcam.config import TrainConfig
from cifarcam.errors import RunError
from cifarcam.runs.rundir import RunDir

# Settings a resumed run may take from an edited config.json: where the data and caches are,
# and how fast it runs; everything else decides what the saved state means.
RESUME_MAY_CHANGE = frozenset(
    {"data", "data_dir", "device", "precision", "channels_last", "cuda_graphs", "cudnn_benchmark", "workers"}
)


def check_same_config(run: RunDir, config: TrainConfig, state_meta: dict[str, Any] | None) -> None:
    """The saved state continues only under the settings it records (`state_meta` None: none saved)."""
    if state_meta is None:
        return
    saved = state_meta["config"]
    now = config.model_dump(mode="json")
    changed = [key for key in now if key not in RESUME_MAY_CHANGE and saved.get(key) != now[key]]
    if changed:
        key = changed[0]
        raise RunError(
            f"run '{run.name}' config.json has changed since its training state was saved: "
            f"{key} {json.dumps(saved.get(key))} then, {json.dumps(now[key])} now"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""),
            hint="put config.json back as it was, or train a new run with the new settings",
        )


def check_same_data(run: RunDir, then: dict[str, Any], now: dict[str, Any]) -> None:
    """A saved state continues only on the data it records: class names, image counts, training digest."""
    for field, what in (
        ("classes", "classes"),
        ("train_images", "training images"),
        ("val_images", "validation images"),
        ("train_fingerprint", "training images' digest"),
    ):
        if then[field] != now[field]:
            raise RunError(
                f"the data at '{now['data']}' has changed since run '{run.name}' started: "
                f"{what} {then[field]} then, {now[field]} now",
                hint="resume needs the same data; train a new run for the new data",
            )


def finished_without_state(run: RunDir, config: TrainConfig) -> list[dict[str, Any]] | None:
    """The records of a run whose training state was deleted after it finished: meta.json says
    so, and metrics.json and last.safetensors hold its final epoch."""
    try:
        records = run.read_epochs()
        finished = run.read_meta().get("status") == "finished"
    except RunError:
        return None
    last_epoch = records[-1]["epoch"] == config.epochs
    return records if finished and last_epoch and run.checkpoint_path("last").exists() else None


def derived_files_saved(run: RunDir, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> bool:
    """Whether the checkpoints and metrics.json are those of the saved state's epoch: metrics.json,
    the last file an epoch writes, tells, unless the last checkpoint was deleted since."""
    if not run.checkpoint_path("last").exists():
        return False
    try:
        return bool(run.read_epochs()[-1].get("epoch") == state[1]["epoch"])
    except RunError:  # no metrics.json, or no epoch in it
        return False
