"""Training throughput on this machine, measured in one run against two references.

(a) cifarcam: the real training loop (engine.train_one_epoch) with its on-device batched
    augmentation (flip, translate, cutout), in channels_last, under bf16 autocast where the
    CPU has native bf16 (fp32 elsewhere, as `cifarcam train` chooses); with bf16 also
    without the GEMM weight gradients of small-map convolutions, alternating with it.
(b) a naive baseline written the common way: per-sample albumentations in DataLoader
    workers, fp32, NCHW, loss.item() every step; the same ResNet.
(c) the machine's ceiling: GEMM GFLOP/s in the arithmetic cifarcam trains in (bf16 where
    native, else fp32) divided by the model's training FLOPs per image, counted with
    torch.utils.flop_counter; that GEMM is timed between the rounds of (a), and its median
    is used. The fp32 GEMM is timed once more at the end. Without native bf16 the bf16 GEMM
    is not timed: it is emulated (about 1 GFLOP/s on a 2-core AVX2 EPYC).

Prints cifarcam as a fraction of that ceiling and as a ratio to the baseline.
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
from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD, Split
from cifarcam.devices import autocast_dtype, memory_format, precision_name
from cifarcam.models.resnet import build_model
from cifarcam.training.steps import device_batches, one_cycle, train_one_epoch


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
) -> tuple[dict[bool, float], list[float], torch.dtype | None]:
    """Median images/s over `rounds` of `steps` steps, with (True) and, under bf16, without
    (False) the GEMM weight gradients of `conv_weight_grad` (the two alternate, so machine noise
    hits both alike); the GEMM GFLOP/s of the training dtype after each round; that dtype."""
    device = torch.device("cpu")
    amp = autocast_dtype(device, "auto")
    variants = (True, False) if amp is not None else (True,)  # convgrad is bf16-only
    torch.manual_seed(0)
    model = build_model("resnet18", width).to(memory_format=memory_format(True))
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

    for gemm in variants:
        run(2, gemm)  # warm-up: oneDNN picks its kernels on the first steps
    speeds: dict[bool, list[float]] = {gemm: [] for gemm in variants}
    gemms = []
    for index in range(rounds):
        for gemm in variants if index % 2 == 0 else variants[::-1]:
            speeds[gemm].append(run(steps, gemm))
        gemms.append(gemm_gflops(amp or torch.float32, repeats=3))
    medians = {gemm: statistics.median(values) for gemm, values in speeds.items()}
    return medians, gemms, amp


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
    speeds, gemms, amp = cifarcam_images_per_s(args.width, args.batch_size, args.steps, args.rounds)
    precision = precision_name(amp)
    ceiling_gflops = statistics.median(gemms)
    fp32 = gemm_gflops(torch.float32)
    flops = training_flops_per_image(args.width)
    ceiling = ceiling_gflops * 1e9 / flops
    print(
        f"GEMM: {precision} {ceiling_gflops:.0f} GFLOP/s (median of one per round; range "
        f"{min(gemms):.0f}-{max(gemms):.0f}), fp32 {fp32:.0f} GFLOP/s at the end"
        + ("" if amp is not None else "; no native bf16 on this CPU, so cifarcam trains in fp32")
    )
    print(
        f"training FLOPs per image: {flops / 1e9:.3f} GFLOP -> ceiling {ceiling:.1f} img/s ({precision}), "
        f"{fp32 * 1e9 / flops:.1f} img/s (fp32)"
    )
    ours = speeds[True]
    print(f"cifarcam ({precision}, channels_last, on-device augmentation): {ours:.1f} img/s")
    if False in speeds:
        print(
            f"cifarcam without the GEMM weight gradients: {speeds[False]:.1f} img/s "
            f"-> the GEMM gradients give {ours / speeds[False]:.2f}x"
        )
    naive = baseline_images_per_s(args.width, args.baseline_batch_size, args.baseline_steps)
    print(f"naive baseline (albumentations DataLoader, fp32, NCHW): {naive:.1f} img/s")
    print(f"cifarcam / {precision} ceiling = {ours / ceiling:.2f}")
    print(f"cifarcam / naive baseline = {ours / naive:.2f}")


if __name__ == "__main__":
    main()
