"""One training pass over a run directory: the model built on its device, the epochs trained, the
state and the files derived from it saved after each, and meta.json told how training ended."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
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
from cifarcam.runs import tensorboard
from cifarcam.runs.rundir import RunDir, now_iso
from cifarcam.training.distributed import SINGLE, Group
from cifarcam.training.steps import StepCallback
from cifarcam.training.trainer import StopRequested, Trainer

State = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a Trainer's saved tensors and metadata


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
    """What `run` settles before a run is touched; `amp_dtype` None is fp32."""

    device: torch.device
    amp_dtype: torch.dtype | None
    dataset: Dataset
    train: Split
    validation: Split | None

    @cached_property
    def data_facts(self) -> dict[str, Any]:
        """What a saved state depends on in the data: its weights are sized to the classes, its epoch
        order indexes the training images (cached: the digest takes ~0.4 s)."""
        return {
            "classes": self.dataset.classes,
            "train_images": len(self.train),
            "val_images": len(self.validation) if self.validation is not None else 0,
            "train_fingerprint": self.train.fingerprint(),
        }

    @cached_property
    def test_fingerprint(self) -> str:
        """The test set's digest, for meta.json and the test logits cache."""
        return self.dataset.test.fingerprint()


def interrupted(number: int, what: str, hint: str | None = None) -> TrainingInterrupted:
    """'interrupted by SIGNAME <what>', exit 128 + `number`."""
    return TrainingInterrupted(
        f"interrupted by {signal.Signals(number).name} {what}", hint, 128 + int(number)
    )


def train_loop(
    config: TrainConfig,
    run: RunDir,
    prepared: Prepared,
    state: State | None,
    callbacks: TrainCallbacks,
    stop: StopSignal | None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Train from `state` (None: from the start) to config.epochs, saving after every epoch;
    returns the per-epoch records. The caller holds the run's lock (rank 0 under torchrun) and
    has marked the run running in meta.json, which says at the end how training ended."""
    if not group.is_main:
        callbacks = TrainCallbacks()  # rank 0 reports for all
    log = None
    try:
        trainer = build_trainer(config, prepared, group)
        writer = EpochWriter(run, trainer, prepared, group)
        if state is not None:
            writer.restore(state)
        if group.is_main:
            log = tensorboard.writer(run, first_epoch=trainer.epoch + 1)
            if log is not None and trainer.epoch == 0:
                tensorboard.log_config(log, config.model_dump(mode="json"))
        if callbacks.on_start:
            start = {
                "start_epoch": trainer.epoch + 1,
                "epochs": config.epochs,
                "epoch_images": trainer.epoch_images,
                "batch_size": trainer.batch_size,
                "lr": trainer.lr,
                "steps": trainer.steps_per_epoch * config.epochs,
                "tensorboard": log is not None,
            }
            callbacks.on_start(run.read_meta() | start)
        stopping = (lambda: group.any(stop.requested())) if stop else None  # all ranks stop at one step
        try:
            for record in trainer.epochs(callbacks.on_step, stopping):
                writer.write_epoch()
                if log is not None:
                    tensorboard.log_epoch(log, record, trainer.epoch_images)
                if callbacks.on_epoch:
                    callbacks.on_epoch(record)
        except StopRequested:
            raise group.raise_together(writer.write_stop(stop)) from None
        except TrainingDiverged as error:  # found by all ranks at the same step
            raise group.raise_together(error) from None
        if log is not None:
            tensorboard.log_hparams(log, config.model_dump(mode="json"), trainer.records[-1])
    except BaseException as error:
        if group.is_main:
            _record_failure(run, error)
        raise
    finally:
        if log is not None:
            log.close()
    if group.is_main:
        run.update_meta(status="finished", ended_at=now_iso(), completed_epochs=len(trainer.records))
    return trainer.records


def _record_failure(run: RunDir, error: BaseException) -> None:
    """meta.json says how an unfinished training ended (unless a stop's handler did): interrupted or
    failed, with the saved state's epochs (a failed save leaves the loop an epoch ahead)."""
    with contextlib.suppress(OSError, CifarcamError):  # the error being raised is the one to report
        if run.read_meta().get("status") != "running":
            return
        saved = run.read_state_meta()
        completed = {"ended_at": now_iso(), "completed_epochs": saved["epoch"] if saved else 0}
        if isinstance(error, KeyboardInterrupt):
            run.update_meta(status="interrupted", **completed)
        else:
            reason = error.message if isinstance(error, CifarcamError) else f"{type(error).__name__}: {error}"
            run.update_meta(status="failed", error=reason, **completed)


def build_trainer(config: TrainConfig, prepared: Prepared, group: Group = SINGLE) -> Trainer:
    """The model, seeded and on its device, and the Trainer over the data moved there."""
    device = prepared.device
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    model: nn.Module = build_model(config.model, config.width, len(prepared.dataset.classes), config.norm)
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
    """What a training writes into its run: after each epoch the training state (the commit point),
    then the checkpoints, test logits and metrics.json/.csv derived from it; at a stop, the partial
    epoch's state. Under torchrun rank 0 writes, and every rank learns whether the write failed."""

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

    def restore(self, state: State) -> None:
        """Continue from a saved state; the files derived from its last whole epoch are written
        again, since a kill between the state and them leaves them one epoch behind."""
        trainer = self.trainer
        trainer.load_state(*state)  # resume checked that the state's config is the run's
        rewrite = trainer.partial is None and len(trainer.records) > 0
        val_accs = [record.get("val_acc", -1.0) for record in trainer.records]
        self.best_val = max(val_accs[:-1] if rewrite else val_accs, default=-1.0)
        if rewrite:
            self.write_epoch()

    def _save_state(self) -> None:
        tensors, meta = self.trainer.state()
        self.run.save_state(tensors, meta | self.resume_facts)

    def write_epoch(self) -> None:
        self.group.from_main(self._write_epoch)

    def _write_epoch(self) -> None:
        trainer, run = self.trainer, self.run
        self._save_state()
        header = self.header | {"epoch": trainer.epoch}
        checkpoint_id = run.save_checkpoint("last", trainer.model, header)
        if trainer.test_logits is not None:  # this epoch's scoring: the commands after reuse it
            with contextlib.suppress(OSError):  # a cache: without it they score the test set again
                run.save_test_logits(trainer.test_logits, checkpoint_id, self.test_fingerprint)
        val_acc = trainer.records[-1].get("val_acc", -1.0)
        if trainer.validation is not None and val_acc > self.best_val:
            run.save_checkpoint("best", trainer.model, header)
            self.best_val = val_acc
        run.write_metrics(trainer.records)

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

        self.group.from_main(save)
        return interrupted(
            number,
            f"{where}; the training state is saved",
            hint=f"resume with 'cifarcam train --run {run.name} --resume'",
        )
