"""Inference over a whole split: logits averaged over test-time augmentation views, and the
per-sample mean loss and accuracy computed from them."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cifarcam.data.datasets import normalize
from cifarcam.devices import autocast, cudnn_autotune, memory_format
from cifarcam.models.folding import scoring_model

Tta = Literal["none", "flip", "flip-translate"]


def _tta_views(x: torch.Tensor, tta: Tta) -> list[torch.Tensor]:
    views = [x]
    if tta in ("flip", "flip-translate"):
        views.append(x.flip(3))
    if tta == "flip-translate":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[2:]
        for shifted in (padded[:, :, :height, :width], padded[:, :, 2:, 2:]):
            views.extend([shifted, shifted.flip(3)])
    return views


def inference_batch_size(device: torch.device) -> int:
    """Images per forward pass when only predicting: 1024 on a GPU, 128 on a CPU, where they stay in
    cache (bf16 ResNet18 ran 2.2x (width 16) and 1.2x (width 64) faster at 128 than at 1024 on
    2 cores; benchmarks/inference_batch.py)."""
    return 128 if device.type == "cpu" else 1024


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    tta: Tta = "none",
    channels_last: bool = True,
    fold: bool = True,
    plain_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits (N, classes) for uint8 images (N, 3, H, W), averaged over the TTA views.

    `batch_size` None: `inference_batch_size`. With `fold`, a BatchNorm ResNet runs as a folded
    copy (`models.scoring_model`): the same logits up to rounding, sooner. `plain_logits`: the
    logits of the images as they are, already computed, standing in for the first TTA view."""
    batch_size = batch_size or inference_batch_size(images.device)
    was_training = model.training
    model.eval()
    layout = memory_format(channels_last)
    outputs = []
    try:
        runner = scoring_model(model, layout) if fold else model
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size], mean, std)
            views = _tta_views(x, tta)
            known = []
            if plain_logits is not None:  # the first view is the images as they are
                known = [plain_logits[start : start + batch_size].to(images.device, torch.float32)]
                views = views[1:]
            with autocast(images.device, amp_dtype), cudnn_autotune(x.shape[0] == batch_size):
                logits = known + [runner(v.contiguous(memory_format=layout)).float() for v in views]
            outputs.append(torch.stack(logits).mean(0))
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def score_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [summed cross-entropy, correct predictions, count]: what ranks add up to score a split."""
    if len(labels) == 0:
        return torch.zeros(3, dtype=torch.float64, device=labels.device)
    loss = F.cross_entropy(logits.double(), labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum().double()
    return torch.stack([loss, correct, torch.tensor(float(len(labels)), device=logits.device).double()])


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-sample mean cross-entropy and accuracy of logits against labels."""
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return {"loss": loss, "acc": accuracy}
