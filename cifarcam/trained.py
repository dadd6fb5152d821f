"""The commands over a trained run (evaluate, misclassified) and the loading they share
(a run's checkpoint, its test set, cached test logits), as library calls the CLI wraps.

Nothing here prints: results come back as values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarcam import viz
from cifarcam.config import TrainConfig, data_dir_path, validate_saved
from cifarcam.data import (
    Split,
    denormalize,
    load_dataset,
    normalize,
)
from cifarcam.engine import Tta, predict, resolve_device, score
from cifarcam.errors import (
    CheckpointError,
    ConfigError,
    RunError,
    UsageError,
)
from cifarcam.fileio import atomic_write_files, json_bytes
from cifarcam.formats import CheckpointInfo
from cifarcam.precision import memory_format, training_dtype
from cifarcam.rundir import RunDir
from cifarcam.runlock import reads_run


@dataclass
class LoadedRun:
    run: RunDir
    model: nn.Module
    info: CheckpointInfo
    test: Split  # on `device`
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    test_fingerprint: str  # `Split.fingerprint` of the test set: the logits cache and maps files name it

    def predict_test(self, tta: Tta = "none", plain_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits (N, C) on the CPU for the whole test set (`engine.predict`)."""
        return predict(
            self.model,
            self.test.images,
            self.info.mean,
            self.info.std,
            amp_dtype=self.amp_dtype,
            tta=tta,
            channels_last=self.channels_last,
            plain_logits=plain_logits,
        ).cpu()

    def test_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """Test images `indices` as the model takes them: normalised float, on the device."""
        images = self.test.images[indices.to(self.device)]
        return normalize(images, self.info.mean, self.info.std).float()

    def test_display(self, indices: torch.Tensor) -> np.ndarray:
        """The same images un-normalised with the checkpoint's mean/std, (N, 3, H, W) in [0, 1]."""
        return denormalize(self.test_inputs(indices), self.info.mean, self.info.std).cpu().numpy()

    def cam_model(self) -> nn.Module:
        """The model for CAM work: float32 weights in channels_last, in eval mode."""
        return self.model.float().to(memory_format=memory_format(channels_last=True)).eval()


def read_config(run: RunDir) -> TrainConfig:
    run.require()
    try:
        return validate_saved(run.read_json(run.config_path))
    except ConfigError as error:
        raise RunError(f"'{run.config_path}' is not a valid cifarcam config: {error.message}") from None


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
    dataset = load_dataset(config.data, data_dir_path(config))
    if dataset.classes != info.classes:
        raise RunError(
            f"the data at '{config.data}' has classes {dataset.classes}, "
            f"but the checkpoint was trained on {info.classes}"
        )
    fingerprint = dataset.test.fingerprint()
    trained_on = _recorded_test_fingerprint(run, dataset.source)
    if trained_on is not None and trained_on != fingerprint:
        raise RunError(
            f"the test images at '{config.data}' have changed since run '{run.name}' was trained "
            "(same classes, other pixels or labels): its results would not be comparable",
            hint="put the data back as it was, or train a new run on the new data",
        )
    amp_dtype = training_dtype(device, config.precision)
    model = model.to(device).to(memory_format=memory_format(config.channels_last)).eval()
    return LoadedRun(
        run, model, info, dataset.test.to(device), device, amp_dtype, config.channels_last, fingerprint
    )


def _recorded_test_fingerprint(run: RunDir, source: str) -> str | None:
    """The digest of the test set `train` recorded in meta.json, when it trained on the data at
    `source` too (a config.json pointed at other data on purpose is scored on it); None for runs
    from before it was recorded, or when meta.json cannot be read."""
    try:
        meta = run.read_meta()
    except RunError:
        return None
    recorded = meta.get("test_fingerprint")
    return recorded if isinstance(recorded, str) and meta.get("data") == source else None


def test_logits(loaded: LoadedRun, write: bool = True) -> torch.Tensor:
    """Float32 logits (N, C) on the test set, cached per checkpoint in predictions.safetensors
    (computed and not cached with `write=False`, for readers that must not touch the run)."""
    fingerprint = loaded.test_fingerprint
    cached = loaded.run.read_test_logits(loaded.info.checkpoint_id, fingerprint)
    if cached is not None:
        return cached
    logits = loaded.predict_test()
    if write:
        loaded.run.save_test_logits(logits, loaded.info.checkpoint_id, fingerprint)
    return logits


@reads_run
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
    per_class = confusion.diag().double() / confusion.sum(1).double()  # NaN: no test image of the class
    result = {
        "checkpoint": checkpoint,
        "epoch": loaded.info.epoch,
        "num_images": len(labels),
        "accuracy": scores["acc"],
        "loss": scores["loss"],
        "per_class_accuracy": {  # null for a class without test images
            name: None if per_class[i].isnan() else per_class[i].item() for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_rows": "true class",
        "classes": classes,
    }
    if tta:
        tta_logits = loaded.predict_test(tta="flip-translate", plain_logits=logits)
        tta_scores = score(tta_logits, labels)
        result |= {"accuracy_tta": tta_scores["acc"], "loss_tta": tta_scores["loss"], "tta": "flip-translate"}
    run.write_json(run.evaluation_path, result)
    return result


def select_misclassified(probs: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` wrong predictions made with the highest confidence (ties: lower index)."""
    confidence, predictions = probs.max(dim=1)
    wrong = torch.nonzero(predictions != labels).flatten()
    if count > 0 and len(wrong) == 0:
        raise RunError(
            f"none of the {len(labels)} test images is misclassified: there are no mistakes to show",
            hint="gradcam --all explains the whole test set",
        )
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


@reads_run
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
    gallery = viz.misclassified_gallery(
        loaded.test_display(indices),
        [entry["true"] for entry in entries],
        [entry["pred"] for entry in entries],
        [entry["confidence"] for entry in entries],
        f"run {run.name}: the {count} most confident mistakes on the test set "
        f"({checkpoint} checkpoint, epoch {loaded.info.epoch})",
    )
    atomic_write_files({run.misclassified_png: gallery, run.misclassified_json: json_bytes(entries)})
    return entries
