"""What each command does to a run directory, as library calls the CLI wraps.

Nothing here prints: progress goes out through callbacks, results come back as values.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

import cifarcam
from cifarcam import viz
from cifarcam.cam import CamExtractor
from cifarcam.config import TrainConfig, config_to_json
from cifarcam.data import CIFAR10_MEAN, CIFAR10_STD, Split, denormalize, load_dataset, normalize, split_train
from cifarcam.engine import StepCallback, autocast_dtype, fit, predict, resolve_device, score
from cifarcam.errors import RunError, UsageError
from cifarcam.fileio import atomic_write_bytes, atomic_write_text
from cifarcam.models import build_model
from cifarcam.rundir import CheckpointInfo, RunDir, now_iso


@dataclass
class TrainCallbacks:
    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: StepCallback | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None


def _data_dir(config: TrainConfig) -> Path | None:
    return Path(config.data_dir).expanduser() if config.data_dir else None


def _precision_name(amp_dtype: torch.dtype | None) -> str:
    return "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


def train(
    config: TrainConfig,
    run: RunDir,
    overwrite: bool = False,
    command: str = "",
    callbacks: TrainCallbacks | None = None,
) -> list[dict[str, float]]:
    """Train a model as configured, writing config, meta, metrics and checkpoints into `run`."""
    callbacks = callbacks or TrainCallbacks()
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(device, config.precision)
    dataset = load_dataset(config.data, _data_dir(config))
    num_classes = len(dataset.classes)
    train_split, validation = split_train(
        dataset.train, num_classes, config.subset, config.val_split, config.seed
    )
    if len(train_split) == 0:
        raise UsageError("no training images are left after --val-split")
    # CIFAR-10's official statistics for every source; each checkpoint keeps its own copy.
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    run.start_training(overwrite)
    atomic_write_text(run.config_path, config_to_json(config))
    meta = run.update_meta(
        status="running",
        started_at=now_iso(),
        ended_at=None,
        cifarcam_version=cifarcam.__version__,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        precision=_precision_name(amp_dtype),
        command=command or " ".join(sys.argv),
        data=dataset.source,
        classes=dataset.classes,
        train_images=len(train_split),
        val_images=len(validation) if validation is not None else 0,
        test_images=len(dataset.test),
    )
    if callbacks.on_start:
        callbacks.on_start(meta)

    torch.manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config.model, config.width, num_classes).to(device).to(memory_format=memory_format)
    header = {
        "model": config.model,
        "width": config.width,
        "num_classes": num_classes,
        "classes": dataset.classes,
        "mean": list(mean),
        "std": list(std),
    }
    epochs: list[dict[str, float]] = []
    best_val = -1.0
    try:
        for record in fit(
            model,
            train_split.to(device),
            dataset.test.to(device),
            config,
            mean,
            std,
            validation=validation.to(device) if validation is not None else None,
            amp_dtype=amp_dtype,
            on_step=callbacks.on_step,
        ):
            epochs.append(record)
            run.save_checkpoint("last", model, header | {"epoch": record["epoch"]})
            if validation is not None and record["val_acc"] > best_val:
                best_val = record["val_acc"]
                run.save_checkpoint("best", model, header | {"epoch": record["epoch"]})
            run.write_json(run.metrics_path, {"epochs": epochs})
            if callbacks.on_epoch:
                callbacks.on_epoch(record)
    except KeyboardInterrupt:
        run.update_meta(status="interrupted", ended_at=now_iso(), completed_epochs=len(epochs))
        raise
    except BaseException as error:
        run.update_meta(
            status="failed",
            ended_at=now_iso(),
            completed_epochs=len(epochs),
            error=f"{type(error).__name__}: {error}",
        )
        raise
    run.update_meta(status="finished", ended_at=now_iso(), completed_epochs=len(epochs))
    return epochs


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


def read_config(run: RunDir) -> TrainConfig:
    run.require()
    try:
        return TrainConfig.model_validate(run.read_json(run.config_path))
    except ValidationError as error:
        raise RunError(
            f"'{run.config_path}' is not a valid cifarcam config ({error.error_count()} errors)"
        ) from None


def load_run(run: RunDir, checkpoint: str = "last", device_name: str = "auto") -> LoadedRun:
    """The run's model (from its checkpoint alone) and its test set, ready on the device."""
    run.require()
    device = resolve_device(device_name)
    model, info = run.load_model(checkpoint)
    config = read_config(run)
    dataset = load_dataset(config.data, _data_dir(config))
    if dataset.classes != info.classes:
        raise RunError(
            f"the data at '{config.data}' has classes {dataset.classes}, "
            f"but the checkpoint was trained on {info.classes}"
        )
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).eval()
    test = dataset.test.to(device)
    return LoadedRun(
        run, model, info, test, device, autocast_dtype(device, config.precision), config.channels_last
    )


def test_logits(loaded: LoadedRun) -> torch.Tensor:
    """Float32 logits (N, C) on the test set, cached per checkpoint in predictions.safetensors."""
    cache = loaded.run.path / "predictions.safetensors"
    if cache.exists():
        try:
            with safe_open(str(cache), framework="pt") as cached:
                logits: torch.Tensor = cached.get_tensor("logits")
                same_checkpoint = (cached.metadata() or {}).get("checkpoint_id") == loaded.info.checkpoint_id
            if same_checkpoint and logits.shape[0] == len(loaded.test):
                return logits
        except (SafetensorError, OSError):
            pass  # a bad cache is recomputed and replaced
    logits = predict(
        loaded.model,
        loaded.test.images,
        loaded.info.mean,
        loaded.info.std,
        amp_dtype=loaded.amp_dtype,
        channels_last=loaded.channels_last,
    ).cpu()
    metadata = {"checkpoint_id": loaded.info.checkpoint_id}
    atomic_write_bytes(cache, save_safetensors({"logits": logits.contiguous()}, metadata=metadata))
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
        tta_logits = predict(
            loaded.model,
            loaded.test.images,
            loaded.info.mean,
            loaded.info.std,
            amp_dtype=loaded.amp_dtype,
            tta="flip-translate",
            channels_last=loaded.channels_last,
        ).cpu()
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


def _display_images(loaded: LoadedRun, indices: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The normalised model input for `indices` and the same images un-normalised for display."""
    x = normalize(loaded.test.images[indices.to(loaded.device)], loaded.info.mean, loaded.info.std)
    shown = denormalize(x, loaded.info.mean, loaded.info.std).cpu().numpy()
    return x, shown


def misclassified(
    run: RunDir, count: int = 10, checkpoint: str = "last", device_name: str = "auto"
) -> list[dict[str, Any]]:
    if count < 1:
        raise UsageError("--count must be at least 1")
    loaded = load_run(run, checkpoint, device_name)
    probs = torch.softmax(test_logits(loaded), dim=1)
    labels = loaded.test.labels.cpu()
    indices = select_misclassified(probs, labels, count)
    classes = loaded.info.classes
    entries = [
        {
            "index": int(i),
            "true": classes[int(labels[i])],
            "pred": classes[int(probs[i].argmax())],
            "true_label": int(labels[i]),
            "pred_label": int(probs[i].argmax()),
            "confidence": float(probs[i].max()),
        }
        for i in indices
    ]
    _, shown = _display_images(loaded, indices)
    viz.misclassified_gallery(
        shown,
        [classes[int(labels[i])] for i in indices],
        [classes[int(probs[i].argmax())] for i in indices],
        probs[indices].max(1).values.tolist(),
        run.misclassified_png,
        f"run {run.name}: the {count} most confident mistakes on the test set "
        f"({checkpoint} checkpoint, epoch {loaded.info.epoch})",
    )
    run.write_json(run.misclassified_json, entries)
    return entries


def gradcam(
    run: RunDir, layer: str = "layer4", count: int = 10, checkpoint: str = "last", device_name: str = "auto"
) -> dict[str, Path]:
    """Grad-CAM for the predicted and the true class of the `count` most confident mistakes."""
    if count < 1:
        raise UsageError("--count must be at least 1")
    loaded = load_run(run, checkpoint, device_name)
    CamExtractor(loaded.model, [layer])  # validates the layer name before any work
    probs = torch.softmax(test_logits(loaded), dim=1)
    labels = loaded.test.labels.cpu()
    indices = select_misclassified(probs, labels, count)
    x, shown = _display_images(loaded, indices)
    true = labels[indices].to(loaded.device)
    with CamExtractor(loaded.model, [layer]) as cam:
        logits, maps = cam(x.float(), {"pred": probs[indices].argmax(1).to(loaded.device), "true": true})
    pred = logits.argmax(1).cpu()
    confidence = torch.softmax(logits.float(), 1).max(1).values.cpu()
    maps_pred, maps_true = (maps[t][layer].cpu().contiguous() for t in ("pred", "true"))
    classes = loaded.info.classes
    paths = {kind: run.gradcam_dir / f"{layer}.{kind}" for kind in ("png", "json", "safetensors")}
    atomic_write_bytes(
        paths["safetensors"],
        save_safetensors(
            {
                "maps_pred": maps_pred,
                "maps_true": maps_true,
                "indices": indices.contiguous(),
                "true": labels[indices].contiguous(),
                "pred": pred.contiguous(),
            }
        ),
    )
    viz.cam_gallery(
        shown,
        maps_pred.numpy(),
        maps_true.numpy(),
        [classes[int(t)] for t in labels[indices]],
        [classes[int(p)] for p in pred],
        confidence.tolist(),
        paths["png"],
        f"run {run.name}: Grad-CAM at {layer} for the {count} most confident mistakes "
        "(columns: input, predicted class, true class)",
    )
    run.write_json(
        paths["json"],
        {
            "layer": layer,
            "method": "gradcam",
            "checkpoint": checkpoint,
            "epoch": loaded.info.epoch,
            "indices": indices.tolist(),
            "true": [classes[int(t)] for t in labels[indices]],
            "pred": [classes[int(p)] for p in pred],
            "confidence": confidence.tolist(),
            "maps": "maps_pred and maps_true in the .safetensors: (N, 32, 32), float32 in [0, 1], "
            "ReLU, bilinear upsampling (align_corners=False), min-max per map",
        },
    )
    return paths


def plot(run: RunDir) -> list[Path]:
    run.require()
    if not run.metrics_path.exists():
        raise RunError(
            f"run '{run.name}' has no metrics.json", hint=f"run 'cifarcam train --run {run.name}' first"
        )
    metrics = run.read_json(run.metrics_path)
    epochs = metrics.get("epochs") if isinstance(metrics, dict) else None
    if not epochs:
        raise RunError(f"run '{run.name}' has no completed epoch in metrics.json")
    paths = [run.plots_dir / "loss.png", run.plots_dir / "accuracy.png"]
    viz.plot_curves(epochs, *paths)
    return paths
