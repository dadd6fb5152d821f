"""Training and inference loops. They return plain dicts; the caller decides what to write."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from cifarcam.augment import albumentations_loader, augment_batch
from cifarcam.config import AugmentConfig, TrainConfig
from cifarcam.data import Split, normalize
from cifarcam.errors import UsageError

StepCallback = Callable[[int, int, float | None], None]  # (step, steps, running loss or None)
Tta = Literal["none", "flip", "flip-translate"]
_LOSS_REPORT_EVERY = 20  # steps between host syncs that refresh the progress bar's loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for this device and setting; None means plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" or cpu_supports_bf16():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def one_cycle(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear rise from 0.1 to 1 over `warmup` of the steps, then linear to 0."""
    peak = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < peak:
            return 0.1 + 0.9 * step / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return factor


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Nesterov SGD; BatchNorm weights and all biases skip weight decay unless configured."""
    decayed = [p for p in model.parameters() if p.ndim > 1 or config.decay_norm_and_bias]
    exempt = [p for p in model.parameters() if not (p.ndim > 1 or config.decay_norm_and_bias)]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        foreach=True,
    )


Batch = tuple[torch.Tensor, torch.Tensor]  # normalised float images (N, C, H, W), int64 labels


def device_batches(
    train: Split,
    order: torch.Tensor,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: AugmentConfig,
    generator: torch.Generator,
) -> Iterator[Batch]:
    """Batches cut from the in-memory dataset in `order` and augmented on its device."""
    for start in range(0, len(order), batch_size):
        batch_idx = order[start : start + batch_size]
        x = augment_batch(normalize(train.images[batch_idx], mean, std), augment, generator)
        yield x, train.labels[batch_idx]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[Batch],
    steps: int,
    device: torch.device,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns the per-sample mean loss and accuracy.

    The reported loss is the plain cross-entropy per sample (what test_loss measures too),
    even when the optimised objective adds label smoothing. Loss and hits accumulate on the
    device, so there is no host sync per step except every few steps for the progress bar.
    """
    model.train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    eps = label_smoothing
    for step, (images, labels) in enumerate(batches, start=1):
        x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        objective = (1 - eps) * nll - eps * log_probs.mean(dim=1) if eps else nll
        optimizer.zero_grad(set_to_none=True)
        objective.mean().backward()
        optimizer.step()
        scheduler.step()
        loss_sum += nll.detach().sum()
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if on_step is not None:
            report = step % _LOSS_REPORT_EVERY == 0 or step == steps
            on_step(step, steps, loss_sum.item() / seen if report else None)
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen}


def _tta_views(x: torch.Tensor, tta: Tta) -> list[torch.Tensor]:
    views = [x]
    if tta in ("flip", "flip-translate"):
        views.append(x.flip(3))
    if tta == "flip-translate":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[2:]
        for shifted in (padded[:, :, :height, :width], padded[:, :, 2:, 2:]):
            views.extend([shifted, shifted.flip(3)])
    return views


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1024,
    amp_dtype: torch.dtype | None = None,
    tta: Tta = "none",
    channels_last: bool = True,
) -> torch.Tensor:
    """Float32 logits (N, classes) for uint8 images (N, 3, H, W), averaged over the TTA views."""
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    outputs = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size], mean, std)
            views = _tta_views(x, tta)
            with _autocast(images.device, amp_dtype):
                logits = [model(v.contiguous(memory_format=memory_format)).float() for v in views]
            outputs.append(torch.stack(logits).mean(0))
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-sample mean cross-entropy and accuracy of logits against labels."""
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return {"loss": loss, "acc": accuracy}


def fit(
    model: nn.Module,
    train: Split,
    test: Split,
    config: TrainConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    validation: Split | None = None,
    amp_dtype: torch.dtype | None = None,
    on_step: StepCallback | None = None,
) -> Iterator[dict[str, float]]:
    """Train for config.epochs, yielding one flat metrics record after each epoch.

    The splits must already be on the training device. The model's weights after the yield
    are those the record describes, so the caller can checkpoint them.
    """
    device = train.images.device
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, one_cycle(steps_per_epoch * config.epochs, config.warmup)
    )
    order_generator = torch.Generator().manual_seed(config.seed)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    loader = (
        albumentations_loader(train, config.albumentations, config.batch_size, config.workers, config.seed)
        if config.albumentations is not None
        else None
    )
    forward_model = cast(nn.Module, torch.compile(model)) if config.compile else model
    eval_batch = max(config.batch_size, 1024)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        batches: Iterable[Batch]
        if loader is not None:
            batches = ((normalize(x.to(device), mean, std), y) for x, y in loader)
        else:
            order = torch.randperm(len(train), generator=order_generator).to(device)
            batches = device_batches(
                train, order, config.batch_size, mean, std, config.augment, augment_generator
            )
        record: dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        record.update(
            train_one_epoch(
                forward_model,
                optimizer,
                scheduler,
                batches,
                steps_per_epoch,
                device,
                config.label_smoothing,
                amp_dtype,
                config.channels_last,
                on_step,
            )
        )
        train_time = time.perf_counter() - started
        evaluated = {"test": test} | ({"val": validation} if validation is not None else {})
        for prefix, split in evaluated.items():
            logits = predict(
                model, split.images, mean, std, eval_batch, amp_dtype, channels_last=config.channels_last
            )
            scores = score(logits, split.labels)
            record[f"{prefix}_loss"], record[f"{prefix}_acc"] = scores["loss"], scores["acc"]
        record["epoch_time_s"] = round(train_time, 3)
        record["eval_time_s"] = round(time.perf_counter() - started - train_time, 3)
        yield record
