"""The published ResNet-18 baseline as benchmarks/recipe_vs_baseline.py writes it: its schedule
at known steps, and its augmentation (shapes, labels, the cutout square, seeded draws)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import recipe_vs_baseline as baseline

from cifarcam.data.datasets import Split


@pytest.mark.parametrize(
    ("step", "factor"), [(0, 0.2), (100, 0.6), (200, 1.0), (600, 0.5), (999, 0.00125), (1000, 0.0)]
)
def test_the_schedule_rises_from_a_fifth_to_the_peak_at_20_percent_then_falls_to_zero(
    step: int, factor: float
) -> None:
    assert baseline.triangle(1000)(step) == pytest.approx(factor)


def test_cutout_zeroes_one_12x12_square_wholly_inside_each_image() -> None:
    ones = torch.ones(64, 3, 32, 32)
    out = baseline.cutout_inside(ones, 12, torch.Generator().manual_seed(0))
    zeros = out == 0
    assert zeros.sum(dim=(1, 2, 3)).tolist() == [3 * 144] * 64
    for mask in zeros[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert rows.max() - rows.min() == 11 and cols.max() - cols.min() == 11
    assert (zeros[:, 0, 0].any(1) | zeros[:, 0, -1].any(1)).any()  # squares reach the edges too


def test_batches_keep_their_shape_and_labels_and_repeat_under_a_seed() -> None:
    images = torch.randint(0, 256, (1200, 3, 32, 32), dtype=torch.uint8)
    train = Split(images, torch.arange(1200) % 10)
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(1))

    def draw(seed: int) -> list[baseline.Batch]:
        return list(baseline.baseline_batches(train, order, torch.Generator().manual_seed(seed)))

    first, again, other = draw(0), draw(0), draw(1)
    assert [len(batch.labels) for batch in first] == [500, 500, 200]
    assert all(batch.images.shape == (len(batch.labels), 3, 32, 32) for batch in first)
    assert torch.equal(torch.cat([batch.labels for batch in first]), train.labels[order])
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0].images, other[0].images)
