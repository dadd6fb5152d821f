"""The GEMM weight gradient (cifarcam.training.conv_weight_grad) against torch's own convolution backward."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from cifarcam.config import build_config
from cifarcam.data.datasets import synthetic_dataset
from cifarcam.devices import cpu_supports_bf16
from cifarcam.models.resnet import build_model
from cifarcam.training import conv_weight_grad as convgrad
from cifarcam.training.conv_weight_grad import MAX_POSITIONS, gemm_weight_grads, weight_grad
from cifarcam.training.steps import device_batches, make_optimizer, train_one_epoch

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

CASES = [  # (in, out, size, kernel, stride, padding)
    (8, 16, 4, 3, 1, 1),
    (8, 16, 8, 3, 2, 1),
    (8, 16, 8, 1, 2, 0),
    (5, 7, 6, 3, 1, 0),
]


@contextlib.contextmanager
def _count_gemm_calls() -> Iterator[list[int]]:
    """Counts the convolutions that went through the GEMM-gradient Function while inside."""
    counted = [0]
    original = convgrad._GemmWeightGradConv.apply

    def counting(*args: object) -> torch.Tensor:
        counted[0] += 1
        return original(*args)

    convgrad._GemmWeightGradConv.apply = counting  # type: ignore[method-assign]
    try:
        yield counted
    finally:
        convgrad._GemmWeightGradConv.apply = original  # type: ignore[method-assign]


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride", "padding"), CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_weight_grad_matches_convolution_backward(cin, cout, size, kernel, stride, padding, layout):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, cin, size, size, generator=generator).contiguous(memory_format=layout)
    weight = torch.randn(cout, cin, kernel, kernel, generator=generator, requires_grad=True)
    out = F.conv2d(x, weight, None, stride, padding)
    grad_out = torch.randn(out.shape, generator=generator)
    (expected,) = torch.autograd.grad(out, weight, grad_out)

    got = weight_grad(x, grad_out, (kernel, kernel), (stride, stride), (padding, padding))

    assert got.shape == weight.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _layer4_like() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", width=4).layer4  # 16 -> 32 channels, 8x8 in, 4x4 out


needs_bf16 = pytest.mark.skipif(
    not cpu_supports_bf16(), reason="this CPU has no native bf16 (autocast would emulate it)"
)


@needs_bf16
def test_under_bf16_autocast_outputs_are_unchanged_and_gradients_stay_close():
    """Forward outputs are oneDNN's own; gradients agree within bf16 rounding."""
    plain = _layer4_like()
    fast = copy.deepcopy(plain)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    results = []
    for module, use_gemm in ((plain, False), (fast, True)):
        inputs = x.clone().requires_grad_()
        context = gemm_weight_grads(torch.device("cpu"), torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16), context if use_gemm else torch.enable_grad():
            out = module(inputs)
        out.float().square().mean().backward()
        results.append((out, inputs.grad, {name: p.grad for name, p in module.named_parameters()}))
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = results

    assert torch.equal(out_a, out_b)
    assert _relative_error(gx_b, gx_a) < 1e-2
    conv_weights = [name for name in grads_a if "conv" in name or "shortcut.0" in name]
    assert len(conv_weights) == 5  # two blocks of two 3x3 convs, plus the 1x1 shortcut
    for name in conv_weights:
        assert _relative_error(grads_b[name], grads_a[name]) < 2e-2, name
    for name in set(grads_a) - set(conv_weights):  # BatchNorm
        assert _relative_error(grads_b[name], grads_a[name]) < 2e-2, name


def _grad_fn_name(x: torch.Tensor, weight: torch.Tensor, **kwargs: object) -> str:
    with torch.autocast("cpu", dtype=torch.bfloat16), gemm_weight_grads(torch.device("cpu"), torch.bfloat16):
        out = F.conv2d(x, weight, **kwargs)
    assert out.grad_fn is not None
    return type(out.grad_fn).__name__


def test_only_small_maps_without_bias_take_the_gemm_path():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    small = torch.randn(2, 3, 4, 4)  # 16 output positions
    large = torch.randn(2, 3, 8, 8)  # 64 output positions
    assert 4 * 4 <= MAX_POSITIONS < 8 * 8
    assert _grad_fn_name(small, weight, padding=1).startswith("_GemmWeightGradConv")
    assert _grad_fn_name(large, weight, padding=1) == "ConvolutionBackward0"
    assert _grad_fn_name(small, weight, padding=1, bias=torch.zeros(4)) == "ConvolutionBackward0"
    assert _grad_fn_name(small, weight, padding=2, dilation=2) == "ConvolutionBackward0"
    assert _grad_fn_name(small, weight, padding="same") == "ConvolutionBackward0"


def test_inactive_without_cpu_bf16_or_outside_autocast():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    x = torch.randn(2, 3, 4, 4)
    with gemm_weight_grads(torch.device("cpu"), None):
        assert type(F.conv2d(x, weight, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    with gemm_weight_grads(torch.device("cpu"), torch.bfloat16):  # no autocast around it
        assert type(F.conv2d(x, weight, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    no_grad, autocast = torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16)
    with no_grad, autocast, gemm_weight_grads(torch.device("cpu"), torch.bfloat16):
        assert F.conv2d(x, weight, padding=1).grad_fn is None


@needs_bf16
def test_a_training_epoch_with_and_without_the_gemm_weight_gradients_agrees() -> None:
    """Same data, same start: the layer4 weights after an epoch differ only by bf16 rounding, and
    the run really took the GEMM path (its layer4 convolutions were called through it)."""
    data = synthetic_dataset(96, 1, seed=2)
    config = build_config({"width": 4, "batch_size": 32, "lr": 0.05, "warmup": 0.0})
    torch.manual_seed(0)
    start = build_model("resnet18", 4).to(memory_format=torch.channels_last)
    models, calls = [], []
    for use_gemm in (False, True):
        model = copy.deepcopy(start)
        optimizer = make_optimizer(model, config, 0.05)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batches = device_batches(
            data.train, torch.arange(96), 32, MEAN, STD, config.augment, torch.Generator().manual_seed(3)
        )
        with _count_gemm_calls() as counted:
            result = train_one_epoch(
                model,
                optimizer,
                scheduler,
                batches,
                3,
                torch.device("cpu"),
                0.1,
                torch.bfloat16,
                gemm_weight_grad=use_gemm,
            )
        assert torch.isfinite(torch.tensor(result["train_loss"]))
        models.append(model)
        calls.append(counted[0])
    assert calls == [0, 3 * 5]  # 3 steps x layer4's five convolutions
    plain, fast = (dict(m.named_parameters()) for m in models)
    moved = (fast["layer4.1.conv2.weight"] - start.layer4[1].conv2.weight).norm()
    assert moved > 0
    for name in plain:
        assert _relative_error(fast[name], plain[name]) < 1e-2, name
