"""The CAM extractor (forward hooks on the requested layers, the methods of `explain.methods`
applied to what they capture) and guided backpropagation. Autograd starts at the shallowest
requested layer and gradients come from torch.autograd.grad: parameters' .grad stay untouched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from cifarcam.devices import autocast
from cifarcam.errors import UsageError
from cifarcam.explain.fast_path import SplitModel, split_at
from cifarcam.explain.methods import GRADIENT_FREE, METHODS, Evidence, check_methods
from cifarcam.models.resnet import find_layer

MASKED_BATCH_SIZE = 256  # masked copies of one image per forward pass (Score-CAM)


def check_layers(model: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    """The modules named `layers` (duplicates dropped); a UsageError names an unknown one, or
    the classifier, whose output has no spatial map to explain."""
    modules = {name: find_layer(model, name) for name in dict.fromkeys(layers)}
    for name, module in modules.items():
        if isinstance(module, nn.Linear):
            raise UsageError(
                f"layer '{name}' is the classifier: its output has no spatial map to explain; "
                "choose layer1..layer4 or a module inside them (e.g. layer4.1.conv2)"
            )
    return modules


def normalize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, bilinear upsampling to `size`, then min-max to [0, 1] per map; flat maps become 0."""
    maps = F.relu(maps).unsqueeze(1)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).squeeze(1)
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


@dataclass
class CamResult:
    logits: torch.Tensor  # (N, C)
    maps: dict[str, dict[str, dict[str, torch.Tensor]]]  # maps[target][method][layer]: (N, H, W) in [0, 1]


class CamExtractor:
    """`with CamExtractor(model, ["layer4"], ["gradcam"]) as cam: result = cam(x, {"pred": classes})`.

    The model runs in eval mode inside the block; layers and methods share one forward pass and
    one gradient computation per set of targets. On exit the hooks and train/eval state go back."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[str],
        methods: list[str] | None = None,
        amp_dtype: torch.dtype | None = None,
        fast: bool = False,
        compiled: bool = False,
    ) -> None:
        self.methods = check_methods(methods or ["gradcam"])
        # fast: on the CPU in float32, run the layers below the first CAM layer as the folded copy
        # of `fast_path` (the weights must not change in the block); compiled: torch.compile it too.
        self.fast, self.compiled = fast, compiled
        self.amp_dtype = amp_dtype  # autocast for the forward passes; maps are computed in float32
        self.model = model
        self.modules = check_layers(model, layers)
        self.layers = list(self.modules)
        self.needs_gradients = any(name not in GRADIENT_FREE for name in self.methods)
        self._handles: list[RemovableHandle] = []
        self._activations: dict[str, torch.Tensor] = {}
        self._recording = False
        self._cut_graph = False
        self._was_training = model.training
        self._split: SplitModel | None = None

    def __enter__(self) -> CamExtractor:
        self._was_training = self.model.training
        self.model.eval()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        on_cpu = all(p.device.type == "cpu" for p in self.model.parameters())
        if self.fast and self.amp_dtype is None and self.needs_gradients and on_cpu:
            self._split = split_at(self.model, self.layers, self.compiled)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activations.clear()
        self._split = None
        self.model.train(self._was_training)

    def _keeper(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], torch.Tensor]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            if self._recording:
                if self._cut_graph and not torch.is_grad_enabled():
                    # The first requested layer: autograd starts here, nothing below it is differentiated.
                    output = output.detach().requires_grad_(True)
                    torch.set_grad_enabled(True)
                self._activations[name] = output
            return output

        return hook

    def _forward(self, x: torch.Tensor, cut_graph: bool) -> torch.Tensor:
        split = self._split if cut_graph else None
        self._recording, self._cut_graph = True, cut_graph and split is None
        try:
            if split is not None:
                with torch.no_grad():
                    below = split.below(x.contiguous(memory_format=torch.channels_last))
                # The first layer's output, from the folded copy: autograd starts here.
                self._activations[split.cut] = below.requires_grad_(True)
                with torch.enable_grad():
                    return split.above(below).float()
            with autocast(x.device, self.amp_dtype):
                if cut_graph:
                    with torch.no_grad():
                        return self.model(x).float()
                with torch.set_grad_enabled(self.needs_gradients):
                    return self.model(x).float()
        finally:
            self._recording = False

    def _masked_logits(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Logits for every image times every mask: (N, K, H, W) masks -> (N, K, C)."""
        outputs = []
        with torch.no_grad(), autocast(x.device, self.amp_dtype):
            for image, image_masks in zip(x, masks, strict=True):
                masked = image.unsqueeze(0) * image_masks.unsqueeze(1)  # (K, 3, H, W)
                chunks = [self.model(chunk).float() for chunk in masked.split(MASKED_BATCH_SIZE)]
                outputs.append(torch.cat(chunks))
        return torch.stack(outputs)

    def __call__(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> CamResult:
        """Logits and maps[target][method][layer] for each named set of target classes (N,)."""
        size = (x.shape[2], x.shape[3])
        logits = self._forward(x, cut_graph=self.needs_gradients)
        activations = [self._activations[name] for name in self.layers]
        if self.needs_gradients and not all(a.requires_grad for a in activations):
            # Layers on parallel branches (a block's conv1 and its shortcut): differentiate from the input.
            logits = self._forward(x, cut_graph=False)
            activations = [self._activations[name] for name in self.layers]
        self._activations.clear()
        masked_cache: dict[str, torch.Tensor] = {}

        def masked_logits(layer: str, masks: torch.Tensor) -> torch.Tensor:
            if layer not in masked_cache:  # a layer's masks are the same for every target
                masked_cache[layer] = self._masked_logits(x.detach(), masks)
            return masked_cache[layer]

        maps: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for position, (target_name, classes) in enumerate(targets.items()):
            gradients: list[torch.Tensor | None] = [None] * len(activations)
            if self.needs_gradients:
                scores = logits.gather(1, classes.view(-1, 1)).sum()
                more = position < len(targets) - 1
                gradients = list(torch.autograd.grad(scores, activations, retain_graph=more))
            maps[target_name] = {method: {} for method in self.methods}
            for layer, acts, grads in zip(self.layers, activations, gradients, strict=True):
                grads = grads.float() if grads is not None else None
                evidence = Evidence(
                    acts.detach().float(), grads, classes, size, partial(masked_logits, layer)
                )
                for method in self.methods:
                    maps[target_name][method][layer] = normalize_maps(METHODS[method](evidence), size)
        return CamResult(logits.detach(), maps)


class _GuidedRelu(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through (ReLU's own backward
    then keeps only positive inputs): guided backpropagation (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx: object, output: torch.Tensor) -> torch.Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp_min(0)


def guided_backprop(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Guided-backpropagation gradients of the target logits with respect to the input: (N, 3, H, W)."""

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return _GuidedRelu.apply(output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = x.detach().requires_grad_(True)
            scores = model(inputs).gather(1, classes.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(scores, inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return gradients


def guided_grad_cam(guided: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM: guided-backpropagation gradients times the (normalised) Grad-CAM map."""
    return guided * maps.unsqueeze(1)
