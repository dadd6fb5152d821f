"""One training session over a run directory, started by `pipeline.train` or `pipeline.resume`:
the model built on its device, the epochs trained, the state and the files derived from it saved
after each one, and meta.json told how the session ended (finished, interrupted or failed).

Nothing here prints: progress goes out through callbacks, results come back as values.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, TypeVar

import torch
from torch import nn

from cifarcam.config import TrainConfig
from cifarcam.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, Split
from cifarcam.distributed import SINGLE, Group
from cifarcam.engine import StepCallback
from cifarcam.errors import CifarcamError, RunError, TrainingDiverged, TrainingInterrupted
from cifarcam.models import build_model
from cifarcam.precision import memory_format
from cifarcam.rundir import RunDir, now_iso
from cifarcam.trainer import StopRequested, Trainer

T = TypeVar("T")


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
    """What `pipeline` settles before a run is touched: the device, the autocast dtype (None:
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
    device, dataset = prepared.device, prepared.dataset
    main = group.is_main
    if not main:
        callbacks = TrainCallbacks()  # rank 0 reports for all
    # CIFAR-10's official statistics for every source; each checkpoint keeps its own copy.
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    layout = memory_format(config.channels_last)
    model: nn.Module = build_model(config.model, config.width, len(dataset.classes), config.norm)
    model = model.to(device).to(memory_format=layout)
    if config.sync_bn and group.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # CUDA only, checked in _prepare
    validation = prepared.validation.to(device) if prepared.validation is not None else None
    trainer = Trainer(
        model,
        prepared.train.to(device),
        dataset.test.to(device),
        config,
        mean,
        std,
        validation,
        prepared.amp_dtype,
        group,
    )
    # Saved with the state: what resume must continue under (`resumption`)
    resume_facts = {"config": config.model_dump(mode="json"), "data": prepared.data_facts}
    test_fingerprint = prepared.test_fingerprint
    header = {
        "model": config.model,
        "width": config.width,
        "norm": config.norm,
        "num_classes": len(dataset.classes),
        "classes": dataset.classes,
        "mean": list(mean),
        "std": list(std),
    }

    def on_main(action: Callable[[], T], default: T) -> T:
        """Run a write on rank 0 while the other ranks wait to hear whether it failed."""
        return group.agree(lambda: action() if main else default)

    def save_state() -> None:
        tensors, meta = trainer.state()
        run.save_state(tensors, meta | resume_facts)

    def save_epoch_end(best_val: float) -> float:
        """The state first (the commit point of an epoch), then what is derived from it."""
        save_state()
        epoch_header = header | {"epoch": trainer.epoch}
        checkpoint_id = run.save_checkpoint("last", trainer.final_model, epoch_header)
        if trainer.test_logits is not None:  # this epoch's scoring: the commands after reuse it
            with contextlib.suppress(OSError):  # a cache: without it they score the test set again
                run.save_test_logits(trainer.test_logits, checkpoint_id, test_fingerprint)
        val_acc = trainer.records[-1].get("val_acc", -1.0)
        if validation is not None and val_acc > best_val:
            run.save_checkpoint("best", trainer.final_model, epoch_header)
            best_val = val_acc
        run.write_json(run.metrics_path, {"epochs": trainer.records})
        return best_val

    best_val = -1.0
    if state is not None:
        try:
            trainer.load_state(*state)
        except (
            RuntimeError,
            KeyError,
            ValueError,
            TypeError,
        ):  # a state from before config was recorded in it
            raise RunError(
                f"training state '{run.state_path}' does not fit run '{run.name}' as its config.json "
                f"describes it ({config.model}, width {config.width}, norm {config.norm})",
                hint="put config.json back as it was, or train a new run with the new settings",
            ) from None
        val_accs = [record.get("val_acc", -1.0) for record in trainer.records]
        if trainer.partial is None and trainer.records:
            # A kill between the state and the files derived from it leaves them one epoch behind.
            best_val = on_main(lambda: save_epoch_end(max(val_accs[:-1], default=-1.0)), -1.0)
        else:
            best_val = max(val_accs, default=-1.0)
    if callbacks.on_start:
        callbacks.on_start(
            run.read_meta()
            | {
                "start_epoch": trainer.epoch + 1,
                "epochs": config.epochs,
                "epoch_images": trainer.epoch_images,
            }
        )
    try:
        for record in trainer.epochs(callbacks.on_step, stop.requested if stop else None):
            best_val = on_main(partial(save_epoch_end, best_val), best_val)
            if callbacks.on_epoch:
                callbacks.on_epoch(record)
    except StopRequested:
        # The ranks stopped at the same step; they agree on which signal to name.
        signal_number = group.max_int(stop.signal if stop and stop.signal else 0) or signal.SIGINT
        name = signal.Signals(signal_number).name
        where = f"after epoch {trainer.epoch}"
        if trainer.partial is not None:
            where = f"at epoch {trainer.partial.epoch}, step {trainer.partial.tally.steps}"

        def save_stop() -> None:
            if trainer.partial is not None:
                save_state()  # mid-epoch: resume continues at the next step
            run.update_meta(
                status="interrupted", ended_at=now_iso(), completed_epochs=trainer.epoch, interrupted_by=name
            )

        on_main(save_stop, None)
        error = interrupted(
            signal_number,
            f"{where}; the training state is saved",
            hint=f"resume with 'cifarcam train --run {run.name} --resume'",
        )
        raise group.raise_together(error) from None
    except TrainingDiverged as error:  # found by all ranks at the same step
        on_main(lambda: _mark_failed(run, saved_epochs(run), error.message), None)
        raise group.raise_together(error) from None
    except KeyboardInterrupt:
        if main:
            run.update_meta(status="interrupted", ended_at=now_iso(), completed_epochs=saved_epochs(run))
        raise
    except BaseException as error:
        if main:
            _mark_failed(run, saved_epochs(run), _reason(error))
        raise
    if main:
        run.update_meta(status="finished", ended_at=now_iso(), completed_epochs=trainer.epoch)
    return trainer.records


def _mark_failed(run: RunDir, completed_epochs: int, reason: str) -> None:
    run.update_meta(status="failed", ended_at=now_iso(), completed_epochs=completed_epochs, error=reason)
