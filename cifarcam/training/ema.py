"""Weight averaging: an exponential moving average (EMA) of a model's weights over the last part
of training, kept in a copy of the model that evaluation and checkpoints use once it starts."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """After each optimizer step from `start_step` on: average = decay * average + (1 - decay) *
    weights. The first averaged step copies the weights. Floating buffers (BatchNorm running
    statistics) are averaged the same way; integer ones (batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float, start_step: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay, self.start_step = decay, start_step
        self.model = copy.deepcopy(model)
        self.started = False
        # State-dict tensors alias the live storage: updating them updates the models.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        self._pairs = pairs
        self._float_targets = [t for t, _ in pairs if t.is_floating_point()]
        self._float_sources = [s for t, s in pairs if t.is_floating_point()]
        self._counters = [(t, s) for t, s in pairs if not t.is_floating_point()]

    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based, counted over the whole run)."""
        if step < self.start_step:
            return
        with torch.no_grad():
            if not self.started:
                for target, source in self._pairs:
                    target.copy_(source)
                self.started = True
                return
            torch._foreach_lerp_(self._float_targets, self._float_sources, 1.0 - self.decay)
            for target, source in self._counters:
                target.copy_(source)

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by state-dict name (empty before the first averaged step)."""
        return dict(self.model.state_dict()) if self.started else {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned; an empty dict means averaging has not started."""
        self.started = bool(tensors)
        if tensors:
            self.model.load_state_dict(tensors)
