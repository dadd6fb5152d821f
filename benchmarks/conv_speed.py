"""How close the convolutions alone let training come to the machine's ceiling.

throughput.py divides a large GEMM's GFLOP/s by the training FLOPs per image to get the
ceiling. This script times each distinct convolution of the ResNet18 training step on its own,
in the training arithmetic and layout (bf16 where the CPU has it natively, else fp32;
channels_last), for its three passes: forward, input gradient (not for the first
convolution, whose input needs none) and weight gradient. It reports each pass's GFLOP/s
against a GEMM timed in the same run. It also times whole training steps without the
augmentation (random batches, SGD) and prints:
- the ceiling: GEMM GFLOP/s / training FLOPs per image;
- the convolutions' bound: images/s if a step did nothing but its convolutions, at the rates
  measured here;
- the measured step, as a fraction of the ceiling and of that bound.
The rest of the step is BatchNorm, ReLU, additions, the loss and the optimizer.

Usage: python benchmarks/conv_speed.py [--width 64] [--batch-size 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from throughput import gemm_gflops
from workload import machine, training_flops_per_image

from cifarcam.devices import autocast_dtype, memory_format, precision_name
from cifarcam.models.resnet import build_model

ConvShape = tuple[tuple[int, ...], int, tuple[int, int], tuple[int, int], tuple[int, int]]


def seconds(call: Callable[[], Any], repeats: int) -> float:
    """The median of `repeats` timed calls, after two untimed ones."""
    call()
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _pair(value: Any) -> tuple[int, int]:
    return int(value[0]), int(value[1])


def conv_shapes(model: torch.nn.Module, batch: torch.Tensor) -> tuple[Counter[ConvShape], ConvShape]:
    """How often each (input shape, out channels, kernel, stride, padding) occurs in one forward
    pass, and the first convolution's (its input needs no gradient)."""
    seen: list[ConvShape] = []

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, torch.nn.Conv2d)
        kernel, stride, padding = (
            _pair(value) for value in (module.kernel_size, module.stride, module.padding)
        )
        seen.append((tuple(inputs[0].shape), module.out_channels, kernel, stride, padding))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    return Counter(seen), seen[0]


def pass_seconds(
    shape: ConvShape, dtype: torch.dtype, layout: torch.memory_format, repeats: int
) -> dict[str, float]:
    """Seconds of the forward pass, input gradient and weight gradient of one convolution."""
    size, out_channels, kernel, stride, padding = shape
    x = torch.randn(size, dtype=dtype).contiguous(memory_format=layout)
    weight = torch.randn(out_channels, size[1], *kernel, dtype=dtype).contiguous(memory_format=layout)
    output = F.conv2d(x, weight, None, stride, padding)
    grad = torch.randn_like(output).contiguous(memory_format=layout)

    def backward(mask: tuple[bool, bool, bool]) -> Callable[[], Any]:
        return lambda: torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, (1, 1), False, (0, 0), 1, mask
        )

    return {
        "forward": seconds(lambda: F.conv2d(x, weight, None, stride, padding), repeats),
        "input grad": seconds(backward((True, False, False)), repeats),
        "weight grad": seconds(backward((False, True, False)), repeats),
    }


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, amp: torch.dtype | None, repeats: int) -> float:
    """Median seconds of one training step (forward, loss, backward, SGD) on `batch`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)
    labels = torch.randint(0, 10, (batch.shape[0],))

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(batch)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    amp = autocast_dtype(torch.device("cpu"), "auto")
    dtype = amp or torch.float32
    layout = memory_format(True)
    torch.manual_seed(0)
    model = build_model("resnet18", args.width).to(memory_format=layout)
    batch = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=layout)
    shapes, first = conv_shapes(model, batch)
    print(
        f"{machine()}, ResNet18 width {args.width}, batch {args.batch_size}, "
        f"{precision_name(amp)}, channels_last"
    )

    gemms = [gemm_gflops(dtype, repeats=3)]
    conv_total = 0.0
    print("convolution (input -> out, kernel, stride) x count: GFLOP/s of forward / input grad / weight grad")
    for shape, count in shapes.items():
        size, out_channels, kernel, stride, padding = shape
        rows = (size[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
        cols = (size[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
        flops = 2 * size[0] * out_channels * rows * cols * size[1] * kernel[0] * kernel[1]
        timed = pass_seconds(shape, dtype, layout, args.repeats)
        if shape == first and count == 1:
            del timed["input grad"]
        conv_total += count * sum(timed.values())
        rates = " / ".join(f"{flops / value / 1e9:.0f}" for value in timed.values())
        print(
            f"  {tuple(size[1:])} -> {out_channels}, {kernel[0]}x{kernel[1]}, /{stride[0]} x{count}: {rates}"
        )
    gemms.append(gemm_gflops(dtype, repeats=3))
    step = step_seconds(model, batch, amp, args.repeats)
    gemms.append(gemm_gflops(dtype, repeats=3))

    gemm = statistics.median(gemms)
    flops_per_image = training_flops_per_image(args.width)
    ceiling = gemm * 1e9 / flops_per_image
    conv_bound = args.batch_size / conv_total
    measured = args.batch_size / step
    print(
        f"GEMM 4096x4096 {precision_name(amp)}: {gemm:.0f} GFLOP/s "
        f"(median of {', '.join(f'{g:.0f}' for g in gemms)})"
    )
    print(f"ceiling: {ceiling:.1f} img/s ({flops_per_image / 1e9:.3f} GFLOP per training image)")
    print(f"convolutions alone: {conv_bound:.1f} img/s = {conv_bound / ceiling:.2f} of the ceiling")
    print(
        f"training step (no augmentation): {measured:.1f} img/s = {measured / ceiling:.2f} of the ceiling, "
        f"{measured / conv_bound:.2f} of the convolutions' bound"
    )


if __name__ == "__main__":
    main()
