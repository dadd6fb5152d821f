"""The sanity check's parts: block order, seeded re-initialisation, Spearman, SSIM, the cascade."""

from __future__ import annotations

import pytest
import torch

from cifarcam.explain.extractor import CamExtractor
from cifarcam.explain.sanity import (
    cascading_randomization,
    randomization_blocks,
    reinitialize,
    similarity_table,
    spearman,
    ssim,
)
from cifarcam.models.resnet import build_model


def test_blocks_run_from_the_head_down() -> None:
    blocks = randomization_blocks(build_model("resnet18", 4))
    assert blocks == [
        "linear",
        "layer4.1",
        "layer4.0",
        "layer3.1",
        "layer3.0",
        "layer2.1",
        "layer2.0",
        "layer1.1",
        "layer1.0",
        "bn1",
        "conv1",
    ]


def test_reinitialize_is_seeded_and_touches_only_the_block() -> None:
    first, second = build_model("resnet18", 4), build_model("resnet18", 4)
    second.load_state_dict(first.state_dict())
    first.layer4[1].bn1.running_mean.fill_(3.0)
    reinitialize(first.layer4[1], seed=7)
    reinitialize(second.layer4[1], seed=7)
    assert torch.equal(first.layer4[1].conv1.weight, second.layer4[1].conv1.weight)
    assert torch.equal(first.layer4[1].bn1.running_mean, torch.zeros(32))
    assert torch.equal(first.layer3[0].conv1.weight, second.layer3[0].conv1.weight)
    before = second.layer4[1].conv2.weight.clone()
    reinitialize(second.layer4[1], seed=8)
    assert not torch.equal(before, second.layer4[1].conv2.weight)


def test_spearman_by_hand_with_ties() -> None:
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert spearman(a, a).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    # Ranks of [0, 0, 1, 2] are [1.5, 1.5, 3, 4]; against [1, 2, 3, 4]: r = 0.9486833 (Pearson of ranks).
    tied = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    assert spearman(a, tied).item() == pytest.approx(0.9486833, abs=1e-6)
    assert spearman(a, torch.zeros(1, 2, 2)).item() == 0.0  # a flat map: no ranking, counted as 0
    assert spearman(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == 1.0


def test_ssim_of_identical_and_unrelated_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=generator)
    b = torch.rand(3, 32, 32, generator=generator)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)
    assert ssim(a, b).abs().max() < 0.2
    assert ssim(a, 1 - a).max() < 0


def test_the_cascade_leaves_the_model_alone_and_decorrelates_grad_cam() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 8).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 32, 32)
    classes = torch.arange(8)

    def maps(candidate: torch.nn.Module) -> torch.Tensor:
        with CamExtractor(candidate, ["layer3"]) as cam:
            return cam(x, {"t": classes}).maps["t"]["gradcam"]["layer3"]

    steps, results = cascading_randomization(model, maps, seed=0)
    assert steps[0] == "none" and steps[1:] == randomization_blocks(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    table = similarity_table(steps, results)
    assert table[0]["spearman"] == pytest.approx(1.0) and table[0]["ssim"] == pytest.approx(1.0)
    # Once layer3 itself is re-initialised the maps have nothing left in common with the first ones.
    assert table[steps.index("layer3.0")]["spearman"] < 0.5
    again = similarity_table(*cascading_randomization(model, maps, seed=0))
    assert again == table
