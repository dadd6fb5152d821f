"""GraphedTraining: CUDA-graph replay of the training pass must train exactly as eager does.

The CUDA tests run where a GPU is (benchmarks/gpu_recipe.sh runs this file on the lent GPU
machine); on a CPU-only machine they are skipped, and the CPU behaviour is tested instead.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cifarcam.models.resnet import build_model
from cifarcam.training.cuda_graphs import GraphedTraining

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _train(
    forward: torch.nn.Module,
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    amp_dtype: torch.dtype | None = None,
    lr: float = 0.1,
    momentum: float = 0.9,
) -> None:
    """SGD steps on `batches` through `forward` (the model itself, or its graphed wrapper)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0)
    forward.train()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = forward(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()


def _assert_same_state(model: torch.nn.Module, reference: torch.nn.Module, **tolerance: float) -> None:
    """Every floating parameter and buffer within `tolerance` (assert_close's), integer ones equal."""
    for (name, value), expected in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        if not value.is_floating_point():
            assert torch.equal(value, expected), name
            continue
        torch.testing.assert_close(value, expected, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def _batches(device: str, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(n, 3, 32, 32, generator=generator).to(device),
            torch.randint(0, 10, (n,), generator=generator).to(device),
        )
        for n in sizes
    ]


def test_on_the_cpu_nothing_is_captured_and_the_model_runs_as_itself() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 4)
    reference = copy.deepcopy(model)
    wrapped = GraphedTraining(model, 8, None)
    batches = _batches("cpu", (8, 8, 5))
    _train(wrapped, model, batches)
    _train(reference, reference, batches)
    assert not wrapped.captured
    _assert_same_state(model, reference, rtol=0.0, atol=0.0)


@needs_cuda
def test_graphed_training_matches_eager_training_including_a_short_last_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Deterministic fp32 kernels (no TF32): the graphed steps then give the very same numbers.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model("resnet18", 8).cuda()
    reference = copy.deepcopy(model)
    wrapped = GraphedTraining(model, 16, None)
    batches = _batches("cuda", (16, 16, 16, 7))  # the 7-image batch runs eagerly
    originals = [x.clone() for x, _ in batches]
    _train(wrapped, model, batches)
    for (x, _), original in zip(batches, originals, strict=True):
        assert torch.equal(x, original)  # the graph copies batches in; it never writes to them
    _train(reference, reference, batches)
    assert wrapped.captured
    # Parameters and BatchNorm statistics alike: the capture's warm-up passes left no trace.
    _assert_same_state(model, reference, rtol=1e-6, atol=1e-7)


@needs_cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_graphed_autocast_training_stays_close_to_eager_and_eval_mode_runs_eagerly(
    monkeypatch: pytest.MonkeyPatch, amp_dtype: torch.dtype
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    model = build_model("resnet18", 8).cuda().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    wrapped = GraphedTraining(model, 32, amp_dtype)
    batches = [
        (x.contiguous(memory_format=torch.channels_last), y) for x, y in _batches("cuda", (32, 32, 32))
    ]
    _train(wrapped, model, batches, amp_dtype, lr=0.05, momentum=0.0)
    _train(reference, reference, batches, amp_dtype, lr=0.05, momentum=0.0)
    assert wrapped.captured
    _assert_same_state(model, reference, rtol=1e-2, atol=1e-3)
    wrapped.eval()
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model.eval()(x))
        x2 = x[:5]
        assert wrapped(x2).shape == (5, 10)
