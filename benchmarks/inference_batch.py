"""Prediction speed against batch size: why `engine.inference_batch_size` is 128 on the CPU.

Times `engine.predict` (bf16 autocast where supported, channels_last, eval mode) over the same
images at several batch sizes, in alternating rounds so machine noise hits them alike, and
prints the median images/s of each and its ratio to batch 1024 (the size used on a GPU).
Usage: python benchmarks/inference_batch.py [--width 16] [--images 4096] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from workload import machine

from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from cifarcam.devices import autocast_dtype
from cifarcam.evaluation.inference import predict
from cifarcam.models.resnet import build_model

SIZES = (64, 128, 256, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    device = torch.device("cpu")
    amp = autocast_dtype(device, "auto")
    print(
        f"{machine()}, ResNet18 width {args.width}, {args.images} images, "
        f"{'fp32' if amp is None else str(amp).removeprefix('torch.')}"
    )
    torch.manual_seed(0)
    model = build_model("resnet18", args.width).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    speeds: dict[int, list[float]] = {size: [] for size in SIZES}
    for index in range(args.rounds):
        for size in SIZES if index % 2 == 0 else SIZES[::-1]:
            predict(model, images[:size], CIFAR10_MEAN, CIFAR10_STD, size, amp)  # warm-up
            started = time.perf_counter()
            predict(model, images, CIFAR10_MEAN, CIFAR10_STD, size, amp)
            speeds[size].append(args.images / (time.perf_counter() - started))
    reference = statistics.median(speeds[1024])
    for size in SIZES:
        median = statistics.median(speeds[size])
        print(f"batch {size:>5}: {median:8.0f} img/s  ({median / reference:.2f}x batch 1024)")


if __name__ == "__main__":
    main()
