"""One training pass over a run directory, started by `run.train` or `run.resume`:
the model built on its device, the epochs trained, the state and the files derived from it saved
after each one, and meta.json told how training ended (finished, interrupted or failed).

Nothing here prints: progress goes out through callbacks, results come back as values.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from cifarcam.config import TrainConfig
from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD, Dataset, Split
from cifarcam.devices import memory_format
from cifarcam.errors import CifarcamError, TrainingDiverged, TrainingInterrupted
from cifarcam.models.resnet import build_model
from cifarcam.runs.rundir import RunDir, now_iso
from cifarcam.training.distributed import SINGLE, Group
from cifarcam.training.steps import StepCallback
from cifarcam.training.trainer import StopRequested, Trainer


@dataclass
class TrainCallbacks:
    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: StepCallback | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None


@dataclass
class StopSignal:
    """Set `signal` (e.g. from a signal handler) to ask training to stop after the current step."""

    signal: int | None = None

    def requested(self) -> bool:
        return self.signal is not None


@dataclass
class Prepared:
    """What `run` settles before a run is touched: the device, the autocast dtype (None:
    fp32) and the data, the training images split from any validation share."""

    device: torch.device
    amp_dtype: torch.dtype | None
    dataset: Dataset
    train: Split
    validation: Split | None

    @cached_property
    def data_facts(self) -> dict[str, Any]:
        """What a saved state depends on in the data: its weights are sized to the classes, and
        its epoch order indexes the training images (computed once: the digest takes ~0.4 s)."""
        return {
            "classes": self.dataset.classes,
            "train_images": len(self.train),
            "val_images": len(self.validation) if self.validation is not None else 0,
            "train_fingerprint": self.train.fingerprint(),
        }

    @cached_property
    def test_fingerprint(self) -> str:
        """The test set's digest: meta.json keeps it for the commands after `train`, and the
        logits cache names the test set it scored."""
        return self.dataset.test.fingerprint()


def interrupted(number: int, what: str, hint: str | None = None) -> TrainingInterrupted:
    """The error of a stop asked by signal `number`: 'interrupted by SIGNAME <what>', exit 128 + it."""
    return TrainingInterrupted(
        f"interrupted by {signal.Signals(number).name} {what}", hint, 128 + int(number)
    )


@contextlib.contextmanager
def never_left_running(run: RunDir, group: Group) -> Iterator[None]:
    """meta.json never left saying "running" by an error the handlers around the epochs in
    `train_loop` do not see: before the first step (a model too large for the device, a disk
    error while repairing the last epoch's files), or while saving the state at a stop."""
    try:
        yield
    except BaseException as error:
        if group.is_main:
            _mark_if_running(run, saved_epochs(run), error)
        raise


def saved_epochs(run: RunDir) -> int:
    """The epochs the run's saved training state holds (0 without one): what meta.json reports
    when training ends early, since a failed save leaves the loop an epoch ahead of the files."""
    saved = run.read_state_meta()
    epoch = saved.get("epoch") if saved is not None else 0
    return epoch if isinstance(epoch, int) else 0


def _mark_if_running(run: RunDir, completed_epochs: int, error: BaseException) -> None:
    with contextlib.suppress(OSError, CifarcamError):  # the error being raised is the one to report
        if run.read_meta().get("status") != "running":
            return  # the handlers around the epochs recorded how it ended
        if isinstance(error, KeyboardInterrupt):
            run.update_meta(status="interrupted", ended_at=now_iso(), completed_epochs=completed_epochs)
        else:
            _mark_failed(run, completed_epochs, _reason(error))


def _reason(error: BaseException) -> str:
    return error.message if isinstance(error, CifarcamError) else f"{type(error).__name__}: {error}"


def build_trainer(config: TrainConfig, prepared: Prepared, group: Group = SINGLE) -> Trainer:
    """The model, seeded and on its device, and the Trainer over the data moved there."""
    device = prepared.device
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    num_classes = len(prepared.dataset.classes)
    model: nn.Module = build_model(config.model, config.width, num_classes, config.norm)
    model = model.to(device).to(memory_format=memory_format(config.channels_last))
    if config.sync_bn and group.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # CUDA only, checked before
    validation = prepared.validation.to(device) if prepared.validation is not None else None
    # CIFAR-10's official statistics for every source; each checkpoint keeps its own copy.
    return Trainer(
        model,
        prepared.train.to(device),
        prepared.dataset.test.to(device),
        config,
        CIFAR10_MEAN,
        CIFAR10_STD,
        validation,
        prepared.amp_dtype,
        group,
    )


class EpochWriter:
    """What a training writes into its run: after each epoch the training state first (the
    epoch's commit point), then the checkpoints, the cached test logits and metrics.json derived
    from it; at a stop, the state of the partial epoch. Under torchrun rank 0 writes, and every
    rank learns whether the write failed."""

    def __init__(self, run: RunDir, trainer: Trainer, prepared: Prepared, group: Group) -> None:
        self.run, self.trainer, self.group = run, trainer, group
        config = trainer.config
        # Saved with the state: what resume must continue under (`resume`)
        self.resume_facts = {"config": config.model_dump(mode="json"), "data": prepared.data_facts}
        self.test_fingerprint = prepared.test_fingerprint
        self.header = {
            "model": config.model,
            "width": config.width,
            "norm": config.norm,
            "num_classes": len(prepared.dataset.classes),
            "classes": prepared.dataset.classes,
            "mean": list(trainer.mean),
            "std": list(trainer.std),
        }
        self.best_val = -1.0  # the best validation accuracy a best checkpoint was saved for

    def on_main(self, action: Callable[[], None]) -> None:
        """Run a write on rank 0 while the other ranks wait to hear whether it failed."""
        self.group.agree(lambda: action() if self.group.is_main else None)

    def restore(self, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """Continue from a saved state; the files derived from its last whole epoch are written
        again, since a kill between the state and them leaves them one epoch behind."""
        trainer = self.trainer
        trainer.load_state(*state)  # resume checked that the state's config is the run's
        val_accs = [record.get("val_acc", -1.0) for record in trainer.records]
        if trainer.partial is None and trainer.records:
            self.best_val = max(val_accs[:-1], default=-1.0)
            self.write_epoch()
        else:
            self.best_val = max(val_accs, default=-1.0)

    def _save_state(self) -> None:
        tensors, meta = self.trainer.state()
        self.run.save_state(tensors, meta | self.resume_facts)

    def write_epoch(self) -> None:
        self.on_main(self._write_epoch)

    def _write_epoch(self) -> None:
        trainer, run = self.trainer, self.run
        self._save_state()
        header = self.header | {"epoch": trainer.epoch}
        checkpoint_id = run.save_checkpoint("last", trainer.final_model, header)
        if trainer.test_logits is not None:  # this epoch's scoring: the commands after reuse it
            with contextlib.suppress(OSError):  # a cache: without it they score the test set again
                run.save_test_logits(trainer.test_logits, checkpoint_id, self.test_fingerprint)
        val_acc = trainer.records[-1].get("val_acc", -1.0)
        if trainer.validation is not None and val_acc > self.best_val:
            run.save_checkpoint("best", trainer.final_model, header)
            self.best_val = val_acc
        run.write_json(run.metrics_path, {"epochs": trainer.records})

    def write_stop(self, stop: StopSignal | None) -> TrainingInterrupted:
        """Save a stopped training (mid-epoch: the state, so resume continues at the next step)
        and mark it interrupted; returns the error that reports it. The ranks stopped at the same
        step and agree on which signal to name."""
        trainer, run = self.trainer, self.run
        number = self.group.max_int(stop.signal if stop and stop.signal else 0) or signal.SIGINT
        where = f"after epoch {trainer.epoch}"
        if trainer.partial is not None:
            where = f"at epoch {trainer.partial.epoch}, step {trainer.partial.tally.steps}"

        def save() -> None:
            if trainer.partial is not None:
                self._save_state()
            run.update_meta(
                status="interrupted",
                ended_at=now_iso(),
                completed_epochs=trainer.epoch,
                interrupted_by=signal.Signals(number).name,
            )

        self.on_main(save)
        return interrupted(
            number,
            f"{where}; the training state is saved",
            hint=f"resume with 'cifarcam train --run {run.name} --resume'",
        )


def train_loop(
    config: TrainConfig,
    run: RunDir,
    prepared: Prepared,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    callbacks: TrainCallbacks,
    stop: StopSignal | None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Train from `state` (None: from the start) to config.epochs, saving after every epoch;
    returns the per-epoch records. The caller holds the run's lock (rank 0 under torchrun)."""
    if not group.is_main:
        callbacks = TrainCallbacks()  # rank 0 reports for all
    trainer = build_trainer(config, prepared, group)
    writer = EpochWriter(run, trainer, prepared, group)
    if state is not None:
        writer.restore(state)
    if callbacks.on_start:
        start = {
            "start_epoch": trainer.epoch + 1,
            "epochs": config.epochs,
            "epoch_images": trainer.epoch_images,
        }
        callbacks.on_start(run.read_meta() | start)
    try:
        for record in trainer.epochs(callbacks.on_step, stop.requested if stop else None):
            writer.write_epoch()
            if callbacks.on_epoch:
                callbacks.on_epoch(record)
    except StopRequested:
        raise group.raise_together(writer.write_stop(stop)) from None
    except TrainingDiverged as error:  # found by all ranks at the same step
        reason = error.message
        writer.on_main(lambda: _mark_failed(run, saved_epochs(run), reason))
        raise group.raise_together(error) from None
    except KeyboardInterrupt:
        if group.is_main:
            run.update_meta(status="interrupted", ended_at=now_iso(), completed_epochs=saved_epochs(run))
        raise
    except BaseException as error:
        if group.is_main:
            _mark_failed(run, saved_epochs(run), _reason(error))
        raise
    if group.is_main:
        run.update_meta(status="finished", ended_at=now_iso(), completed_epochs=trainer.epoch)
    return trainer.records


def _mark_failed(run: RunDir, completed_epochs: int, reason: str) -> None:
    run.update_meta(status="failed", ended_at=now_iso(), completed_epochs=completed_epochs, error=reason)
