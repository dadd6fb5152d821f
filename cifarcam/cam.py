"""Class activation maps as a context manager whose hooks are removed on exit.

A method is only a weighting function: given a layer's activations A (N,K,h,w) and the
gradients dY/dA of the target class scores, it returns the map before ReLU (N,h,w).
Gradients are taken with torch.autograd.grad with respect to the layer outputs, so the
parameters' .grad fields are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from cifarcam.errors import UsageError
from cifarcam.models import find_layer

CamMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return (weights * activations).sum(dim=1)


METHODS: dict[str, CamMethod] = {"gradcam": grad_cam}


def normalize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, bilinear upsampling to `size`, then min-max to [0, 1] per map; flat maps become 0."""
    maps = F.relu(maps).unsqueeze(1)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


class CamExtractor:
    """`with CamExtractor(model, ["layer4"]) as cam: maps = cam(x, targets)`.

    Runs the model in eval mode while inside the block and restores its train/eval state
    and removes every hook on exit.
    """

    def __init__(self, model: nn.Module, layers: list[str], method: str = "gradcam") -> None:
        if method not in METHODS:
            raise UsageError(f"unknown CAM method '{method}'; choose one of: {', '.join(METHODS)}")
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.modules = {name: find_layer(model, name) for name in self.layers}
        self.method = METHODS[method]
        self._handles: list[RemovableHandle] = []
        self._activations: dict[str, torch.Tensor] = {}
        self._was_training = model.training

    def __enter__(self) -> CamExtractor:
        self._was_training = self.model.training
        self.model.eval()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activations.clear()
        self.model.train(self._was_training)

    def _keeper(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._activations[name] = output

        return hook

    def __call__(
        self, x: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        """Logits and maps[target_name][layer] (N, H, W) in [0, 1] for each set of class targets."""
        if not self._handles:
            raise RuntimeError("CamExtractor must be used inside a 'with' block")
        with torch.enable_grad():
            logits = self.model(x)
            activations = [self._activations[name] for name in self.layers]
            maps: dict[str, dict[str, torch.Tensor]] = {}
            for position, (target_name, classes) in enumerate(targets.items()):
                scores = logits.gather(1, classes.view(-1, 1)).sum()
                gradients = torch.autograd.grad(scores, activations, retain_graph=position < len(targets) - 1)
                maps[target_name] = {
                    name: normalize_maps(self.method(acts.detach(), grads), (x.shape[2], x.shape[3]))
                    for name, acts, grads in zip(self.layers, activations, gradients, strict=True)
                }
        self._activations.clear()
        return logits.detach(), maps
