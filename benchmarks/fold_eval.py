"""Scoring with BatchNorm folded into the convolutions against the model as trained.

Times `engine.predict` (bf16 autocast where supported, channels_last, the CPU's batch of 128)
with `fold=True` (the default: a folded copy, made inside every call and timed with it) and
`fold=False`, in alternating rounds so machine noise hits both alike, and prints the median
images/s of each, their ratio, and how far the two sets of logits are apart. The BatchNorm
layers hold running statistics of stand-in images, so the folded weights differ from the
convolutions' own.
Usage: python benchmarks/fold_eval.py [--widths 16 64] [--images 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from workload import fake_cifar, machine

from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD, normalize
from cifarcam.devices import autocast_dtype
from cifarcam.evaluation.inference import predict
from cifarcam.models.resnet import build_model


def with_statistics(width: int) -> torch.nn.Module:
    """A ResNet18 in eval mode whose BatchNorm layers hold running statistics gathered from
    forward passes over stand-in images, not the initial zeros and ones."""
    torch.manual_seed(0)
    model = build_model("resnet18", width).to(memory_format=torch.channels_last)
    images = fake_cifar(512).images
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 128):
            model(normalize(images[start : start + 128], CIFAR10_MEAN, CIFAR10_STD))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    device = torch.device("cpu")
    amp = autocast_dtype(device, "auto")
    print(
        f"{machine()}, ResNet18, {args.images} images, "
        f"{'fp32' if amp is None else str(amp).removeprefix('torch.')}"
    )
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    for width in args.widths:
        model = with_statistics(width)
        speeds: dict[bool, list[float]] = {True: [], False: []}
        logits: dict[bool, torch.Tensor] = {}
        predict(model, images[:256], CIFAR10_MEAN, CIFAR10_STD, amp_dtype=amp)  # warm-up
        for index in range(args.rounds):
            for fold in (True, False) if index % 2 == 0 else (False, True):
                started = time.perf_counter()
                logits[fold] = predict(model, images, CIFAR10_MEAN, CIFAR10_STD, amp_dtype=amp, fold=fold)
                speeds[fold].append(args.images / (time.perf_counter() - started))
        folded, plain = (statistics.median(speeds[fold]) for fold in (True, False))
        gap = (logits[True] - logits[False]).abs().max().item()
        agree = (logits[True].argmax(1) == logits[False].argmax(1)).double().mean().item()
        print(
            f"width {width}: folded {folded:.0f} img/s, as trained {plain:.0f} img/s "
            f"(folded/as trained {folded / plain:.2f}x; rounds {[round(s) for s in speeds[True]]} "
            f"against {[round(s) for s in speeds[False]]}); logits differ by at most {gap:.2g}, "
            f"same class for {agree:.2%} of the images"
        )


if __name__ == "__main__":
    main()
