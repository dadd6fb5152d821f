"""The train and resume commands on a run directory, as library calls the CLI wraps (the
commands over a trained run are in cifarcam.trained).

Nothing here prints: progress goes out through callbacks, results come back as values.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, TypeVar

import torch
from torch import nn

import cifarcam
from cifarcam import resumption
from cifarcam.config import TrainConfig, config_to_json, data_dir_path
from cifarcam.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Dataset,
    Split,
    load_dataset,
    split_train,
)
from cifarcam.distributed import SINGLE, Group
from cifarcam.engine import StepCallback, resolve_device
from cifarcam.errors import (
    CifarcamError,
    RunError,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
)
from cifarcam.fileio import atomic_write_text
from cifarcam.models import build_model
from cifarcam.precision import memory_format, precision_name, training_dtype
from cifarcam.rundir import RunDir, now_iso
from cifarcam.trained import read_config
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
class _Prepared:
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


def _prepare(config: TrainConfig, group: Group = SINGLE) -> _Prepared:
    """Everything that can fail on bad input, done before the run directory is touched."""
    device = resolve_device(config.device, group.local_rank if group.distributed else None)
    if group.distributed and config.albumentations is not None:
        raise UsageError(
            "an albumentations pipeline trains in one process only (its DataLoader workers "
            "draw their own order); under torchrun use the on-device augmentation"
        )
    if group.distributed and config.sync_bn and device.type != "cuda":
        raise UsageError(
            "--sync-bn needs CUDA: SyncBatchNorm does not run on the CPU, where each process "
            "normalises its share of the batch with its own statistics",
            hint="leave out --sync-bn, or use --norm group for normalisation without batch statistics",
        )
    if config.precision == "fp16" and device.type != "cuda":
        raise UsageError(f"--precision fp16 needs CUDA (the device is {device.type}); use bf16 or fp32")
    dataset = load_dataset(config.data, data_dir_path(config))
    train_split, validation = split_train(
        dataset.train, len(dataset.classes), config.subset, config.val_split, config.seed
    )
    if len(train_split) == 0:
        raise UsageError("no training images are left after --val-split")
    return _Prepared(device, training_dtype(device, config.precision), dataset, train_split, validation)


def _environment(prepared: _Prepared, command: str, group: Group) -> dict[str, Any]:
    device = prepared.device
    return {
        "cifarcam_version": cifarcam.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "precision": precision_name(prepared.amp_dtype),
        "command": command or " ".join(sys.argv),
        "data": prepared.dataset.source,
        **prepared.data_facts,
        "test_images": len(prepared.dataset.test),
        "world_size": group.world_size,
    }


def train(
    config: TrainConfig,
    run: RunDir,
    overwrite: bool = False,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
    stop: StopSignal | None = None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Train a model as configured, writing config, meta, metrics and checkpoints into `run`.

    Under torchrun only rank 0 locks and writes the run directory; every step that can fail
    is agreed on by all ranks, so an error is printed once and no rank is left waiting.
    """
    prepared = group.agree(lambda: _prepare(config, group))
    with contextlib.ExitStack() as lock:

        def start() -> None:
            if stop is not None and stop.signal is not None:  # while the data loaded: nothing touched
                raise _interrupted(stop.signal, f"before training started; run '{run.name}' was not changed")
            lock.enter_context(run.lock())
            run.start_training(overwrite)
            atomic_write_text(run.config_path, config_to_json(config))
            run.update_meta(
                status="running",
                started_at=now_iso(),
                ended_at=None,
                **_environment(prepared, command, group),
            )

        group.from_main(start)
        with _never_left_running(run, None, group):
            return _train_loop(config, run, prepared, None, callbacks or TrainCallbacks(), stop, group)


def resume(
    run: RunDir,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
    stop: StopSignal | None = None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
    """Continue a run from its last saved state (or from the start if none was saved).

    Under torchrun rank 0 reads the config and the state and sends them to the other ranks.
    """
    config = group.from_main(lambda: read_config(run))

    def check_config_early() -> None:
        """A changed config.json is refused before the data load, from the state file's header
        (checked again with the whole state, under the run's lock, below)."""
        saved = run.read_state_meta()
        if saved is not None:
            resumption.check_same_config(run, config, saved)

    group.from_main(check_config_early)
    prepared = group.agree(lambda: _prepare(config, group))
    with contextlib.ExitStack() as lock:

        def load() -> tuple[
            tuple[dict[str, torch.Tensor], dict[str, Any]] | None, list[dict[str, Any]] | None
        ]:
            """The state to continue from, or the records of a run that has nothing left to train."""
            lock.enter_context(run.lock())
            run.remove_temporaries()
            state = run.load_state()
            if state is not None:
                resumption.check_same_config(run, config, state[1])
            if state is None and (run.checkpoint_path("last").exists() or run.metrics_path.exists()):
                records = resumption.finished_without_state(run, config)
                if records is not None:  # nothing to resume; its results are all there
                    return None, records
                raise RunError(  # starting over would replace its epochs without --overwrite
                    f"run '{run.name}' has trained epochs but no training state to resume from "
                    f"('{run.state_path}' is missing)",
                    hint=f"train it again from the start with 'cifarcam train --run {run.name} --overwrite'",
                )
            if (
                state is not None
                and state[1]["epoch"] >= config.epochs
                and resumption.derived_files_saved(run, state)
            ):
                run.update_meta(status="finished")
                return state, list(state[1]["records"])
            # else also a run whose last epoch's state was saved but not all the files derived
            # from it (killed in between): _train_loop writes them again from the state
            meta = run.read_meta() if run.meta_path.exists() else {}
            resumed = meta.get("resumed_at")
            environment = _environment(prepared, command, group)
            if state is not None:
                resumption.check_same_data(run, state[1].get("data") or meta, environment)
            run.update_meta(
                status="running",
                started_at=meta.get("started_at") or now_iso(),
                resumed_at=[*(resumed if isinstance(resumed, list) else []), now_iso()],
                ended_at=None,
                error=None,
                **environment,
            )
            return state, None

        state, finished = group.from_main(load)
        if finished is not None:
            return finished
        with _never_left_running(run, state, group):
            return _train_loop(config, run, prepared, state, callbacks or TrainCallbacks(), stop, group)


def _interrupted(number: int, what: str, hint: str | None = None) -> TrainingInterrupted:
    """The error of a stop asked by signal `number`: 'interrupted by SIGNAME <what>', exit 128 + it."""
    return TrainingInterrupted(
        f"interrupted by {signal.Signals(number).name} {what}", hint, 128 + int(number)
    )


@contextlib.contextmanager
def _never_left_running(
    run: RunDir, state: tuple[Any, dict[str, Any]] | None, group: Group
) -> Iterator[None]:
    """meta.json never left saying "running" by an error before the first step (a model too large
    for the device, a disk error while repairing the last epoch's files), which the handlers
    around the epochs in `_train_loop` do not see."""
    try:
        yield
    except BaseException as error:
        if group.is_main:
            _mark_if_running(run, int(state[1]["epoch"]) if state is not None else 0, error)
        raise


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


def _train_loop(
    config: TrainConfig,
    run: RunDir,
    prepared: _Prepared,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    callbacks: TrainCallbacks,
    stop: StopSignal | None,
    group: Group = SINGLE,
) -> list[dict[str, float]]:
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
    test_fingerprint = dataset.test.fingerprint()  # the logits cache names the test set it scored
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
        except (RuntimeError, KeyError, ValueError):  # a state from before config was recorded in it
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
        error = _interrupted(
            signal_number,
            f"{where}; the training state is saved",
            hint=f"resume with 'cifarcam train --run {run.name} --resume'",
        )
        raise group.raise_together(error) from None
    except TrainingDiverged as error:  # found by all ranks at the same step
        on_main(lambda: _mark_failed(run, trainer.epoch, error.message), None)
        raise group.raise_together(error) from None
    except KeyboardInterrupt:
        if main:
            run.update_meta(status="interrupted", ended_at=now_iso(), completed_epochs=trainer.epoch)
        raise
    except BaseException as error:
        if main:
            _mark_failed(run, trainer.epoch, _reason(error))
        raise
    if main:
        run.update_meta(status="finished", ended_at=now_iso(), completed_epochs=trainer.epoch)
    return trainer.records


def _mark_failed(run: RunDir, completed_epochs: int, reason: str) -> None:
    run.update_meta(status="failed", ended_at=now_iso(), completed_epochs=completed_epochs, error=reason)
