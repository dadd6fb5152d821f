"""MODEL_CARD.md: what a user of an exported model needs to know, from the run's own records:
data, configuration, training time and hardware, test accuracy with and without TTA,
per-class accuracy, a Grad-CAM gallery and the sanity check when the run has them, and how to
load the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cifarcam.export.onnx_model import INPUT, OUTPUT, Agreement
from cifarcam.runs.formats import CheckpointInfo


@dataclass
class CardFacts:
    """The run's records a card is written from; None where the command making them has not run."""

    run: str
    checkpoint: str
    info: CheckpointInfo
    config: dict[str, Any]
    meta: dict[str, Any]
    epochs: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    gallery: str | None  # file name of the Grad-CAM gallery beside the card
    sanity: dict[str, Any] | None
    agreement: Agreement


def _percent(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2%}"


def _training(facts: CardFacts) -> list[str]:
    meta, config = facts.meta, facts.config
    seconds = sum(epoch.get("epoch_time_s", 0.0) for epoch in facts.epochs)
    return [
        f"- Data: `{meta.get('data', config.get('data'))}`, {meta.get('train_images', '?')} training and "
        f"{meta.get('test_images', '?')} test images, {len(facts.info.classes)} classes: "
        + ", ".join(facts.info.classes),
        f"- Model: {facts.info.model} at width {facts.info.width} ({facts.info.norm} normalisation)",
        f"- Recipe: {config.get('epochs')} epochs, batch size {config.get('batch_size')}, peak lr "
        f"{config.get('lr')}, label smoothing {config.get('label_smoothing')}, seed {config.get('seed')}"
        " (every field: the run's config.json)",
        f"- Training: {seconds:.0f} s of epochs on {meta.get('device_name', '?')} "
        f"({meta.get('device', '?')}, {meta.get('precision', '?')}), torch {meta.get('torch_version', '?')}, "
        f"cifarcam {meta.get('cifarcam_version', '?')}",
    ]


def _accuracy(facts: CardFacts) -> list[str]:
    evaluation = facts.evaluation
    last = facts.epochs[-1]
    if evaluation is None:
        lines = [
            f"- Test accuracy: {_percent(last.get('test_acc'))} (the last epoch's), with TTA: not "
            f"measured (`cifarcam evaluate --run {facts.run}` measures it)"
        ]
    else:
        lines = [
            f"- Test accuracy: {_percent(evaluation['accuracy'])}, with TTA (six views: the image and its "
            f"mirror, each as is and shifted one pixel diagonally either way): "
            f"{_percent(evaluation.get('accuracy_tta'))}, on {evaluation['num_images']} test images",
            "",
            "| class | accuracy |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_percent(a)} |" for name, a in evaluation["per_class_accuracy"].items()]
    agreement = facts.agreement
    lines += [
        "",
        f"The ONNX model was checked against PyTorch on {agreement.images} test images: largest logit "
        f"difference {agreement.max_difference:.2g}, the same top-1 class for "
        f"{agreement.top1_agreement:.2%} of them.",
    ]
    return lines


def _explanations(facts: CardFacts) -> list[str]:
    lines = []
    if facts.gallery:
        lines += [f"![Grad-CAM of the most confident mistakes]({facts.gallery})", ""]
    if facts.sanity:
        method, layer = facts.sanity["method"], facts.sanity["layer"]
        where = f"{method} at {layer}" if layer else method
        lines += [
            f"Cascading randomisation sanity check of {where} ({facts.sanity['images']} test images): "
            "similarity of the maps to the trained model's as the model is re-initialised from the "
            "head down.",
            "",
            "| randomised down to | Spearman | SSIM |",
            "|---|---|---|",
        ]
        for step in facts.sanity["steps"]:
            lines.append(f"| {step['randomized']} | {step['spearman']:.3f} | {step['ssim']:.3f} |")
    if not lines:
        lines = [f"None yet: `cifarcam gradcam --run {facts.run}` and `cifarcam sanity --run {facts.run}`."]
    return lines


def model_card(facts: CardFacts) -> str:
    info = facts.info
    mean, std = list(info.mean), list(info.std)
    usage = f"""```python
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession("model.onnx")
mean = np.array({mean}, dtype=np.float32).reshape(1, 3, 1, 1)
std = np.array({std}, dtype=np.float32).reshape(1, 3, 1, 1)
images = ...  # uint8 RGB, shape (N, 32, 32, 3)
x = (images.transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std
logits = session.run(["{OUTPUT}"], {{"{INPUT}": x}})[0]
classes = {info.classes}
print([classes[i] for i in logits.argmax(1)])
```"""
    sections = [
        f"# Model card: run {facts.run}",
        "",
        f"A CIFAR {info.model} trained by cifarcam: the {facts.checkpoint} checkpoint (epoch {info.epoch}), "
        "exported as `model.onnx`.",
        "",
        "## Training",
        "",
        *_training(facts),
        "",
        "## Accuracy",
        "",
        *_accuracy(facts),
        "",
        "## Explanations",
        "",
        *_explanations(facts),
        "",
        "## Using the model",
        "",
        f"Input `{INPUT}`: float32 (N, 3, 32, 32), RGB scaled to [0, 1], minus the mean and divided by "
        f"the standard deviation per channel (mean {mean}, std {std}; also in the ONNX file's metadata). "
        f"Output `{OUTPUT}`: (N, {len(info.classes)}) logits; softmax gives probabilities.",
        "",
        usage,
        "",
    ]
    return "\n".join(sections)
