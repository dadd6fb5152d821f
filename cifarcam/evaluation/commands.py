"""The `evaluate`, `misclassified` and `label-issues` commands over a trained run, as library calls the CLI
wraps. Nothing here prints: results come back as values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cifarcam.errors import RunError, UsageError
from cifarcam.evaluation.inference import score
from cifarcam.evaluation.label_issues import find_label_issues, label_issue_entries, label_issue_marks
from cifarcam.evaluation.loading import load_run, test_logits
from cifarcam.report import figures
from cifarcam.runs import tensorboard
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


@dataclass
class Mistakes:
    entries: list[dict[str, Any]]
    unmarked_because: str | None  # why likely label errors are not marked; None: they are


@reads_run
def misclassified(
    run: RunDir, count: int = 10, checkpoint: str = "last", device_name: str = "auto"
) -> Mistakes:
    """The `count` most confident mistakes, each marked when its label is a likely label error."""
    if count < 1:
        raise UsageError("--count must be at least 1")
    loaded = load_run(run, checkpoint, device_name)
    probs = torch.softmax(test_logits(loaded), dim=1)
    labels = loaded.test.labels.cpu()
    indices = select_misclassified(probs, labels, count)
    entries = mistake_entries(probs, labels, loaded.info.classes, indices)
    marks, unmarked_because = label_issue_marks(probs, labels, loaded.info.classes)
    for entry, index in zip(entries, indices, strict=True):
        entry["likely_label_issue"] = None if marks is None else bool(marks[index])
    captions = [
        f"#{e['index']} true: {e['true']}\npred: {e['pred']} ({e['confidence']:.0%})"
        + ("\nlikely label error" if e["likely_label_issue"] else "")
        for e in entries
    ]
    gallery = figures.image_grid(
        loaded.test_display(indices),
        captions,
        f"run {run.name}: the {count} most confident mistakes on the test set "
        f"({checkpoint} checkpoint, epoch {loaded.info.epoch}; red: likely label error)",
        [bool(e["likely_label_issue"]) for e in entries],
    )
    atomic_write_files({run.misclassified_png: gallery, run.misclassified_json: json_bytes(entries)})
    tensorboard.log_gallery(run, "misclassified", gallery, loaded.info.epoch)
    return Mistakes(entries, unmarked_because)


@reads_run
def label_issues(
    run: RunDir, count: int = 20, checkpoint: str = "last", device_name: str = "auto"
) -> list[dict[str, Any]]:
    """Every likely label error of the test set, most likely first, into label_issues.json; the
    first `count` of them into label_issues.png."""
    if count < 1:
        raise UsageError("--count must be at least 1")
    loaded = load_run(run, checkpoint, device_name)
    probs = torch.softmax(test_logits(loaded), dim=1)
    labels = loaded.test.labels.cpu()
    issues = find_label_issues(probs, labels, loaded.info.classes)
    entries = label_issue_entries(issues, probs, labels, loaded.info.classes)
    document = {
        "checkpoint": checkpoint,
        "epoch": loaded.info.epoch,
        "test_images": len(labels),
        "method": "cleanlab find_label_issues on the test-set probabilities, ranked by "
        "self-confidence (quality: the probability given to the given label; lower is more likely wrong)",
        "issues": entries,
    }
    files = {run.label_issues_json: json_bytes(document)}
    shown = entries[:count]
    if shown:
        captions = [
            f"#{e['index']} given: {e['given']}\nsuggested: {e['suggested']} ({e['confidence']:.0%})"
            for e in shown
        ]
        files[run.label_issues_png] = figures.image_grid(
            loaded.test_display(issues.indices[:count]),
            captions,
            f"run {run.name}: the {len(shown)} likely label errors ranked first of {len(entries)} found "
            f"in {len(labels)} test images ({checkpoint} checkpoint, epoch {loaded.info.epoch})",
        )
    atomic_write_files(files)
    if shown:
        tensorboard.log_gallery(run, "label_issues", files[run.label_issues_png], loaded.info.epoch)
    else:  # a gallery left by an earlier checkpoint would contradict the JSON
        run.label_issues_png.unlink(missing_ok=True)
    return entries
