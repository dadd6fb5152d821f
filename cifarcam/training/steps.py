"""The training steps: the optimizer and its one-cycle schedule, the batches cut from the dataset
on its device, and the loop over them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cifarcam.config import AugmentConfig, TrainConfig
from cifarcam.data.augment import augment_batch
from cifarcam.data.datasets import Split, normalize
from cifarcam.devices import FP16_LOSS_SCALE, autocast, cudnn_autotune, memory_format
from cifarcam.training.conv_weight_grad import gemm_weight_grads
from cifarcam.training.distributed import SINGLE, Group

StepCallback = Callable[[int, int, float | None], None]  # (step, steps, running loss or None)
_LOSS_REPORT_EVERY = 20  # steps between host syncs that refresh the progress bar's loss


def one_cycle(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear rise from 0.1 to 1 over `warmup` of the steps, then linear to 0."""
    peak = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < peak:
            return 0.1 + 0.9 * step / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return factor


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Nesterov SGD; BatchNorm weights and all biases skip weight decay unless configured."""
    decayed = [p for p in model.parameters() if p.ndim > 1 or config.decay_norm_and_bias]
    exempt = [p for p in model.parameters() if not (p.ndim > 1 or config.decay_norm_and_bias)]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        foreach=True,
    )


class Batch(NamedTuple):
    images: torch.Tensor  # normalised float images (N, C, H, W)
    labels: torch.Tensor  # int64
    # Set when this is one rank's share of a global batch: world size / global batch size. The
    # rank's loss is then its per-sample sum times this, so the gradients DDP averages add up
    # to the gradient of the mean over the global batch, however unevenly it was split.
    # 0.0 marks a stand-in: a rank whose share is empty trains on the batch's first image with
    # weight 0, so that it still takes part in the gradient all-reduce; it is not tallied.
    loss_scale: float | None = None


def device_batches(
    train: Split,
    order: torch.Tensor,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: AugmentConfig,
    generator: torch.Generator,
    group: Group = SINGLE,
) -> Iterator[Batch]:
    """Batches cut from the in-memory dataset in `order` and augmented on its device. With several
    ranks, each keeps its rows of every global batch, augmented as in one process."""
    for start in range(0, len(order), batch_size):
        batch_idx = order[start : start + batch_size]
        rows = group.rows(len(batch_idx))
        scale = group.world_size / len(batch_idx) if group.distributed else None
        if rows.start == rows.stop:
            rows, scale = slice(0, 1), 0.0
        mine = batch_idx[rows]
        x = augment_batch(normalize(train.images[mine], mean, std), augment, generator, rows, len(batch_idx))
        yield Batch(x, train.labels[mine], scale)


class NonFiniteLoss(Exception):
    """Raised by `train_steps` when a batch loss is NaN or infinite; `step` is 1-based."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


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

    def check_finite(self, group: Group = SINGLE) -> None:
        """Raise NonFiniteLoss on every rank if any rank's loss was not finite (a collective)."""
        bad = int(group.first_bad_step(self.first_bad_step).item())
        if bad >= 0:
            raise NonFiniteLoss(bad)

    def reduced(self, group: Group) -> Tally:
        """The sums over all ranks (each rank tallies its own share of every batch)."""
        if not group.distributed:
            return self
        seen = torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss_sum.device)
        sums = group.all_sum(torch.stack([self.loss_sum, self.correct.double(), seen]))
        return Tally(
            sums[0].clone(),
            sums[1].round().long(),
            group.first_bad_step(self.first_bad_step),
            seen=round(sums[2].item()),
            steps=self.steps,
        )

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
    group: Group = SINGLE,
    gemm_weight_grad: bool = True,
    autotune_rows: int | None = None,
) -> bool:
    """Train on `batches`, adding to `tally`. Returns False if `should_stop` ended it early.

    With several ranks, `should_stop` and the divergence checks are collectives, so all ranks stop
    at the same step. The tallied loss is the plain cross-entropy per sample (what test_loss
    measures), even under label smoothing; the host reads the device only every few steps.

    `gemm_weight_grad`: on the CPU in bf16, small-map convolution weight gradients as one GEMM
    each (`conv_weight_grad`); leave it off for a compiled model. `autotune_rows`: only batches of
    this many rows (the full ones) may use cuDNN's benchmark mode; None: every batch may.
    """
    model.train()
    device = tally.loss_sum.device
    layout = memory_format(channels_last)
    fast_grads = gemm_weight_grads(device, amp_dtype) if gemm_weight_grad else contextlib.nullcontext()
    eps = label_smoothing
    scale = FP16_LOSS_SCALE if amp_dtype == torch.float16 else None
    for images, labels, loss_scale in batches:
        x = images.to(device, non_blocking=True).contiguous(memory_format=layout)
        labels = labels.to(device, non_blocking=True)
        with cudnn_autotune(autotune_rows in (None, x.shape[0])):
            with autocast(device, amp_dtype), fast_grads:
                logits = model(x)
            log_probs = F.log_softmax(logits.float(), dim=1)
            nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
            objective = (1 - eps) * nll - eps * log_probs.mean(dim=1) if eps else nll
            optimizer.zero_grad(set_to_none=True)
            loss = objective.mean() if loss_scale is None else objective.sum() * loss_scale
            if scale is None:
                loss.backward()
            else:
                (loss * scale).backward()
                grads = [p.grad for pg in optimizer.param_groups for p in pg["params"] if p.grad is not None]
                torch._foreach_div_(grads, scale)
        optimizer.step()
        scheduler.step()
        tally.steps += 1
        batch_loss = nll.detach().sum()
        newly_bad = ~torch.isfinite(batch_loss) & (tally.first_bad_step < 0)
        tally.first_bad_step = torch.where(newly_bad, tally.steps, tally.first_bad_step)
        if loss_scale != 0.0:
            tally.loss_sum += batch_loss
            tally.correct += (logits.detach().argmax(1) == labels).sum()
            tally.seen += labels.shape[0]
        report = tally.steps % _LOSS_REPORT_EVERY == 0 or tally.steps == total_steps
        if report:
            tally.check_finite(group)
        if on_step is not None:
            on_step(tally.steps, total_steps, tally.loss_sum.item() / max(1, tally.seen) if report else None)
        if should_stop is not None and should_stop():
            tally.check_finite(group)
            return tally.steps == total_steps
    tally.check_finite(group)
    return True


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[Batch],
    steps: int,
    device: torch.device,
    *options: Any,
    **keyword_options: Any,
) -> dict[str, float]:
    """torchvision's `train_one_epoch`: one pass over `batches`, returning the per-sample mean loss
    and accuracy; `options` are those of `train_steps` after its `total_steps`."""
    tally = Tally.zeros(device)
    train_steps(model, optimizer, scheduler, batches, tally, steps, *options, **keyword_options)
    return tally.result()
