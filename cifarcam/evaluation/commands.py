"""The `evaluate` and `misclassified` commands over a trained run, as library calls the CLI
wraps. Nothing here prints: results come back as values."""

from __future__ import annotations

from typing import Any

import torch

from cifarcam.errors import RunError, UsageError
from cifarcam.evaluation.inference import score
from cifarcam.evaluation.loading import load_run, test_logits
from cifarcam.report import figures
from cifarcam.runs.files import atomic_write_files, json_bytes
from cifarcam.runs.rundir import RunDir, reads_run


@reads_run
def evaluate(
    run: RunDir, checkpoint: str = "last", device_name: str = "auto", tta: bool = True
) -> dict[str, Any]:
    """Accuracy, mean loss, per-class accuracy and the confusion matrix on the test set; with
    `tta`, also the accuracy and loss of logits averaged over six views (identity, mirror, and
    both shifted one pixel up-left and down-right)."""
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
    gallery = figures.misclassified_gallery(
        loaded.test_display(indices),
        [entry["true"] for entry in entries],
        [entry["pred"] for entry in entries],
        [entry["confidence"] for entry in entries],
        f"run {run.name}: the {count} most confident mistakes on the test set "
        f"({checkpoint} checkpoint, epoch {loaded.info.epoch})",
    )
    atomic_write_files({run.misclassified_png: gallery, run.misclassified_json: json_bytes(entries)})
    return entries
