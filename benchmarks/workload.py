"""What the benchmarks share: their machine line, stand-in dataset and training FLOPs per image
(no albumentations import, so the GPU machine, which lacks it, can run gpu_step.py)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cifarcam.data.datasets import Split
from cifarcam.devices import cpu_supports_bf16
from cifarcam.models.resnet import build_model


def machine() -> str:
    """The line every benchmark starts with: processor, threads, native bf16 and torch version."""
    return (
        f"machine: {cpu_model()}, {torch.get_num_threads()} threads, "
        f"{'native' if cpu_supports_bf16() else 'no native'} bf16, torch {torch.__version__}"
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fake_cifar(count: int) -> Split:
    """`count` random uint8 images and labels, the same for every call (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 10, (count,), generator=generator))


def training_flops_per_image(width: int) -> float:
    """Forward + backward FLOPs of one ResNet18 training image, by torch.utils.flop_counter."""
    model = build_model("resnet18", width)
    x = torch.randn(8, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    return counter.get_total_flops() / 8
