"""The run's TensorBoard log, runs/NAME/tensorboard/: per epoch the losses, accuracies, learning
rate, epoch time and images/s; the config as text and, at the end, as hparams with the final
metrics; the galleries of the commands after training. Written through torch.utils.tensorboard,
which needs the optional `tensorboard` package: without it nothing is logged.

Event files are append-only logs, the one kind of file in a run that is not replaced whole: a
resumed training opens a new one with `purge_step` at its first epoch, so TensorBoard hides the
events an interrupted training logged from that epoch on and every epoch appears once."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cifarcam.runs.rundir import RunDir

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# metrics.json's fields and their TensorBoard tags
SCALARS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "val_acc": "accuracy/val",
    "lr": "lr",
    "epoch_time_s": "time/epoch_s",
}


def writer(run: RunDir, first_epoch: int = 1) -> SummaryWriter | None:
    """A writer of the run's log, continuing it from `first_epoch`; None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    purge = first_epoch if first_epoch > 1 else None
    return SummaryWriter(log_dir=str(run.tensorboard_dir), purge_step=purge)


def log_config(log: SummaryWriter, config: dict[str, Any]) -> None:
    log.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=1)


def log_epoch(log: SummaryWriter, record: dict[str, float], epoch_images: int) -> None:
    step = int(record["epoch"])
    for field, tag in SCALARS.items():
        if field in record:
            log.add_scalar(tag, record[field], global_step=step)
    log.add_scalar("time/images_per_s", epoch_images / record["epoch_time_s"], global_step=step)
    log.flush()


def log_hparams(log: SummaryWriter, config: dict[str, Any], final: dict[str, float]) -> None:
    """The config's fields as hparams, with the final epoch's test loss and accuracy."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key == "augment":
            flat |= {f"augment.{k}": v for k, v in value.items()}
        elif isinstance(value, dict):  # an albumentations pipeline
            flat[key] = json.dumps(value)
        else:
            flat[key] = "none" if value is None else value
    metrics = {f"hparam/{field}": final[field] for field in ("test_acc", "test_loss") if field in final}
    log.add_hparams(flat, metrics, run_name=".")  # "." keeps them beside the scalars, in one run


def log_gallery(run: RunDir, tag: str, png: bytes, epoch: int) -> None:
    """Add a gallery PNG to the run's log as an image at the checkpoint's epoch (if tensorboard is
    installed)."""
    log = writer(run)
    if log is None:
        return
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    with log:
        log.add_image(tag, image, global_step=epoch, dataformats="HWC")
