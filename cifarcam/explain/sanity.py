"""Cascading model-parameter randomisation (Adebayo et al. 2018): blocks re-initialised from the
head down; maps that depend on what the model learned decorrelate (Spearman, SSIM) from the trained
model's as randomisation goes deeper."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

MapFunction = Callable[[nn.Module], torch.Tensor]  # model -> (N, H, W) maps in [0, 1]


def randomization_blocks(model: nn.Module) -> list[str]:
    """Module names to randomise, from the head down: the top-level modules with parameters,
    with Sequential stages split into their blocks (ResNet18: linear, layer4.1, ..., conv1)."""
    blocks: list[str] = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, nn.Sequential):
            blocks.extend(f"{name}.{sub}" for sub, _ in child.named_children())
        else:
            blocks.append(name)
    return blocks[::-1]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Every sub-module's own `reset_parameters` (conv, linear, BatchNorm incl. running stats), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank."""
    order = torch.sort(values, stable=True)
    _, counts = torch.unique_consecutive(order.values, return_counts=True)
    ends = counts.cumsum(0).double()
    averages = ends - (counts.double() - 1) / 2
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order.indices] = averages.repeat_interleave(counts)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per pair of maps (N, H, W) -> (N,). A flat map has no ranking:
    two flat maps count as 1 (the same non-answer), one flat map as 0."""
    results = []
    for first, second in zip(a.flatten(1), b.flatten(1), strict=True):
        ra, rb = _average_ranks(first.double()), _average_ranks(second.double())
        ra, rb = ra - ra.mean(), rb - rb.mean()
        spread_a, spread_b = ra.pow(2).sum(), rb.pow(2).sum()
        if spread_a > 0 and spread_b > 0:
            results.append(ra.mul(rb).sum() / (spread_a * spread_b).sqrt())
        else:
            both_flat = spread_a == 0 and spread_b == 0
            results.append(torch.tensor(1.0 if both_flat else 0.0, dtype=torch.float64))
    return torch.stack(results).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per pair of [0, 1] maps (N, H, W) -> (N,): Gaussian
    window, constants (0.01)^2 and (0.03)^2 for data range 1, mean over valid positions."""
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    kernel_1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(kernel_1d, kernel_1d)
    kernel = (kernel / kernel.sum()).view(1, 1, window, window)
    x, y = a.double().unsqueeze(1), b.double().unsqueeze(1)
    local_mean = partial(F.conv2d, weight=kernel)
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    covariance = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.flatten(1).mean(dim=1).float()


def cascading_randomization(
    model: nn.Module, compute_maps: MapFunction, seed: int = 0
) -> tuple[list[str], list[torch.Tensor]]:
    """Steps ('none', then each block randomised in a copy of `model`) and the maps at each step."""
    steps, maps = ["none"], [compute_maps(model)]
    randomized = copy.deepcopy(model)
    modules = dict(randomized.named_modules())
    for position, block in enumerate(randomization_blocks(randomized)):
        reinitialize(modules[block], seed + position)
        steps.append(block)
        maps.append(compute_maps(randomized))
    return steps, maps


def similarity_table(steps: list[str], maps: list[torch.Tensor]) -> list[dict[str, float | str]]:
    """Per step: mean and standard deviation over images of Spearman and SSIM against step 0."""
    rows: list[dict[str, float | str]] = []
    for step, step_maps in zip(steps, maps, strict=True):
        rank_correlation = spearman(maps[0], step_maps)
        structural = ssim(maps[0], step_maps)
        rows.append(
            {
                "randomized": step,
                "spearman": float(rank_correlation.mean()),
                "spearman_std": float(rank_correlation.std(unbiased=False)),
                "ssim": float(structural.mean()),
                "ssim_std": float(structural.std(unbiased=False)),
            }
        )
    return rows
