"""Training throughput on this machine, measured in one run against two references.

(a) cifarcam: the real training loop (engine.train_one_epoch) with its on-device batched
    augmentation (flip, translate, cutout), bf16 autocast where supported, channels_last;
    also without the GEMM weight gradients of small-map convolutions, alternating with it.
(b) a naive baseline written the common way: per-sample albumentations in DataLoader
    workers, fp32, NCHW, loss.item() every step; the same ResNet.
(c) the machine's ceiling: GEMM GFLOP/s (bf16 and fp32) divided by the model's training
    FLOPs per image, counted with torch.utils.flop_counter; the bf16 GEMM is timed between
    the rounds of (a), and its median is used.

Prints cifarcam as a fraction of the bf16 ceiling and as a ratio to the baseline.
Usage: python benchmarks/throughput.py [--width 64] [--batch-size 256] [--steps 4] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from workload import fake_cifar, machine, training_flops_per_image

from cifarcam.config import AugmentConfig
from cifarcam.data import CIFAR10_MEAN, CIFAR10_STD, Split
from cifarcam.engine import device_batches, one_cycle, train_one_epoch
from cifarcam.models import build_model
from cifarcam.precision import autocast_dtype


def gemm_gflops(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def cifarcam_images_per_s(
    width: int, batch_size: int, steps: int, rounds: int
) -> tuple[dict[bool, float], str]:
    """Median images/s over `rounds` of `steps` steps, with (True) and without (False) the GEMM
    weight gradients of cifarcam.convgrad; the two alternate, so machine noise hits both alike."""
    device = torch.device("cpu")
    amp = autocast_dtype(device, "auto")
    torch.manual_seed(0)
    model = build_model("resnet18", width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(1000, 0.2))
    data = fake_cifar(batch_size * (steps + 2))
    augment = AugmentConfig(flip=True, translate=4, cutout=8)
    generator = torch.Generator().manual_seed(1)

    def run(count: int, gemm: bool) -> float:
        order = torch.randperm(len(data))[: batch_size * count]
        batches = device_batches(data, order, batch_size, CIFAR10_MEAN, CIFAR10_STD, augment, generator)
        started = time.perf_counter()
        train_one_epoch(
            model, optimizer, scheduler, batches, count, device, 0.1, amp, True, gemm_weight_grad=gemm
        )
        return batch_size * count / (time.perf_counter() - started)

    for gemm in (True, False):
        run(2, gemm)  # warm-up: oneDNN picks its kernels on the first steps
    speeds: dict[bool, list[float]] = {True: [], False: []}
    gemms = []
    for index in range(rounds):
        for gemm in (True, False) if index % 2 == 0 else (False, True):
            speeds[gemm].append(run(steps, gemm))
        gemms.append(gemm_gflops(torch.bfloat16, repeats=3))
    medians = {gemm: statistics.median(values) for gemm, values in speeds.items()}
    return medians, gemms, "fp32" if amp is None else str(amp).removeprefix("torch.")


class NaiveDataset(Dataset[tuple[torch.Tensor, int]]):
    """The usual notebook dataset: albumentations + Normalize per sample, HWC -> CHW float."""

    def __init__(self, split: Split) -> None:
        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels.numpy()
        self.transform = A.Compose(
            [
                A.HorizontalFlip(p=0.5),
                A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), p=0.5),
                A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(8, 8), hole_width_range=(8, 8)),
                A.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.transform(image=self.images[index])["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[index])


def baseline_images_per_s(width: int, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model("resnet18", width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(
        NaiveDataset(fake_cifar(batch_size * (steps + 2))), batch_size=batch_size, shuffle=True, num_workers=2
    )
    model.train()
    started = 0.0
    for step, (x, y) in enumerate(loader):
        if step == 2:
            started = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
    return batch_size * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds of cifarcam with/without")
    parser.add_argument("--baseline-batch-size", type=int, default=128)
    parser.add_argument("--baseline-steps", type=int, default=4)
    args = parser.parse_args()

    print(f"{machine()}, ResNet18 width {args.width}")
    speeds, gemms, precision = cifarcam_images_per_s(args.width, args.batch_size, args.steps, args.rounds)
    bf16 = statistics.median(gemms)
    fp32 = gemm_gflops(torch.float32)
    flops = training_flops_per_image(args.width)
    ceiling = bf16 * 1e9 / flops
    print(
        f"GEMM: bf16 {bf16:.0f} GFLOP/s (median of one per round; range {min(gemms):.0f}-{max(gemms):.0f}), "
        f"fp32 {fp32:.0f} GFLOP/s"
    )
    print(
        f"training FLOPs per image: {flops / 1e9:.3f} GFLOP -> ceiling {ceiling:.1f} img/s (bf16), "
        f"{fp32 * 1e9 / flops:.1f} img/s (fp32)"
    )
    ours = speeds[True]
    print(f"cifarcam ({precision}, channels_last, on-device augmentation): {ours:.1f} img/s")
    print(
        f"cifarcam without the GEMM weight gradients (cifarcam.convgrad): {speeds[False]:.1f} img/s "
        f"-> the GEMM gradients give {ours / speeds[False]:.2f}x"
    )
    naive = baseline_images_per_s(args.width, args.baseline_batch_size, args.baseline_steps)
    print(f"naive baseline (albumentations DataLoader, fp32, NCHW): {naive:.1f} img/s")
    print(f"cifarcam / bf16 ceiling = {ours / ceiling:.2f}")
    print(f"cifarcam / naive baseline = {ours / naive:.2f}")


if __name__ == "__main__":
    main()
