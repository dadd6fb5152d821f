"""cifarcam's default recipe against the published ResNet-18 baseline, side by side.

The baseline is the ResNet-18 recipe of Keller Jordan's cifar10-zoo
(`airbench/baselines/train_resnet18_94.py`), written here from its published hyperparameters
on cifarcam's own model: batch 500, Nesterov SGD (momentum 0.9, lr 0.2, weight decay 5e-4 on a
mean loss), a triangular schedule per step (0.2x the lr at step 0, 1x at 20% of the steps, 0
at the end), each batch flipped, cut out (a 12x12 zeroed square fully inside the image) and
translated by up to 4 pixels (reflect padding), no label smoothing. Its fp16 weights become
the same autocast cifarcam trains with on the device (bf16 on a CPU that has it).

Both recipes train in this one process, on the same data, device and image budget, for
several seeds each (they alternate, so a slow spell of the machine hits both), and are scored
on the whole test set at TTA level 0 (the image), 1 (the mean of the logits of the image and
its mirror) and 2 (0.5 x level 1 + 0.25 x level 1 of each of two 1-pixel translations: reflect
padding 1, crops at (0, 0) and (2, 2)).

    python benchmarks/recipe_vs_baseline.py --data PATH --scale quick   # CPU: the quick preset
    python benchmarks/recipe_vs_baseline.py --data PATH --scale full    # GPU: width 64, 20 epochs
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cifarcam.config import build_config, preset_values
from cifarcam.data.augment import random_flip, random_translate
from cifarcam.data.datasets import CIFAR10_MEAN, CIFAR10_STD, Split, load_dataset, normalize
from cifarcam.devices import memory_format, resolve_device, training_dtype
from cifarcam.evaluation.inference import predict
from cifarcam.models.resnet import build_model
from cifarcam.training.loop import Prepared, build_trainer
from cifarcam.training.steps import Batch, Tally, train_steps
from cifarcam.training.trainer import epoch_order

BATCH_SIZE = 500
LR = 0.2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CUTOUT = 12
TRANSLATE = 4
SCALES = {  # the model and image budget of each scale
    "quick": {"width": 16, "epochs": 20, "epoch_images": 25_000},
    "full": {"width": 64, "epochs": 20, "epoch_images": None},
}


def triangle(total_steps: int) -> Callable[[int], float]:
    """The baseline's lr factor at a step: 0.2 at step 0, 1 at 20% of the steps, 0 at the end."""
    return lambda step: float(np.interp(step, [0, 0.2 * total_steps, total_steps], [0.2, 1.0, 0.0]))


def cutout_inside(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, placed uniformly among the positions where it lies
    wholly inside the image."""
    count, _, height, width = x.shape
    top = torch.randint(0, height - size + 1, (count, 1, 1), generator=generator, device=x.device)
    left = torch.randint(0, width - size + 1, (count, 1, 1), generator=generator, device=x.device)
    ys = torch.arange(height, device=x.device).view(1, -1, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, -1)
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def baseline_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The baseline's augmentation of a normalised batch: flip, cutout, then translate."""
    x = random_flip(x, generator)
    x = cutout_inside(x, CUTOUT, generator)
    return random_translate(x, TRANSLATE, generator)


def baseline_batches(train: Split, order: torch.Tensor, generator: torch.Generator) -> Iterator[Batch]:
    for indices in order.split(BATCH_SIZE):
        images = normalize(train.images[indices], CIFAR10_MEAN, CIFAR10_STD)
        yield Batch(baseline_augment(images, generator), train.labels[indices])


def train_baseline(
    train: Split, width: int, epochs: int, epoch_images: int, seed: int, amp_dtype: torch.dtype | None
) -> torch.nn.Module:
    """The published recipe on cifarcam's ResNet-18 at `width`, trained on the device of `train`."""
    device = train.images.device
    torch.manual_seed(seed)
    model = build_model("resnet18", width).to(device).to(memory_format=memory_format(True))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    steps = -(-epoch_images // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, triangle(steps * epochs))
    generator = torch.Generator(device=device).manual_seed(seed)
    for epoch in range(1, epochs + 1):
        order = epoch_order(len(train), epoch_images, seed, epoch).to(device)
        batches = baseline_batches(train, order, generator)
        train_steps(model, optimizer, scheduler, batches, Tally.zeros(device), steps, amp_dtype=amp_dtype)
    return model


def train_default(prepared: Prepared, values: dict[str, Any]) -> tuple[torch.nn.Module, float]:
    """cifarcam's recipe with `values` over its defaults, through the library's own Trainer; the
    model and its training seconds (the Trainer also scores the test set after every epoch)."""
    trainer = build_trainer(build_config(values), prepared)
    seconds = sum(record["epoch_time_s"] for record in trainer.epochs())
    return trainer.model, seconds


def tta_accuracies(
    model: torch.nn.Module, test: Split, amp_dtype: torch.dtype | None
) -> tuple[float, float, float]:
    """Test accuracy at TTA levels 0, 1 and 2."""

    def logits(images: torch.Tensor) -> torch.Tensor:
        return predict(model, images, CIFAR10_MEAN, CIFAR10_STD, amp_dtype=amp_dtype)

    def level1(images: torch.Tensor) -> torch.Tensor:
        return (logits(images) + logits(images.flip(3))) / 2

    padded = F.pad(test.images.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8)
    height, width = test.images.shape[2:]
    plain, mirrored = logits(test.images), level1(test.images)
    shifted = [level1(padded[:, :, :height, :width]), level1(padded[:, :, 2:, 2:])]
    levels = [plain, mirrored, 0.5 * mirrored + 0.25 * shifted[0] + 0.25 * shifted[1]]
    labels = test.labels
    return tuple(float((level.argmax(1) == labels).double().mean()) for level in levels)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="cifar10 or an image-folder tree")
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from workload import machine

    scale = SCALES[args.scale]
    device = resolve_device(args.device)
    amp_dtype = training_dtype(device, "auto")
    dataset = load_dataset(args.data)
    train, test = dataset.train.to(device), dataset.test.to(device)
    epoch_images = scale["epoch_images"] or len(train)
    prepared = Prepared(device, amp_dtype, dataset, dataset.train, None)
    default_values = (preset_values("quick") if args.scale == "quick" else {}) | {
        "data": args.data,
        "device": device.type,
        "width": scale["width"],
        "epochs": scale["epochs"],
        "epoch_images": scale["epoch_images"],
    }
    print(
        f"{machine()}; data {dataset.source}; scale {args.scale}: ResNet-18 width {scale['width']}, "
        f"{scale['epochs']} epochs of {epoch_images} images; autocast {amp_dtype}"
    )
    results: dict[str, list[tuple[float, float, float, float]]] = {"cifarcam": [], "baseline": []}
    for seed in range(args.seeds):
        for recipe in results:
            if recipe == "cifarcam":
                model, seconds = train_default(prepared, default_values | {"seed": seed})
            else:
                started = time.perf_counter()
                model = train_baseline(train, scale["width"], scale["epochs"], epoch_images, seed, amp_dtype)
                seconds = time.perf_counter() - started
            accuracies = tta_accuracies(model, test, amp_dtype)
            results[recipe].append((*accuracies, seconds))
            print(
                f"seed {seed} {recipe:<9} "
                + "  ".join(f"TTA{i} {a:.2%}" for i, a in enumerate(accuracies))
                + f"  {seconds:.0f} s",
                flush=True,
            )
    header = [f"TTA{level} mean (min-max)" for level in range(3)]
    print("\nrecipe     " + "  ".join(f"{cell:<23}" for cell in header) + "  training")
    means = {}
    for recipe, rows in results.items():
        columns = list(zip(*rows, strict=True))
        means[recipe] = [statistics.mean(column) for column in columns]
        cells = [f"{statistics.mean(c):.2%} ({min(c):.2%}-{max(c):.2%})" for c in columns[:3]]
        print(f"{recipe:<10} " + "  ".join(f"{cell:<23}" for cell in cells) + f"  {means[recipe][3]:.0f} s")
    difference = [a - b for a, b in zip(means["cifarcam"][:3], means["baseline"][:3], strict=True)]
    print("difference " + "  ".join(f"{d * 100:+.2f} points".ljust(23) for d in difference))


if __name__ == "__main__":
    main()
