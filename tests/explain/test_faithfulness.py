"""Deletion/insertion and confidence change on constructed models whose answers are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarcam.explain.faithfulness import (
    confidence_change,
    deletion_insertion,
    faithfulness,
    gaussian_blur,
    random_maps,
)


class MeanProbability(nn.Module):
    """Two classes with p(class 0) = mean of channel 0 over the image (inputs in [0, 1])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = x[:, 0].flatten(1).mean(dim=1).clamp(1e-12, 1 - 1e-12)
        return torch.stack([share.log(), (1 - share).log()], dim=1)


def region_image() -> tuple[torch.Tensor, torch.Tensor]:
    """An 8x8 image that is 1 in its top 2 rows (a quarter of the pixels) and 0 elsewhere."""
    x = torch.zeros(1, 3, 8, 8)
    x[:, :, :2] = 1.0
    return x, x[:, 0].clone()


def test_deletion_of_the_right_region_first_has_the_known_auc() -> None:
    x, region = region_image()
    classes = torch.tensor([0])
    perfect = deletion_insertion(MeanProbability(), x, region, classes, steps=16, blur_sigma=0)
    # Removing the quarter that holds all the evidence first: 0.25 -> 0 over the first quarter.
    assert perfect["deletion_auc"].item() == pytest.approx(0.25 * 0.25 / 2, abs=1e-6)
    assert perfect["deletion_curve"][0, 0].item() == pytest.approx(0.25, abs=1e-6)
    assert perfect["deletion_curve"][0, 4:].abs().max().item() < 1e-6
    # The worst order, the region last: p stays 0.25 for three quarters, then falls to 0.
    inverse = deletion_insertion(MeanProbability(), x, 1 - region, classes, steps=16, blur_sigma=0)
    assert inverse["deletion_auc"].item() == pytest.approx(0.75 * 0.25 + 0.25 * 0.25 / 2, abs=1e-6)


def test_insertion_puts_the_salient_pixels_back_over_the_blurred_image() -> None:
    x, region = region_image()
    classes = torch.tensor([0])
    curves = deletion_insertion(MeanProbability(), x, region, classes, steps=16, blur_sigma=2.0)
    blurred = gaussian_blur(x, 2.0)[0, 0]
    assert curves["insertion_curve"][0, 0].item() == pytest.approx(blurred.mean().item(), abs=1e-6)
    # After a quarter of the steps the 16 ones of the region are back; the rest is still blurred.
    expected = (16 + blurred[2:].sum().item()) / 64
    assert curves["insertion_curve"][0, 4].item() == pytest.approx(expected, abs=1e-6)
    assert curves["insertion_curve"][0, -1].item() == pytest.approx(0.25, abs=1e-6)  # the full image
    assert curves["insertion_auc"].item() > curves["deletion_auc"].item()


def test_blur_keeps_constants_and_smooths_edges() -> None:
    constant = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(constant, 3.0), constant, atol=1e-6)
    x, _ = region_image()
    blurred = gaussian_blur(x, 1.0)
    assert 0 < blurred[0, 0, 2, 0] < 1 and blurred.shape == x.shape
    assert torch.equal(gaussian_blur(x, 0), x)


def test_confidence_change_by_hand() -> None:
    x, region = region_image()
    classes = torch.tensor([0])
    # Multiplying by the region map keeps every one: no drop. A half map halves p: 50% drop.
    assert confidence_change(MeanProbability(), x, region, classes) == {
        "average_drop": pytest.approx(0.0, abs=1e-4),
        "increase_in_confidence": 0.0,
    }
    half = confidence_change(MeanProbability(), x, torch.full_like(region, 0.5), classes)
    assert half["average_drop"] == pytest.approx(50.0, abs=1e-3)


def test_a_good_map_beats_random_on_a_learnable_model() -> None:
    x, region = region_image()
    x = x.repeat(4, 1, 1, 1)
    maps = region.repeat(4, 1, 1)
    classes = torch.zeros(4, dtype=torch.long)
    good = faithfulness(MeanProbability(), x, maps, classes, steps=8)
    noise = faithfulness(MeanProbability(), x, random_maps(4, 8, 8, seed=1), classes, steps=8)
    assert good["deletion_auc"] < noise["deletion_auc"]
    assert good["average_drop"] < noise["average_drop"]
    assert torch.equal(random_maps(4, 8, 8, seed=1), random_maps(4, 8, 8, seed=1))
