import pytest
import torch
from torch import nn

from cifarcam.errors import UsageError
from cifarcam.explain.extractor import CamExtractor, normalize_maps
from cifarcam.explain.fast_path import CompiledBelow, split_at
from cifarcam.explain.methods import Evidence, grad_cam
from cifarcam.models.resnet import build_model


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
        maps = cam(x, {"c0": torch.tensor([0]), "c1": torch.tensor([1])}).maps
    assert torch.allclose(maps["c0"]["gradcam"]["conv"][0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    # Class 1: weights (0, 3/4), map -0.75 x < 0 everywhere: ReLU leaves zero, which stays zero.
    assert torch.equal(maps["c1"]["gradcam"]["conv"][0], torch.zeros(2, 2))
    evidence = Evidence(
        activations=x.repeat(1, 2, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1),
        gradients=torch.tensor([0.5, 0.25]).view(1, 2, 1, 1).expand(1, 2, 2, 2),
        classes=torch.tensor([0]),
        input_size=(2, 2),
        masked_logits=lambda masks: torch.zeros(1),
    )
    raw = grad_cam(evidence)
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
        with CamExtractor(model, ["layer3", "layer4.1.conv2"], ["gradcam", "scorecam"]) as cam:
            maps = cam(x, {"pred": torch.tensor([0, 1, 2])}).maps["pred"]
            assert not model.training
        assert maps["gradcam"]["layer3"].shape == maps["scorecam"]["layer3"].shape == (3, 32, 32)
        assert maps["gradcam"]["layer4.1.conv2"].min() >= 0 and maps["gradcam"]["layer4.1.conv2"].max() <= 1
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_unknown_layer_and_method() -> None:
    model = build_model("resnet18", 8)
    with pytest.raises(UsageError, match="unknown layer 'layer9'"):
        CamExtractor(model, ["layer9"])
    with pytest.raises(UsageError, match="unknown CAM method 'magic'"):
        CamExtractor(model, ["layer4"], ["magic"])


def _counting_forward(model: torch.nn.Module) -> dict[str, int]:
    calls = {"forward": 0}
    model.register_forward_pre_hook(lambda _m, _i: calls.__setitem__("forward", calls["forward"] + 1))
    return calls


def test_autograd_starts_at_the_shallowest_layer_and_matches_a_full_graph() -> None:
    torch.manual_seed(1)
    model = build_model("resnet18", 8).eval()
    x = torch.randn(4, 3, 32, 32)
    classes = torch.tensor([1, 2, 3, 4])
    seen: dict[str, bool] = {}
    model.layer2.register_forward_hook(lambda _m, _i, out: seen.__setitem__("layer2", out.requires_grad))
    calls = _counting_forward(model)
    with CamExtractor(model, ["layer4", "layer3"], ["gradcam", "layercam"]) as cam:
        fast = cam(x, {"t": classes}).maps["t"]
    assert seen["layer2"] is False  # nothing below layer3 is part of the graph
    assert calls["forward"] == 1  # both layers and both methods from one forward pass
    # The same maps when the graph starts at the input (what a full backward would differentiate).
    activations: dict[str, torch.Tensor] = {}
    hooks = [
        model.layer3.register_forward_hook(lambda _m, _i, out: activations.__setitem__("layer3", out)),
        model.layer4.register_forward_hook(lambda _m, _i, out: activations.__setitem__("layer4", out)),
    ]
    with torch.enable_grad():
        logits = model(x)
        grads = torch.autograd.grad(
            logits.gather(1, classes.view(-1, 1)).sum(), [activations["layer3"], activations["layer4"]]
        )
    for handle in hooks:
        handle.remove()
    for layer, grad in zip(["layer3", "layer4"], grads, strict=True):
        reference = normalize_maps(
            (grad.mean(dim=(2, 3), keepdim=True) * activations[layer]).sum(1).detach(), (32, 32)
        )
        assert torch.allclose(fast["gradcam"][layer], reference, atol=1e-6)


def test_layers_on_parallel_branches_fall_back_to_a_full_graph() -> None:
    torch.manual_seed(2)
    model = build_model("resnet18", 8).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = ["layer4.0.conv1", "layer4.0.shortcut"]
    with CamExtractor(model, layers) as cam:
        maps = cam(x, {"t": torch.tensor([0, 1])}).maps["t"]["gradcam"]
    assert maps["layer4.0.shortcut"].shape == maps["layer4.0.conv1"].shape == (2, 32, 32)
    assert maps["layer4.0.shortcut"].amax() > 0


def _random_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm with statistics and affine terms far from identity, so folding them matters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _maps_and_layer1_calls(
    model: nn.Module, x: torch.Tensor, layers: list[str], methods: list[str], **options: object
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    calls = []  # a hook on a leaf module: tracing does not call it, the folded copy drops it
    handle = model.layer1[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    try:
        with CamExtractor(model, layers, methods, **options) as cam:  # type: ignore[arg-type]
            maps = cam(x, {"t": torch.arange(len(x)) % 10}).maps["t"]
    finally:
        handle.remove()
    return maps, len(calls)


def test_fast_path_runs_a_folded_copy_below_the_layer_and_gives_the_same_maps() -> None:
    torch.manual_seed(3)
    model = _random_statistics(build_model("resnet18", 8))
    x = torch.randn(5, 3, 32, 32)
    methods = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorded: list[bool] = []
    model.linear.register_forward_hook(lambda _m, inputs, _o: recorded.append(inputs[0].requires_grad))
    fast, fast_calls = _maps_and_layer1_calls(model, x, ["layer4"], methods, fast=True)
    assert recorded == [True]  # the model's own head ran, inside the graph
    plain, plain_calls = _maps_and_layer1_calls(model, x, ["layer4"], methods)
    assert (fast_calls, plain_calls) == (0, 1)  # the fast path never ran the model's own layer1
    for method in methods:
        assert (fast[method]["layer4"] - plain[method]["layer4"]).abs().max().item() < 1e-5
        assert fast[method]["layer4"].amax() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


class Branching(nn.Module):
    """A forward pass with data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model("resnet18", 4)
        self.layer1 = self.inner.layer1  # what the tests hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            return self.inner(-x)
        return self.inner(x)


@pytest.mark.parametrize(
    "case", ["nonlinear above the cut", "parallel branches", "layer inside a layer", "bf16", "untraceable"]
)
def test_fast_path_falls_back_to_the_plain_one(case: str) -> None:
    torch.manual_seed(4)
    model: nn.Module = _random_statistics(build_model("resnet18", 4))
    layers, options, tolerance = ["layer4"], {"fast": True}, 1e-6
    if case == "nonlinear above the cut":
        layers = ["layer4", "layer3"]  # layer4's ReLUs lie between layer3 and the logits
    elif case == "parallel branches":
        layers = ["layer4.0.conv1", "layer4.0.shortcut"]
    elif case == "layer inside a layer":
        layers = ["layer4", "layer4.1.conv2"]
    elif case == "bf16":
        options["amp_dtype"] = torch.bfloat16
    else:
        model, layers = Branching().eval(), ["inner.layer4"]
    x = torch.randn(3, 3, 32, 32)
    fast, calls = _maps_and_layer1_calls(model, x, layers, ["gradcam"], **options)
    plain, _ = _maps_and_layer1_calls(model, x, layers, ["gradcam"], amp_dtype=options.get("amp_dtype"))
    assert calls == 1  # the model's own layers ran: no folded copy
    for layer in layers:
        assert torch.allclose(fast["gradcam"][layer], plain["gradcam"][layer], atol=tolerance)


def test_split_at_cuts_only_where_one_value_crosses() -> None:
    model = build_model("resnet18", 4).eval()
    assert split_at(model, ["linear"]) is None  # nothing above the output layer
    assert split_at(model, ["layer4.0.conv1", "layer4.0.shortcut"]) is None  # parallel branches
    assert split_at(Branching().eval(), ["inner.layer4"]) is None  # not traceable
    assert split_at(model, ["layer3"]) is None  # layer4's ReLUs lie above the cut
    split = split_at(model, ["layer4"])
    assert split is not None and split.cut == "layer4"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(split.above(split.below(x)), model(x), atol=1e-5)


def test_compiled_folded_layers_give_the_same_maps() -> None:
    torch.manual_seed(6)
    model = _random_statistics(build_model("resnet18", 4))
    split = split_at(model, ["layer4"])
    assert split is not None
    below = CompiledBelow(split.below)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for batch in (x, x.flip(0), x[:5]):  # compiled for 6 images; the 5-image batch runs as is
            assert torch.allclose(below(batch), split.below(batch), atol=1e-5)
    assert below.shape == (6, 3, 32, 32) and not below.failed
    compiled, _ = _maps_and_layer1_calls(model, x, ["layer4"], ["gradcam"], fast=True, compiled=True)
    plain, _ = _maps_and_layer1_calls(model, x, ["layer4"], ["gradcam"])
    assert (compiled["gradcam"]["layer4"] - plain["gradcam"]["layer4"]).abs().max().item() < 1e-5


def test_each_block_folds_the_weights_it_finds() -> None:
    torch.manual_seed(5)
    model = _random_statistics(build_model("resnet18", 8))
    x = torch.randn(4, 3, 32, 32)
    first, _ = _maps_and_layer1_calls(model, x, ["layer4"], ["gradcam"], fast=True)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(-1)  # changed between two blocks
    second, _ = _maps_and_layer1_calls(model, x, ["layer4"], ["gradcam"], fast=True)
    plain, _ = _maps_and_layer1_calls(model, x, ["layer4"], ["gradcam"])
    assert (second["gradcam"]["layer4"] - plain["gradcam"]["layer4"]).abs().max().item() < 1e-5
    assert (first["gradcam"]["layer4"] - second["gradcam"]["layer4"]).abs().max().item() > 1e-2


def test_no_memory_growth_over_100_uses() -> None:
    import gc
    import weakref

    torch.manual_seed(3)
    model = build_model("resnet18", 16)
    x = torch.randn(32, 3, 32, 32)
    classes = torch.zeros(32, dtype=torch.long)
    kept: list[weakref.ref[torch.Tensor]] = []
    watch = model.layer3.register_forward_hook(lambda _m, _i, out: kept.append(weakref.ref(out)))

    def rss_kib() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4

    for use in range(110):
        if use == 10:
            gc.collect()
            start = rss_kib()
        with CamExtractor(model, ["layer3", "layer4"], ["gradcam", "gradcam++"]) as cam:
            result = cam(x, {"pred": classes, "true": classes})
        del cam, result
    gc.collect()
    watch.remove()
    growth_mib = (rss_kib() - start) / 1024
    # One use holds ~2 MiB of activations (layer3 at width 16, batch 32) plus its graph: a leak of
    # them over 100 uses would be hundreds of MiB.
    assert growth_mib < 40, f"memory grew by {growth_mib:.0f} MiB over 100 uses"
    assert all(ref() is None for ref in kept)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
