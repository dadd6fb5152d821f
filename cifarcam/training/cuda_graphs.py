"""CUDA graphs for the training step: the forward and backward pass of full batches replayed
from one capture, so a step costs a few launches instead of hundreds."""

from __future__ import annotations

import torch
from torch import nn

from cifarcam.devices import autocast


class GraphedTraining(nn.Module):
    """Runs `model`'s training forward (and, through autograd, its backward) from CUDA graphs for
    batches of `batch_size` images; other batch sizes, and eval mode, run eagerly. The graphs are
    captured from the first full batch. Parameters and buffers stay `model`'s own tensors, so the
    optimizer, checkpoints and evaluation see the same weights; the BatchNorm statistics the
    capture's warm-up passes move are put back. `amp_dtype`: the training step's autocast dtype."""

    def __init__(self, model: nn.Module, batch_size: int, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.eager = model.forward
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.captured = False

    def _capture(self, sample: torch.Tensor) -> None:
        model = self.model
        saved = {name: value.clone() for name, value in model.state_dict().items()}
        # Autocast's weight cache cannot live across graph replays (make_graphed_callables' rule).
        with autocast(sample.device, self.amp_dtype, cache_enabled=False):
            # A copy: the graph's static input is overwritten by every later batch.
            torch.cuda.make_graphed_callables(model, (sample.detach().clone(),))
        with torch.no_grad():
            for name, value in model.state_dict().items():
                value.copy_(saved[name])  # in place: the captured addresses stay valid
        self.captured = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cuda" or x.shape[0] != self.batch_size:
            return self.eager(x)
        if not self.captured:
            self._capture(x)
        return self.model(x)  # the graphed forward (make_graphed_callables replaced it)
