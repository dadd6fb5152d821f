"""Training augmentation as batched tensor ops on the training device (flip, translate, cutout).

Every op draws from an explicit torch.Generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarcam.config import AugmentConfig


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `pad` pixels each way (a random crop of the reflect-padded image)."""
    if pad == 0:
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=x.device)
    rows = offsets[0].view(-1, 1, 1) + torch.arange(height, device=x.device).view(1, -1, 1)
    cols = offsets[1].view(-1, 1, 1) + torch.arange(width, device=x.device).view(1, 1, -1)
    items = torch.arange(batch, device=x.device).view(-1, 1, 1)
    # (B, H, W, C) gathered, permuted back to (B, C, H, W) in channels_last memory order.
    return padded[items, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred uniformly (it may be clipped at the edge)."""
    if size == 0:
        return x
    batch, _, height, width = x.shape
    centres = torch.rand(2, batch, generator=generator, device=x.device)
    top = (centres[0] * height).long() - size // 2
    left = (centres[1] * width).long() - size // 2
    ys = torch.arange(height, device=x.device).view(1, -1, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, -1)
    top, left = top.view(-1, 1, 1), left.view(-1, 1, 1)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def augment_batch(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Apply the configured ops to a normalised float batch (N, C, H, W)."""
    if config.flip:
        x = random_flip(x, generator)
    x = random_translate(x, config.translate, generator)
    return cutout(x, config.cutout, generator)
