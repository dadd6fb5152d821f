"""What each command does to a run directory, as library calls the CLI wraps.

Nothing here prints: progress goes out through callbacks, results come back as values.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

import cifarcam
from cifarcam import viz
from cifarcam.config import TrainConfig, config_to_json
from cifarcam.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Dataset,
    Split,
    denormalize,
    load_dataset,
    normalize,
    split_train,
)
from cifarcam.distributed import SINGLE, Group
from cifarcam.engine import (
    StepCallback,
    Tta,
    autocast_dtype,
    memory_format,
    predict,
    resolve_device,
    score,
)
from cifarcam.errors import (
    CheckpointError,
    CifarcamError,
    RunError,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
)
from cifarcam.fileio import atomic_write_bytes, atomic_write_text
from cifarcam.models import build_model
from cifarcam.rundir import CheckpointInfo, RunDir, now_iso
from cifarcam.trainer import StopRequested, Trainer

T = TypeVar("T")


@dataclass
class TrainCallbacks:
    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: StepCallback | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None


def _data_dir(config: TrainConfig) -> Path | None:
    return Path(config.data_dir).expanduser() if config.data_dir else None


def _precision_name(amp_dtype: torch.dtype | None) -> str:
    return "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


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
    dataset = load_dataset(config.data, _data_dir(config))
    train_split, validation = split_train(
        dataset.train, len(dataset.classes), config.subset, config.val_split, config.seed
    )
    if len(train_split) == 0:
        raise UsageError("no training images are left after --val-split")
    return _Prepared(device, autocast_dtype(device, config.precision), dataset, train_split, validation)


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
        "precision": _precision_name(prepared.amp_dtype),
        "command": command or " ".join(sys.argv),
        "data": prepared.dataset.source,
        "classes": prepared.dataset.classes,
        "train_images": len(prepared.train),
        "val_images": len(prepared.validation) if prepared.validation is not None else 0,
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
    prepared = group.agree(lambda: _prepare(config, group))
    with contextlib.ExitStack() as lock:

        def load() -> tuple[tuple[dict[str, torch.Tensor], dict[str, Any]] | None, bool]:
            lock.enter_context(run.lock())
            run.remove_temporaries()
            state = run.load_state()
            if state is not None and state[1]["epoch"] >= config.epochs:
                run.update_meta(status="finished")
                return state, True
            meta = run.read_meta() if run.meta_path.exists() else {}
            run.update_meta(
                status="running",
                started_at=meta.get("started_at") or now_iso(),
                resumed_at=[*meta.get("resumed_at", []), now_iso()],
                ended_at=None,
                error=None,
                **_environment(prepared, command, group),
            )
            return state, False

        state, finished = group.from_main(load)
        if finished:
            assert state is not None
            return list(state[1]["records"])
        return _train_loop(config, run, prepared, state, callbacks or TrainCallbacks(), stop, group)


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
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels
    layout = memory_format(device, prepared.amp_dtype, config.channels_last)
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

    def save_epoch_end(best_val: float) -> float:
        """The state first (the commit point of an epoch), then what is derived from it."""
        run.save_state(*trainer.state())
        epoch_header = header | {"epoch": trainer.epoch}
        run.save_checkpoint("last", model, epoch_header)
        val_acc = trainer.records[-1].get("val_acc", -1.0)
        if validation is not None and val_acc > best_val:
            run.save_checkpoint("best", model, epoch_header)
            best_val = val_acc
        run.write_json(run.metrics_path, {"epochs": trainer.records})
        return best_val

    best_val = -1.0
    if state is not None:
        trainer.load_state(*state)
        val_accs = [record.get("val_acc", -1.0) for record in trainer.records]
        if trainer.partial is None and trainer.records:
            # A kill between the state and the files derived from it leaves them one epoch behind.
            best_val = on_main(lambda: save_epoch_end(max(val_accs[:-1], default=-1.0)), -1.0)
        else:
            best_val = max(val_accs, default=-1.0)
    if callbacks.on_start:
        callbacks.on_start(run.read_meta() | {"start_epoch": trainer.epoch + 1, "epochs": config.epochs})
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
                run.save_state(*trainer.state())  # mid-epoch: resume continues at the next step
            run.update_meta(
                status="interrupted", ended_at=now_iso(), completed_epochs=trainer.epoch, interrupted_by=name
            )

        on_main(save_stop, None)
        error = TrainingInterrupted(
            f"interrupted by {name} {where}; the training state is saved",
            hint=f"resume with 'cifarcam train --run {run.name} --resume'",
            exit_code=128 + int(signal_number),
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
            reason = error.message if isinstance(error, CifarcamError) else f"{type(error).__name__}: {error}"
            _mark_failed(run, trainer.epoch, reason)
        raise
    if main:
        run.update_meta(status="finished", ended_at=now_iso(), completed_epochs=trainer.epoch)
    return trainer.records


def _mark_failed(run: RunDir, completed_epochs: int, reason: str) -> None:
    run.update_meta(status="failed", ended_at=now_iso(), completed_epochs=completed_epochs, error=reason)


# -- commands over a trained run --------------------------------------------------------


@dataclass
class LoadedRun:
    run: RunDir
    model: nn.Module
    info: CheckpointInfo
    test: Split  # on `device`
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def predict_test(self, tta: Tta = "none") -> torch.Tensor:
        """Float32 logits (N, C) on the CPU for the whole test set."""
        return predict(
            self.model,
            self.test.images,
            self.info.mean,
            self.info.std,
            amp_dtype=self.amp_dtype,
            tta=tta,
            channels_last=self.channels_last,
        ).cpu()

    def test_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Test images `indices` as the model takes them: normalised float, on the device."""
        images = self.test.images[indices.to(self.device)]
        return normalize(images, self.info.mean, self.info.std).float()

    def test_display(self, indices: torch.Tensor) -> np.ndarray:
        """The same images un-normalised with the checkpoint's mean/std, (N, 3, H, W) in [0, 1]."""
        return denormalize(self.test_inputs(indices), self.info.mean, self.info.std).cpu().numpy()

    def cam_model(self, amp_dtype: torch.dtype | None = None) -> nn.Module:
        """The model for CAM work: float32 weights, NCHW unless under autocast, since torch 2.14's
        CPU channels_last float32 convolution backward is unreliable for some batch sizes."""
        layout = memory_format(self.device, amp_dtype, channels_last=True)
        return self.model.float().to(memory_format=layout).eval()


def read_config(run: RunDir) -> TrainConfig:
    run.require()
    try:
        return TrainConfig.model_validate(run.read_json(run.config_path))
    except ValidationError as error:
        raise RunError(
            f"'{run.config_path}' is not a valid cifarcam config ({error.error_count()} errors)"
        ) from None


def load_checkpoint(
    run: RunDir, checkpoint: str = "last", device_name: str = "auto"
) -> tuple[nn.Module, CheckpointInfo, TrainConfig, torch.device]:
    """The run's model rebuilt from its checkpoint alone and checked against config.json; no data
    is read. The model stays on the CPU in float32; the device is resolved for the caller."""
    run.require()
    device = resolve_device(device_name)
    model, info = run.load_model(checkpoint)
    config = read_config(run)
    if (info.model, info.width) != (config.model, config.width):
        raise CheckpointError(
            f"checkpoint '{run.checkpoint_path(checkpoint)}' holds {info.model} width {info.width}, "
            f"but the run's config.json says {config.model} width {config.width}"
        )
    return model, info, config, device


def load_run(run: RunDir, checkpoint: str = "last", device_name: str = "auto") -> LoadedRun:
    """The run's model (from its checkpoint alone) and its test set, ready on the device."""
    model, info, config, device = load_checkpoint(run, checkpoint, device_name)
    dataset = load_dataset(config.data, _data_dir(config))
    if dataset.classes != info.classes:
        raise RunError(
            f"the data at '{config.data}' has classes {dataset.classes}, "
            f"but the checkpoint was trained on {info.classes}"
        )
    amp_dtype = autocast_dtype(device, config.precision)
    model = model.to(device).to(memory_format=memory_format(device, amp_dtype, config.channels_last)).eval()
    return LoadedRun(run, model, info, dataset.test.to(device), device, amp_dtype, config.channels_last)


def _cached_test_logits(loaded: LoadedRun) -> torch.Tensor | None:
    """The test-set logits in predictions.safetensors if they are this checkpoint's."""
    cache = loaded.run.predictions_path
    if cache.exists():
        try:
            with safe_open(str(cache), framework="pt") as cached:
                logits: torch.Tensor = cached.get_tensor("logits")
                same_checkpoint = (cached.metadata() or {}).get("checkpoint_id") == loaded.info.checkpoint_id
            if same_checkpoint and logits.shape[0] == len(loaded.test):
                return logits
        except (SafetensorError, OSError):
            pass  # a bad cache is recomputed (and replaced by test_logits)
    return None


def test_logits(loaded: LoadedRun, write: bool = True) -> torch.Tensor:
    """Float32 logits (N, C) on the test set, cached per checkpoint in predictions.safetensors
    (computed and not cached with `write=False`, for readers that must not touch the run)."""
    cached = _cached_test_logits(loaded)
    if cached is not None:
        return cached
    logits = loaded.predict_test()
    if write:
        metadata = {"checkpoint_id": loaded.info.checkpoint_id}
        save = save_safetensors({"logits": logits.contiguous()}, metadata=metadata)
        atomic_write_bytes(loaded.run.predictions_path, save)
    return logits


def evaluate(
    run: RunDir, checkpoint: str = "last", device_name: str = "auto", tta: bool = True
) -> dict[str, Any]:
    """Accuracy, mean loss, per-class accuracy and the confusion matrix on the test set.

    With `tta`, also the accuracy and loss of logits averaged over six views (identity,
    mirror, and both shifted one pixel up-left and down-right); per-class figures and the
    confusion matrix are for the single view.
    """
    loaded = load_run(run, checkpoint, device_name)
    logits = test_logits(loaded)
    labels = loaded.test.labels.cpu()
    scores = score(logits, labels)
    predictions = logits.argmax(1)
    classes = loaded.info.classes
    num_classes = len(classes)
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes)
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1).double()
    result = {
        "checkpoint": checkpoint,
        "epoch": loaded.info.epoch,
        "num_images": len(labels),
        "accuracy": scores["acc"],
        "loss": scores["loss"],
        "per_class_accuracy": {name: per_class[i].item() for i, name in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_rows": "true class",
        "classes": classes,
    }
    if tta:
        tta_logits = loaded.predict_test(tta="flip-translate")
        tta_scores = score(tta_logits, labels)
        result |= {"accuracy_tta": tta_scores["acc"], "loss_tta": tta_scores["loss"], "tta": "flip-translate"}
    run.write_json(run.evaluation_path, result)
    return result


def select_misclassified(probs: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` wrong predictions made with the highest confidence (ties: lower index)."""
    confidence, predictions = probs.max(dim=1)
    wrong = torch.nonzero(predictions != labels).flatten()
    if count > len(wrong):
        raise RunError(
            f"only {len(wrong)} test images are misclassified; ask for --count {len(wrong)} or fewer"
        )
    order = torch.sort(-confidence[wrong], stable=True).indices
    return wrong[order[:count]]


def mistake_entries(
    probs: torch.Tensor, labels: torch.Tensor, classes: list[str], indices: torch.Tensor
) -> list[dict[str, Any]]:
    """One record per test image in `indices`: true and predicted class, confidence."""
    confidence, predictions = probs[indices].max(dim=1)
    return [
        {
            "index": int(i),
            "true": classes[int(labels[i])],
            "pred": classes[int(p)],
            "true_label": int(labels[i]),
            "pred_label": int(p),
            "confidence": float(c),
        }
        for i, p, c in zip(indices, predictions, confidence, strict=True)
    ]


def misclassified(
    run: RunDir, count: int = 10, checkpoint: str = "last", device_name: str = "auto"
) -> list[dict[str, Any]]:
    if count < 1:
        raise UsageError("--count must be at least 1")
    loaded = load_run(run, checkpoint, device_name)
    probs = torch.softmax(test_logits(loaded), dim=1)
    labels = loaded.test.labels.cpu()
    indices = select_misclassified(probs, labels, count)
    entries = mistake_entries(probs, labels, loaded.info.classes, indices)
    viz.misclassified_gallery(
        loaded.test_display(indices),
        [entry["true"] for entry in entries],
        [entry["pred"] for entry in entries],
        [entry["confidence"] for entry in entries],
        run.misclassified_png,
        f"run {run.name}: the {count} most confident mistakes on the test set "
        f"({checkpoint} checkpoint, epoch {loaded.info.epoch})",
    )
    run.write_json(run.misclassified_json, entries)
    return entries


def plot(run: RunDir) -> list[Path]:
    epochs = run.read_epochs()
    paths = [run.plots_dir / "loss.png", run.plots_dir / "accuracy.png"]
    viz.plot_curves(epochs, *paths)
    return paths
