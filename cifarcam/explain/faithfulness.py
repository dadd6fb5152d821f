"""How faithful a saliency map is to the model: deletion and insertion AUC (Petsiuk et al. 2018)
and average drop / increase in confidence (Chattopadhay et al. 2018), all on the softmax
probability of the target class. Inputs are normalised, so a removed pixel is 0, the mean colour;
insertion starts from a blurred copy. Map ties break by pixel index; AUCs are trapezoidal in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel with reflected borders; sigma 0 returns x unchanged."""
    if sigma <= 0:
        return x
    radius = min(int(3 * sigma + 0.5), x.shape[-1] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), vertical, groups=channels)


def _probabilities(model: Model, x: torch.Tensor, classes: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        chunks = [
            torch.softmax(model(part).float(), dim=1).gather(1, part_classes.view(-1, 1)).squeeze(1)
            for part, part_classes in zip(x.split(batch_size), classes.split(batch_size), strict=True)
        ]
    return torch.cat(chunks)


def _trapezoid(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves sampled at evenly spaced fractions 0..1: (N, S+1) -> (N,)."""
    steps = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(dim=1) / (2 * steps)


def deletion_insertion(
    model: Model,
    x: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    steps: int = 16,
    blur_sigma: float = 4.0,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per-image deletion and insertion curves (N, steps+1) and their AUCs (N,), for `x`
    (N, C, H, W) normalised inputs, `maps` (N, H, W) and target `classes` (N,)."""
    count, _, height, width = x.shape
    pixels = height * width
    order = torch.sort(-maps.reshape(count, pixels).float(), dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(count, -1))
    blurred = gaussian_blur(x, blur_sigma)
    deletion, insertion = [], []
    for step in range(steps + 1):
        changed = round(step * pixels / steps)
        mask = (rank < changed).view(count, 1, height, width).to(x.dtype)
        deletion.append(_probabilities(model, x * (1 - mask), classes, batch_size))
        insertion.append(_probabilities(model, blurred * (1 - mask) + x * mask, classes, batch_size))
    deletion_curves = torch.stack(deletion, dim=1)
    insertion_curves = torch.stack(insertion, dim=1)
    return {
        "deletion_curve": deletion_curves,
        "insertion_curve": insertion_curves,
        "deletion_auc": _trapezoid(deletion_curves),
        "insertion_auc": _trapezoid(insertion_curves),
    }


def confidence_change(
    model: Model, x: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Average drop (%) and increase in confidence (% of images) when the input is multiplied by its map."""
    full = _probabilities(model, x, classes, batch_size)
    explained = _probabilities(model, x * maps.unsqueeze(1).to(x.dtype), classes, batch_size)
    drop = (full - explained).clamp_min(0) / full.clamp_min(1e-12)
    return {
        "average_drop": float(drop.mean() * 100),
        "increase_in_confidence": float((explained > full).float().mean() * 100),
    }


def random_maps(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """The baseline: uniform noise maps, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, height, width, generator=generator)


def faithfulness(
    model: Model,
    x: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    steps: int = 16,
    batch_size: int = 256,
) -> dict[str, float]:
    """The four scores averaged over images; deletion AUC and average drop: lower is better."""
    curves = deletion_insertion(model, x, maps, classes, steps=steps, batch_size=batch_size)
    return {
        "deletion_auc": float(curves["deletion_auc"].mean()),
        "insertion_auc": float(curves["insertion_auc"].mean()),
        **confidence_change(model, x, maps, classes, batch_size),
    }
