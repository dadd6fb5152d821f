"""Arithmetic settings of a run: the autocast dtype for a device and precision name, the memory
layout, cuDNN's benchmark mode for a stretch of code, and fp16's loss scale."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import torch

from cifarcam.config import DeviceName
from cifarcam.errors import UsageError

# fp16 training multiplies the loss by this before the backward pass and divides the gradients
# by it after, so that small activation gradients stay above fp16's normal range (6e-5). Static,
# unlike torch.amp.GradScaler, so that no step waits for the host to check for overflow.
FP16_LOSS_SCALE = 1024.0


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How files name an arithmetic: fp32, or the autocast dtype (bfloat16, float16)."""
    return "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for this device and setting; None means plain fp32. fp16 is for CUDA;
    elsewhere (a CPU scoring a run trained in fp16) it means auto."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if precision == "bf16" or cpu_supports_bf16():
        return torch.bfloat16
    return None


def training_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a run (its training and the scoring of its model): `autocast_dtype`,
    except that auto on CUDA is fp16. There BatchNorm runs cuDNN's kernels in fp16 (torch's
    own in bf16): on an H200 each epoch after the first took 16% less time than in bf16, at
    the same accuracy (docs/performance.md)."""
    if precision == "auto" and device.type == "cuda":
        return torch.float16
    return autocast_dtype(device, precision)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory layout of the `channels_last` setting, on every device and in every arithmetic
    (fp32 on the CPU included, since `models.BasicBlock` avoids the oneDNN kernel that broke it)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(
    device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast to `dtype` on the device, or nothing when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


@contextlib.contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """cuDNN's benchmark mode (timing its kernels for each new input shape) left as configured
    if `enabled`, off otherwise, for the duration. A shape met once or twice per epoch, like a
    short last batch, costs more to time than the fastest kernel saves."""
    configured = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = configured and enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = configured


DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)  # what TrainConfig.device takes


def resolve_device(name: str, gpu: int | None = None) -> torch.device:
    """The device called `name`; `gpu` numbers the CUDA device (a torchrun process's LOCAL_RANK)."""
    if name not in DEVICE_NAMES:
        raise UsageError(f"--device '{name}' is not one of: {', '.join(DEVICE_NAMES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "cuda" and gpu is not None:
        return torch.device("cuda", gpu % torch.cuda.device_count())
    return torch.device(name)
