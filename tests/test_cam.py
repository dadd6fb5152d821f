import pytest
import torch
from torch import nn

from cifarcam.cam import CamExtractor, grad_cam, normalize_maps
from cifarcam.errors import UsageError
from cifarcam.models import build_model


class TinyNet(nn.Module):
    """conv(1->2, 1x1) -> global average pool -> linear; Grad-CAM can be worked out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.linear = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.linear.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).mean(dim=(2, 3)))


def test_grad_cam_by_hand_on_a_tiny_net() -> None:
    # Input 2x2 [[1, 2], [3, 4]]: A0 = x, A1 = -x. dy0/dA_k = w0k / 4 at every pixel, so the
    # channel weights are (2/4, 1/4) and the map is 0.5 x - 0.25 x = 0.25 x: 0.25, 0.5, 0.75, 1.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    model = TinyNet()
    with CamExtractor(model, ["conv"]) as cam:
        _, maps = cam(x, {"c0": torch.tensor([0]), "c1": torch.tensor([1])})
    assert torch.allclose(maps["c0"]["conv"][0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    # Class 1: weights (0, 3/4), map -0.75 x < 0 everywhere: ReLU leaves zero, which stays zero.
    assert torch.equal(maps["c1"]["conv"][0], torch.zeros(2, 2))
    raw = grad_cam(
        x.repeat(1, 2, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1),
        torch.tensor([0.5, 0.25]).view(1, 2, 1, 1).expand(1, 2, 2, 2),
    )
    assert torch.allclose(raw, 0.25 * x[:, 0])


def test_maps_are_upsampled_and_scaled_per_image() -> None:
    maps = normalize_maps(torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]]), (32, 32))
    assert maps.shape == (2, 32, 32)
    assert maps[0].min() == 0 and maps[0].max() == 1
    assert torch.equal(maps[1], torch.zeros(32, 32))  # a flat map carries no location: zero, not NaN


def test_hooks_grads_and_mode_are_left_as_found() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 8).train()
    x = torch.randn(3, 3, 32, 32)
    for _ in range(3):
        with CamExtractor(model, ["layer3", "layer4.1.conv2"]) as cam:
            _, maps = cam(x, {"pred": torch.tensor([0, 1, 2])})
            assert not model.training
        assert maps["pred"]["layer3"].shape == (3, 32, 32)
        assert maps["pred"]["layer4.1.conv2"].min() >= 0 and maps["pred"]["layer4.1.conv2"].max() <= 1
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_unknown_layer_and_method() -> None:
    model = build_model("resnet18", 8)
    with pytest.raises(UsageError, match="unknown layer 'layer9'"):
        CamExtractor(model, ["layer9"])
    with pytest.raises(UsageError, match="unknown CAM method 'magic'"):
        CamExtractor(model, ["layer4"], method="magic")
