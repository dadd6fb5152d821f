"""CAM methods: each a function from a layer's `Evidence` to one map per image at the layer's
resolution, before ReLU; the extractor's `normalize_maps` applies the shared conventions."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarcam.errors import UsageError


@dataclass(frozen=True)
class Evidence:
    """What a CAM method may use for one layer and one set of target classes."""

    activations: torch.Tensor  # (N, K, h, w), the layer's output
    gradients: torch.Tensor | None  # d(sum of target logits)/d(activations); None for gradient-free methods
    classes: torch.Tensor  # (N,) target class per image
    input_size: tuple[int, int]
    masked_logits: Callable[[torch.Tensor], torch.Tensor]  # (N, K, H, W) masks -> (N, K, C) logits


CamMethod = Callable[[Evidence], torch.Tensor]


def _channel_weighted(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return (weights[:, :, None, None] * activations).sum(dim=1)


def _gradients(evidence: Evidence) -> torch.Tensor:
    if evidence.gradients is None:
        raise ValueError("this CAM method needs gradients")
    return evidence.gradients


def grad_cam(evidence: Evidence) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient."""
    return _channel_weighted(_gradients(evidence).mean(dim=(2, 3)), evidence.activations)


def grad_cam_plus_plus(evidence: Evidence) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), with the exponential-score closed form for alpha."""
    grads, activations = _gradients(evidence), evidence.activations
    grads_2 = grads * grads
    spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
    alpha = grads_2 / (2 * grads_2 + spatial_sum * grads_2 * grads + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return _channel_weighted((grads.clamp_min(0) * alpha).sum(dim=(2, 3)), activations)


def xgrad_cam(evidence: Evidence) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): gradients weighted by activations normalised per channel."""
    grads, activations = _gradients(evidence), evidence.activations
    spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
    return _channel_weighted((grads * activations / (spatial_sum + 1e-7)).sum(dim=(2, 3)), activations)


def layer_cam(evidence: Evidence) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): every location weighted by its own positive gradient."""
    return (_gradients(evidence).clamp_min(0) * evidence.activations).sum(dim=1)


def hires_cam(evidence: Evidence) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient times activation, summed over channels."""
    return (_gradients(evidence) * evidence.activations).sum(dim=1)


def eigen_cam(evidence: Evidence) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): projection on the first principal component, with the
    (arbitrary) SVD sign that correlates positively with the channel-summed activation."""
    activations = evidence.activations
    count, _, height, width = activations.shape
    positions = activations.flatten(2).transpose(1, 2)  # (N, h*w, K)
    centred = positions - positions.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None]).squeeze(2)  # (N, h*w)
    total = positions.sum(dim=2)
    agreement = (projection * (total - total.mean(dim=1, keepdim=True))).sum(dim=1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection.dtype)
    return (projection * sign[:, None]).view(count, height, width)


def score_cam(evidence: Evidence) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020): channels weighted by the softmax of the target logit the
    model gives the input masked by each upsampled (align_corners=True, as the reference
    implementation does), min-max-scaled channel."""
    activations = evidence.activations
    masks = F.interpolate(activations, size=evidence.input_size, mode="bilinear", align_corners=True)
    low = masks.amin(dim=(2, 3), keepdim=True)
    high = masks.amax(dim=(2, 3), keepdim=True)
    masks = (masks - low) / (high - low + 1e-8)
    logits = evidence.masked_logits(masks)  # (N, K, C)
    index = evidence.classes.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    scores = logits.gather(2, index).squeeze(2)
    return _channel_weighted(torch.softmax(scores, dim=1), activations)


METHODS: dict[str, CamMethod] = {
    "gradcam": grad_cam,
    "gradcam++": grad_cam_plus_plus,
    "xgradcam": xgrad_cam,
    "layercam": layer_cam,
    "hirescam": hires_cam,
    "scorecam": score_cam,
    "eigencam": eigen_cam,
}
GRADIENT_FREE = frozenset({"scorecam", "eigencam"})


def check_methods(methods: list[str], choices: Collection[str] = METHODS.keys()) -> list[str]:
    """`methods` without repeats; a UsageError names the first one not in `choices`."""
    unknown = [name for name in methods if name not in choices]
    if unknown:
        raise UsageError(f"unknown CAM method '{unknown[0]}'; choose one of: {', '.join(choices)}")
    return list(dict.fromkeys(methods))
