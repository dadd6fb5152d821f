"""Every CAM method against pytorch-grad-cam (the `grad-cam` package, a test-only dependency).

pytorch-grad-cam min-max scales a map before resizing it; cifarcam resizes first. Both
operations are affine-equivariant, so min-max scaling the reference output once more puts it
under cifarcam's conventions, and the two must then agree within 1e-4.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedBackpropReLUModel,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

from cifarcam.explain.extractor import CamExtractor, guided_backprop, guided_grad_cam, normalize_maps
from cifarcam.models.resnet import build_model

REFERENCE = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def seeded() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded ResNet18 (width 16) whose BatchNorm statistics come from a few batches, 6 inputs."""
    torch.manual_seed(0)
    model = build_model("resnet18", width=16)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32))
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    classes = torch.tensor([0, 3, 5, 9, 1, 7])
    return model, x, classes


def rescale(maps: np.ndarray) -> torch.Tensor:
    """Min-max per map, flat maps zero: cifarcam's last step applied to a reference output."""
    return normalize_maps(torch.from_numpy(maps).float(), (maps.shape[1], maps.shape[2]))


def reference_maps(
    method: str, model: nn.Module, layer: str, x: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    reference_model = copy.deepcopy(model)  # pytorch-grad-cam writes .grad into the parameters
    module = dict(reference_model.named_modules())[layer]
    with REFERENCE[method](model=reference_model, target_layers=[module]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    return rescale(out)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("layer", ["layer4", "layer3"])
@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_method_matches_pytorch_grad_cam(seeded, method: str, layer: str, fast: bool) -> None:
    """Also with fast=True: at layer4, BatchNorm folded into the convolutions below the layer and
    channels_last; at layer3 (ReLUs above it) fast=True takes the plain path."""
    model, x, classes = seeded
    with CamExtractor(model, [layer], [method], fast=fast) as cam:
        ours = cam(x, {"target": classes}).maps["target"][method][layer]
    expected = reference_maps(method, model, layer, x, classes)
    assert ours.shape == expected.shape == (6, 32, 32)
    assert (ours - expected).abs().max().item() < TOLERANCE
    assert ours.amax(dim=(1, 2)).gt(0).any()  # not a comparison of blank maps


def test_eigen_cam_matches_up_to_the_documented_sign(seeded) -> None:
    model, x, classes = seeded
    layer = "layer4"
    with CamExtractor(model, [layer], ["eigencam"]) as cam:
        ours = cam(x, {"target": classes}).maps["target"]["eigencam"][layer]
    activations: dict[str, torch.Tensor] = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: activations.update(a=out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    acts = activations["a"]
    projection = torch.from_numpy(get_2d_projection(acts.numpy().copy()))
    total = acts.sum(dim=1)
    agreement = (projection * (total - total.mean(dim=(1, 2), keepdim=True))).sum(dim=(1, 2))
    sign = torch.where(agreement < 0, -1.0, 1.0).view(-1, 1, 1)
    expected = normalize_maps(projection * sign, (32, 32))
    assert (ours - expected).abs().max().item() < TOLERANCE
    # Where the reference's SVD sign already agrees, the whole reference pipeline matches as it is.
    reference_model = copy.deepcopy(model)
    with EigenCAM(model=reference_model, target_layers=[reference_model.layer4]) as cam:
        library = rescale(cam(input_tensor=x, targets=None))
    same_sign = [i for i in range(len(x)) if (library[i] - expected[i]).abs().max() < TOLERANCE]
    flipped = [i for i in range(len(x)) if i not in same_sign]
    assert all(sign[i] < 0 for i in flipped)
    for i in flipped:
        assert (
            library[i] - normalize_maps(-projection[i : i + 1] * sign[i], (32, 32))[0]
        ).abs().max() < TOLERANCE


def test_guided_backprop_and_guided_grad_cam_match(seeded) -> None:
    model, x, classes = seeded
    ours = guided_backprop(model, x, classes)
    reference_model = copy.deepcopy(model)
    guided_reference = GuidedBackpropReLUModel(model=reference_model, device=torch.device("cpu"))
    expected = torch.stack(
        [
            torch.from_numpy(guided_reference(x[i : i + 1].clone(), target_category=int(c))).permute(2, 0, 1)
            for i, c in enumerate(classes)
        ]
    )
    assert expected.abs().max() > 0
    assert (ours - expected).abs().max().item() < TOLERANCE
    with CamExtractor(model, ["layer4"]) as cam:
        maps = cam(x, {"target": classes}).maps["target"]["gradcam"]["layer4"]
    reference_maps_ = reference_maps("gradcam", model, "layer4", x, classes)
    combined = guided_grad_cam(ours, maps)
    assert (combined - expected * reference_maps_.unsqueeze(1)).abs().max().item() < TOLERANCE
    assert all(p.grad is None for p in model.parameters())
