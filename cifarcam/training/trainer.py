"""The Trainer: one training run's optimizer, LR schedule and random streams, with a state
that can be saved and restored exactly (between epochs or in the middle of one)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cifarcam.config import TrainConfig, batch_and_lr
from cifarcam.data.albumentations import albumentations_batches
from cifarcam.data.datasets import Split, normalize
from cifarcam.errors import TrainingDiverged
from cifarcam.evaluation.inference import predict, score, score_sums
from cifarcam.training.cuda_graphs import GraphedTraining
from cifarcam.training.distributed import SINGLE, Group
from cifarcam.training.steps import (
    Batch,
    NonFiniteLoss,
    StepCallback,
    Tally,
    device_batches,
    make_optimizer,
    one_cycle,
    train_steps,
)


class StopRequested(Exception):
    """Raised by `Trainer.epochs` when `should_stop` asked for a stop in the middle of an epoch."""


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose names start with `prefix`, without it."""
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream): epochs need no saved RNG state."""
    return (seed * 1_000_003 + epoch * 7_919 + stream) % 2**63


def epoch_order(count: int, per_epoch: int, seed: int, epoch: int) -> torch.Tensor:
    """The training indices of `epoch` (1-based): positions (epoch-1)*per_epoch onwards of a stream of
    seeded shuffles of range(count). Each image comes once per shuffle, so shorter epochs go through
    all of them in turn; with per_epoch == count, epoch e is exactly shuffle e."""
    start = (epoch - 1) * per_epoch
    passes = range(start // count, (start + per_epoch - 1) // count + 1)
    shuffles = [
        torch.randperm(count, generator=torch.Generator().manual_seed(_epoch_seed(seed, p + 1, 1)))
        for p in passes
    ]
    offset = start - passes[0] * count
    return torch.cat(shuffles)[offset : offset + per_epoch]


@dataclass
class PartialEpoch:
    """Where an epoch stopped on request: enough to finish it exactly as if never stopped."""

    epoch: int
    order: torch.Tensor
    tally: Tally
    augment_generator: torch.Generator
    started_s: float  # training seconds already spent in this epoch


class Trainer:
    """One training run: model, optimizer, LR schedule and random streams, over splits already on
    the training device. `epochs()` yields one flat metrics record per epoch; `state()` and
    `load_state()` continue bit-for-bit, between epochs or in the middle of one.

    With a `group` of several ranks (torchrun), every rank holds the whole dataset, draws the
    same order and augmentation, and trains on its rows of each global batch through
    DistributedDataParallel; metrics are summed over the ranks. `model` stays the plain module.
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
        group: Group = SINGLE,
    ) -> None:
        self.model, self.train, self.test, self.validation = model, train, test, validation
        self.group = group
        self.config, self.mean, self.std, self.amp_dtype = config, mean, std, amp_dtype
        self.device = train.images.device
        self.epoch_images = min(config.epoch_images or len(train), len(train))
        self.batch_size, self.lr = batch_and_lr(config, len(train))
        self.steps_per_epoch = (self.epoch_images + self.batch_size - 1) // self.batch_size
        rows = group.rows(self.batch_size)
        self.full_batch_rows = rows.stop - rows.start  # this rank's share of a full batch
        self.optimizer = make_optimizer(model, config, self.lr)
        self.lr_factor = one_cycle(self.steps_per_epoch * config.epochs, config.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.forward_model: nn.Module = model  # what the steps call: `model`, or DDP or CUDA graphs on it
        if group.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        elif config.cuda_graphs and self.device.type == "cuda":
            self.forward_model = GraphedTraining(model, self.batch_size, amp_dtype)
        self.epoch = 0  # completed epochs
        self.records: list[dict[str, float]] = []
        self.partial: PartialEpoch | None = None
        # The latest `evaluate`'s test logits, for the run's cache (None under torchrun: ranks score shares)
        self.test_logits: torch.Tensor | None = None

    def _batches(self, epoch: int) -> tuple[Iterable[Batch], PartialEpoch | None]:
        config = self.config
        if config.albumentations is not None:
            loader = albumentations_batches(
                self.train,
                epoch_order(len(self.train), self.epoch_images, config.seed, epoch),
                config.albumentations,
                self.batch_size,
                config.workers,
                _epoch_seed(config.seed, epoch, 0),
            )
            return (Batch(normalize(x.to(self.device), self.mean, self.std), y) for x, y in loader), None
        partial = self.partial
        if partial is None or partial.epoch != epoch:
            augment_generator = torch.Generator(device=self.device)
            augment_generator.manual_seed(_epoch_seed(config.seed, epoch, 2))
            order = epoch_order(len(self.train), self.epoch_images, config.seed, epoch).to(self.device)
            partial = PartialEpoch(epoch, order, Tally.zeros(self.device), augment_generator, 0.0)
        batches = device_batches(
            self.train,
            partial.order[partial.tally.steps * self.batch_size :],
            self.batch_size,
            self.mean,
            self.std,
            config.augment,
            partial.augment_generator,
            self.group,
        )
        return batches, partial

    def epochs(
        self, on_step: StepCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[dict[str, float]]:
        """Train the remaining epochs. Raises StopRequested when `should_stop` (which must answer
        the same on every rank) ends one early; `state()` then holds the partial epoch (on-device
        augmentation) or the last whole one."""
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            # A stop asked for during the last step of an epoch (every step, with one-step
            # epochs), while it was scored and saved, or before a resumed run's first step
            if should_stop is not None and should_stop():
                raise StopRequested
            # The LR at the epoch's first step, computed as LambdaLR does (also after a resume).
            lr = float(self.scheduler.base_lrs[0]) * self.lr_factor((epoch - 1) * self.steps_per_epoch)
            train_metrics, train_time = self._train_epoch(epoch, on_step, should_stop)
            evaluated_at = time.perf_counter()
            record: dict[str, float] = {"epoch": epoch, "lr": lr, **train_metrics, **self.evaluate()}
            if not all(math.isfinite(value) for value in record.values()):
                # the training loss stayed finite, but the weights or BatchNorm statistics did not
                raise TrainingDiverged(
                    f"training diverged: the model's test loss is NaN or infinite after epoch {epoch}",
                    hint=f"try a lower learning rate (--lr, now {self.lr:g})",
                )
            record["epoch_time_s"] = round(train_time, 3)
            record["eval_time_s"] = round(time.perf_counter() - evaluated_at, 3)
            self.epoch = epoch
            self.records.append(record)
            yield record

    def _train_epoch(
        self, epoch: int, on_step: StepCallback | None, should_stop: Callable[[], bool] | None
    ) -> tuple[dict[str, float], float]:
        """The training loss and accuracy of `epoch` and its training seconds, both from its start
        when it continues a stopped one; StopRequested when `should_stop` ends it early."""
        config, group = self.config, self.group
        started = time.perf_counter()
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
                group,
                autotune_rows=self.full_batch_rows,
            )
        except NonFiniteLoss as error:
            raise TrainingDiverged(
                f"training diverged: the loss became NaN or infinite at epoch {epoch}, step {error.step}",
                hint=f"try a lower learning rate (--lr, now {self.lr:g})"
                + (" or --precision bf16" if self.amp_dtype == torch.float16 else ""),
            ) from None
        if not finished:
            if partial is not None:
                partial.started_s = already + time.perf_counter() - started
                partial.tally = partial.tally.reduced(group)  # what rank 0 saves
            self.partial = partial
            raise StopRequested
        self.partial = None
        return tally.reduced(group).result(), already + time.perf_counter() - started

    def evaluate(self) -> dict[str, float]:
        """Per-sample mean loss and accuracy on the test (and validation) split."""
        result: dict[str, float] = {}
        splits = {"test": self.test} | ({"val": self.validation} if self.validation is not None else {})
        group, model = self.group, self.model
        group.broadcast_buffers(model)  # every rank scores rank 0's model, the one saved
        for prefix, split in splits.items():
            rows = group.rows(len(split))
            logits = predict(
                model,
                split.images[rows],
                self.mean,
                self.std,
                amp_dtype=self.amp_dtype,
                channels_last=self.config.channels_last,
            )
            if group.distributed:
                loss_sum, correct, count = group.all_sum(score_sums(logits, split.labels[rows])).tolist()
                scores = {"loss": loss_sum / count, "acc": correct / count}
            else:
                scores = score(logits, split.labels)
                if prefix == "test":
                    self.test_logits = logits
            result[f"{prefix}_loss"], result[f"{prefix}_acc"] = scores["loss"], scores["acc"]
        return result

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
        self.model.load_state_dict(_prefixed(tensors, "model."))
        optimizer_state: dict[str, Any] = {"state": {}, "param_groups": meta["optimizer_param_groups"]}
        for key, value in _prefixed(tensors, "optimizer.").items():
            index, name = key.split(".", 1)
            optimizer_state["state"].setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch = int(meta["epoch"])
        self.records = list(meta["records"])
        self.partial = None
        self.test_logits = None  # nothing scored since the state was loaded
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
            if not self.group.is_main:  # rank 0 holds the sums of all ranks so far
                tally = Tally(tally.loss_sum * 0, tally.correct * 0, tally.first_bad_step, 0, tally.steps)
            order = tensors["partial.order"].to(self.device)
            self.partial = PartialEpoch(
                int(partial["epoch"]), order, tally, generator, float(partial["started_s"])
            )
