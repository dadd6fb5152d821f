"""Training and inference loops. They return plain dicts; the caller decides what to write."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from cifarcam.augment import albumentations_loader, augment_batch
from cifarcam.config import AugmentConfig, TrainConfig
from cifarcam.data import Split, normalize
from cifarcam.errors import TrainingDiverged, UsageError

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


def memory_format(
    device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool
) -> torch.memory_format:
    """channels_last where asked for, except fp32 on the CPU.

    There, torch 2.14.1 training convolutions in channels_last corrupt the heap for some
    batch sizes (seen here with 7, 25 and 33 images at widths 4 and 8: 'double free or
    corruption'); NCHW and bf16 channels_last do not. NCHW costs fp32 about 15% speed.
    """
    if not channels_last or (device.type == "cpu" and amp_dtype is None):
        return torch.contiguous_format
    return torch.channels_last


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


class NonFiniteLoss(Exception):
    """Raised by `train_steps` when a batch loss is NaN or infinite; `step` is 1-based."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


class StopRequested(Exception):
    """Raised by `Trainer.epochs` when `should_stop` asked for a stop in the middle of an epoch."""


@dataclass
class Tally:
    """Running sums of one epoch, kept on the device so no step waits for the host."""

    loss_sum: torch.Tensor  # float64, sum of per-sample cross-entropy
    correct: torch.Tensor  # int64
    first_bad_step: torch.Tensor  # int64, -1 while every batch loss has been finite
    seen: int = 0
    steps: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> Tally:
        return cls(
            torch.zeros((), device=device, dtype=torch.float64),
            torch.zeros((), device=device, dtype=torch.int64),
            torch.full((), -1, device=device, dtype=torch.int64),
        )

    def check_finite(self) -> None:
        bad = int(self.first_bad_step.item())
        if bad >= 0:
            raise NonFiniteLoss(bad)

    def result(self) -> dict[str, float]:
        return {"train_loss": self.loss_sum.item() / self.seen, "train_acc": self.correct.item() / self.seen}


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[Batch],
    tally: Tally,
    total_steps: int,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> bool:
    """Train on `batches`, adding to `tally`. Returns False if `should_stop` ended it early.

    The tallied loss is the plain cross-entropy per sample (what test_loss measures too),
    even when the optimised objective adds label smoothing. The host reads the device
    only every few steps (progress, divergence check), never on every step.
    """
    model.train()
    device = tally.loss_sum.device
    layout = memory_format(device, amp_dtype, channels_last)
    eps = label_smoothing
    for images, labels in batches:
        x = images.to(device, non_blocking=True).contiguous(memory_format=layout)
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
        tally.steps += 1
        batch_loss = nll.detach().sum()
        newly_bad = ~torch.isfinite(batch_loss) & (tally.first_bad_step < 0)
        tally.first_bad_step = torch.where(newly_bad, tally.steps, tally.first_bad_step)
        tally.loss_sum += batch_loss
        tally.correct += (logits.detach().argmax(1) == labels).sum()
        tally.seen += labels.shape[0]
        report = tally.steps % _LOSS_REPORT_EVERY == 0 or tally.steps == total_steps
        if report:
            tally.check_finite()
        if on_step is not None:
            on_step(tally.steps, total_steps, tally.loss_sum.item() / tally.seen if report else None)
        if should_stop is not None and should_stop():
            tally.check_finite()
            return tally.steps == total_steps
    tally.check_finite()
    return True


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
    """One pass over `batches`; returns the per-sample mean loss and accuracy."""
    tally = Tally.zeros(device)
    train_steps(
        model, optimizer, scheduler, batches, tally, steps, label_smoothing, amp_dtype, channels_last, on_step
    )
    return tally.result()


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
    layout = memory_format(images.device, amp_dtype, channels_last)
    outputs = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size], mean, std)
            views = _tta_views(x, tta)
            with _autocast(images.device, amp_dtype):
                logits = [model(v.contiguous(memory_format=layout)).float() for v in views]
            outputs.append(torch.stack(logits).mean(0))
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-sample mean cross-entropy and accuracy of logits against labels."""
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return {"loss": loss, "acc": accuracy}


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream): epochs need no saved RNG state."""
    return (seed * 1_000_003 + epoch * 7_919 + stream) % 2**63


@dataclass
class PartialEpoch:
    """Where an epoch stopped on request: enough to finish it exactly as if never stopped."""

    epoch: int
    order: torch.Tensor
    tally: Tally
    augment_generator: torch.Generator
    started_s: float  # training seconds already spent in this epoch


class Trainer:
    """One training run: model, optimizer, LR schedule and random streams.

    `epochs()` yields one flat metrics record per epoch; `state()`/`load_state()` capture
    everything needed to continue bit-for-bit, between epochs or in the middle of one.
    The splits must already be on the training device.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Split,
        test: Split,
        config: TrainConfig,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        validation: Split | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.train, self.test, self.validation = model, train, test, validation
        self.config, self.mean, self.std, self.amp_dtype = config, mean, std, amp_dtype
        self.device = train.images.device
        self.steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
        self.optimizer = make_optimizer(model, config)
        self.lr_factor = one_cycle(self.steps_per_epoch * config.epochs, config.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.forward_model = cast(nn.Module, torch.compile(model)) if config.compile else model
        self.epoch = 0  # completed epochs
        self.records: list[dict[str, float]] = []
        self.partial: PartialEpoch | None = None

    # -- training ---------------------------------------------------------------------
    def _batches(self, epoch: int) -> tuple[Iterable[Batch], PartialEpoch | None]:
        config = self.config
        if config.albumentations is not None:
            loader = albumentations_loader(
                self.train,
                config.albumentations,
                config.batch_size,
                config.workers,
                _epoch_seed(config.seed, epoch, 0),
            )
            return ((normalize(x.to(self.device), self.mean, self.std), y) for x, y in loader), None
        partial = self.partial
        if partial is None or partial.epoch != epoch:
            order_generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 1))
            augment_generator = torch.Generator(device=self.device)
            augment_generator.manual_seed(_epoch_seed(config.seed, epoch, 2))
            order = torch.randperm(len(self.train), generator=order_generator).to(self.device)
            partial = PartialEpoch(epoch, order, Tally.zeros(self.device), augment_generator, 0.0)
        batches = device_batches(
            self.train,
            partial.order[partial.tally.seen :],
            config.batch_size,
            self.mean,
            self.std,
            config.augment,
            partial.augment_generator,
        )
        return batches, partial

    def epochs(
        self, on_step: StepCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[dict[str, float]]:
        """Train the remaining epochs. Raises StopRequested when `should_stop` ends one early;
        `state()` then holds the partial epoch (on-device augmentation) or the last whole one.
        """
        config = self.config
        for epoch in range(self.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            # The LR at the epoch's first step, computed as LambdaLR does (also after a resume).
            lr = float(self.scheduler.base_lrs[0]) * self.lr_factor((epoch - 1) * self.steps_per_epoch)
            record: dict[str, float] = {"epoch": epoch, "lr": lr}
            batches, partial = self._batches(epoch)
            tally = partial.tally if partial is not None else Tally.zeros(self.device)
            already = partial.started_s if partial is not None else 0.0
            try:
                finished = train_steps(
                    self.forward_model,
                    self.optimizer,
                    self.scheduler,
                    batches,
                    tally,
                    self.steps_per_epoch,
                    config.label_smoothing,
                    self.amp_dtype,
                    config.channels_last,
                    on_step,
                    should_stop,
                )
            except NonFiniteLoss as error:
                raise TrainingDiverged(
                    f"training diverged: the loss became NaN or infinite at epoch {epoch}, step {error.step}",
                    hint=f"try a lower learning rate (--lr, now {config.lr})",
                ) from None
            if not finished:
                if partial is not None:
                    partial.started_s = already + time.perf_counter() - started
                self.partial = partial
                raise StopRequested
            self.partial = None
            record.update(tally.result())
            train_time = already + time.perf_counter() - started
            evaluated_at = time.perf_counter()
            record.update(self.evaluate())
            record["epoch_time_s"] = round(train_time, 3)
            record["eval_time_s"] = round(time.perf_counter() - evaluated_at, 3)
            self.epoch = epoch
            self.records.append(record)
            yield record

    def evaluate(self) -> dict[str, float]:
        """Per-sample mean loss and accuracy on the test (and validation) split."""
        result: dict[str, float] = {}
        splits = {"test": self.test} | ({"val": self.validation} if self.validation is not None else {})
        for prefix, split in splits.items():
            logits = predict(
                self.model,
                split.images,
                self.mean,
                self.std,
                max(self.config.batch_size, 1024),
                self.amp_dtype,
                channels_last=self.config.channels_last,
            )
            scores = score(logits, split.labels)
            result[f"{prefix}_loss"], result[f"{prefix}_acc"] = scores["loss"], scores["acc"]
        return result

    # -- state --------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able metadata from which `load_state` continues exactly."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        meta: dict[str, Any] = {
            "epoch": self.epoch,
            "records": self.records,
            "optimizer_param_groups": optimizer_state["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "partial": None,
        }
        if self.partial is not None:
            tally = self.partial.tally
            tensors |= {
                "partial.order": self.partial.order,
                "partial.loss_sum": tally.loss_sum,
                "partial.correct": tally.correct,
                "partial.first_bad_step": tally.first_bad_step,
                "partial.augment_rng": self.partial.augment_generator.get_state(),
            }
            meta["partial"] = {
                "epoch": self.partial.epoch,
                "seen": tally.seen,
                "steps": tally.steps,
                "started_s": self.partial.started_s,
            }
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        prefix = "model."
        self.model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer_state: dict[str, Any] = {"state": {}, "param_groups": meta["optimizer_param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch = int(meta["epoch"])
        self.records = list(meta["records"])
        self.partial = None
        partial = meta.get("partial")
        if partial is not None:
            generator = torch.Generator(device=self.device)
            generator.set_state(tensors["partial.augment_rng"])
            tally = Tally(
                tensors["partial.loss_sum"].to(self.device),
                tensors["partial.correct"].to(self.device),
                tensors["partial.first_bad_step"].to(self.device),
                seen=int(partial["seen"]),
                steps=int(partial["steps"]),
            )
            order = tensors["partial.order"].to(self.device)
            self.partial = PartialEpoch(
                int(partial["epoch"]), order, tally, generator, float(partial["started_s"])
            )


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
    """Train for config.epochs from scratch, yielding one metrics record per epoch."""
    yield from Trainer(model, train, test, config, mean, std, validation, amp_dtype).epochs(on_step)
