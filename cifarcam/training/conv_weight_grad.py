"""Convolution weight gradients as one matrix multiply where oneDNN's kernels are slow: on the CPU in
bf16, layer4's 512->512 weight gradient (4x4 output positions) ran at 106-249 GFLOP/s in oneDNN and at
360-680 as im2col + one GEMM over every image and position (2-core Xeon with AMX, batch 256;
docs/performance.md). Inside `gemm_weight_grads()` every eligible conv2d call takes that path."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

# Output positions (height x width) up to which the GEMM replaces oneDNN's weight gradient:
# measured faster at 4x4 (layer4), slower at 8x8 and larger (layer3 and below).
MAX_POSITIONS = 16
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def weight_grad(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """d(loss)/d(weight) of conv2d(x, weight) given d(loss)/d(output), as one GEMM: the weight's
    shape (out, in, kh, kw), in channels_last memory order."""
    out_channels, rows, cols = grad_out.shape[1:]
    # im2col: (N * output positions, kh * kw * C), rows in N, y, x order
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0], padding[0]))
    taps = [
        padded[
            :, i : i + stride[0] * (rows - 1) + 1 : stride[0], j : j + stride[1] * (cols - 1) + 1 : stride[1]
        ]
        for i in range(kernel[0])
        for j in range(kernel[1])
    ]
    columns = torch.stack(taps, dim=3).reshape(-1, kernel[0] * kernel[1] * x.shape[1])
    grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels)
    grad = grad_rows.t() @ columns
    return grad.view(out_channels, kernel[0], kernel[1], x.shape[1]).permute(0, 3, 1, 2)


class _GemmWeightGradConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, (1, 1), False, (0, 0), 1, (True, False, False)
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad_out, tuple(weight.shape[2:]), stride, padding)
        return grad_x, grad_w, None, None


class _GemmWeightGrads(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.conv2d and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
            call = _CONV_DEFAULTS | dict(zip(_CONV_ARGUMENTS, args, strict=False)) | kwargs
            x, weight, padding = call["input"], call["weight"], call["padding"]
            if (
                call["bias"] is None
                and call["groups"] == 1
                and _pair(call["dilation"]) == (1, 1)
                and not isinstance(padding, str)
                and x.device.type == "cpu"
                and x.dim() == 4
                and torch.get_autocast_dtype("cpu") == torch.bfloat16
            ):
                stride, pad = _pair(call["stride"]), _pair(padding)
                rows = (x.shape[2] + 2 * pad[0] - weight.shape[2]) // stride[0] + 1
                cols = (x.shape[3] + 2 * pad[1] - weight.shape[3]) // stride[1] + 1
                if rows * cols <= MAX_POSITIONS:
                    with torch.autocast("cpu", enabled=False):
                        return _GemmWeightGradConv.apply(
                            x.to(torch.bfloat16), weight.to(torch.bfloat16), stride, pad
                        )
        return func(*args, **kwargs)


def gemm_weight_grads(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """The context for a training forward pass: active on the CPU under bf16 autocast, else a no-op."""
    if device.type == "cpu" and amp_dtype == torch.bfloat16:
        return _GemmWeightGrads()
    return contextlib.nullcontext()
