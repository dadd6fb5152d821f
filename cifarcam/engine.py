"""Training and inference loops. They return plain dicts; the caller decides what to write."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from cifarcam.augment import augment_batch
from cifarcam.config import AugmentConfig, DeviceName, TrainConfig
from cifarcam.convgrad import gemm_weight_grads
from cifarcam.data import Split, normalize
from cifarcam.distributed import SINGLE, Group
from cifarcam.errors import UsageError
from cifarcam.models import scoring_model
from cifarcam.precision import FP16_LOSS_SCALE, autocast, cudnn_autotune, memory_format

StepCallback = Callable[[int, int, float | None], None]  # (step, steps, running loss or None)
Tta = Literal["none", "flip", "flip-translate"]
_LOSS_REPORT_EVERY = 20  # steps between host syncs that refresh the progress bar's loss


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
    """Batches cut from the in-memory dataset in `order` and augmented on its device.

    With several ranks, every rank cuts the same global batch and keeps its rows of it; the
    augmentation draws are those of the whole batch, so the images are the same as in one process.
    """
    for start in range(0, len(order), batch_size):
        batch_idx = order[start : start + batch_size]
        if not group.distributed:
            x = augment_batch(normalize(train.images[batch_idx], mean, std), augment, generator)
            yield Batch(x, train.labels[batch_idx])
            continue
        rows = group.rows(len(batch_idx))
        scale = group.world_size / len(batch_idx)
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

    With several ranks, `should_stop` must answer the same on every rank (a collective), and
    the divergence checks are collectives too, so all ranks stop at the same step.

    The tallied loss is the plain cross-entropy per sample (what test_loss measures too),
    even when the optimised objective adds label smoothing. The host reads the device
    only every few steps (progress, divergence check), never on every step.

    `gemm_weight_grad`: on the CPU in bf16, compute the weight gradients of convolutions with
    small output maps as one GEMM each (cifarcam.convgrad); leave it off for a compiled model.

    `autotune_rows`: only batches of this many rows (the full ones) may use cuDNN's benchmark
    mode (`cudnn_autotune`); None: every batch may.
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
                _divide_gradients(optimizer, scale)
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


def _divide_gradients(optimizer: torch.optim.Optimizer, divisor: float) -> None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch._foreach_div_(grads, divisor)


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
    gemm_weight_grad: bool = True,
) -> dict[str, float]:
    """One pass over `batches`; returns the per-sample mean loss and accuracy."""
    tally = Tally.zeros(device)
    train_steps(
        model,
        optimizer,
        scheduler,
        batches,
        tally,
        steps,
        label_smoothing,
        amp_dtype,
        channels_last,
        on_step,
        gemm_weight_grad=gemm_weight_grad,
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


def inference_batch_size(device: torch.device) -> int:
    """Images per forward pass when only predicting: 1024 on a GPU, 128 on a CPU.

    On the CPU smaller batches keep the activations in cache: bf16 ResNet18 forward passes ran
    2.2x (width 16) and 1.2x (width 64) faster at 128 than at 1024 on the 2-core development
    machine (benchmarks/inference_batch.py; benchmarks/RESULTS.md)."""
    return 128 if device.type == "cpu" else 1024


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    tta: Tta = "none",
    channels_last: bool = True,
    fold: bool = True,
    plain_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits (N, classes) for uint8 images (N, 3, H, W), averaged over the TTA views.

    `batch_size` None: `inference_batch_size` of the images' device. A short last chunk runs
    without cuDNN's benchmark mode (`cudnn_autotune`). With `fold`, a BatchNorm ResNet runs as a
    folded copy (`models.scoring_model`): the same logits up to rounding, sooner.
    `plain_logits`: this model's logits for the images as they are (N, classes), already
    computed; they stand in for the first TTA view instead of scoring it again."""
    batch_size = batch_size or inference_batch_size(images.device)
    was_training = model.training
    model.eval()
    layout = memory_format(channels_last)
    outputs = []
    try:
        runner = scoring_model(model, layout) if fold else model
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size], mean, std)
            views = _tta_views(x, tta)
            known = []
            if plain_logits is not None:  # the first view is the images as they are
                known = [plain_logits[start : start + batch_size].to(images.device, torch.float32)]
                views = views[1:]
            with autocast(images.device, amp_dtype), cudnn_autotune(x.shape[0] == batch_size):
                logits = known + [runner(v.contiguous(memory_format=layout)).float() for v in views]
            outputs.append(torch.stack(logits).mean(0))
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def score_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [summed cross-entropy, correct predictions, count]: what ranks add up to score a split."""
    if len(labels) == 0:
        return torch.zeros(3, dtype=torch.float64, device=labels.device)
    loss = F.cross_entropy(logits.double(), labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum().double()
    return torch.stack([loss, correct, torch.tensor(float(len(labels)), device=logits.device).double()])


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-sample mean cross-entropy and accuracy of logits against labels."""
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / len(labels)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return {"loss": loss, "acc": accuracy}
