"""Training augmentation as batched tensor ops on the training device: flip, translate, cutout.
Each op draws from a seeded generator for a whole (global) batch and keeps the `rows` a process
holds, so a seeded run is reproducible and a batch split over processes is augmented as unsplit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarcam.config import AugmentConfig

ALL_ROWS = slice(None)  # the `rows` of a batch that is not split over processes


def random_flip(
    x: torch.Tensor, generator: torch.Generator, rows: slice = ALL_ROWS, batch: int | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(batch or len(x), generator=generator, device=x.device)[rows] < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(
    x: torch.Tensor, pad: int, generator: torch.Generator, rows: slice = ALL_ROWS, batch: int | None = None
) -> torch.Tensor:
    """Shift each image by up to `pad` pixels each way (a random crop of the reflect-padded image)."""
    if pad == 0:
        return x
    count, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)
    offsets = torch.randint(0, 2 * pad + 1, (2, batch or count), generator=generator, device=x.device)
    offsets = offsets[:, rows]
    ys = offsets[0].view(-1, 1, 1) + torch.arange(height, device=x.device).view(1, -1, 1)
    xs = offsets[1].view(-1, 1, 1) + torch.arange(width, device=x.device).view(1, 1, -1)
    items = torch.arange(count, device=x.device).view(-1, 1, 1)
    # (B, H, W, C) gathered, permuted back to (B, C, H, W) in channels_last memory order.
    return padded[items, ys, xs].permute(0, 3, 1, 2)


def cutout(
    x: torch.Tensor, size: int, generator: torch.Generator, rows: slice = ALL_ROWS, batch: int | None = None
) -> torch.Tensor:
    """Zero one size x size square per image, centred uniformly (it may be clipped at the edge)."""
    if size == 0:
        return x
    height, width = x.shape[2:]
    centres = torch.rand(2, batch or len(x), generator=generator, device=x.device)[:, rows]
    top = (centres[0] * height).long() - size // 2
    left = (centres[1] * width).long() - size // 2
    ys = torch.arange(height, device=x.device).view(1, -1, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, -1)
    top, left = top.view(-1, 1, 1), left.view(-1, 1, 1)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def augment_batch(
    x: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    rows: slice = ALL_ROWS,
    batch: int | None = None,
) -> torch.Tensor:
    """Apply the configured ops to a normalised float batch (N, C, H, W): the whole batch, or
    `rows` of a global batch of `batch` images (the draws are those of the whole batch)."""
    if config.flip:
        x = random_flip(x, generator, rows, batch)
    x = random_translate(x, config.translate, generator, rows, batch)
    return cutout(x, config.cutout, generator, rows, batch)
