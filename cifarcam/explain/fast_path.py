"""A model cut in two at a CAM layer. The part below is never differentiated, so it runs as a
BatchNorm-folded channels_last copy (about 0.8x the model's time on a 2-core Xeon), compiled
with frozen weights for many images (0.6x); the part above is the model's own, whose hooks fire."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from cifarcam.models.folding import fold_batchnorm


@dataclass(frozen=True)
class SplitModel:
    """`below(x)` gives the output of layer `cut`; `above(output)` gives the logits from it."""

    cut: str  # the requested layer that runs first
    # a folded, channels_last copy (compiled when asked): later weight changes do not reach it
    below: Callable[[torch.Tensor], torch.Tensor]
    above: nn.Module  # the model's own modules from the cut up (their hooks fire)


class _KeepLayers(fx.Tracer):
    """Traces through every module except the named ones, which stay single graph nodes."""

    def __init__(self, layers: set[str]) -> None:
        super().__init__()
        self.layers = layers

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.layers or super().is_leaf_module(module, qualified_name)


def split_at(model: nn.Module, layers: list[str], compiled: bool = False) -> SplitModel | None:
    """Split `model` (in eval mode) at the output of the first of `layers` to run; None when
    torch.fx cannot trace it, a layer lies inside another, anything besides that output crosses
    the cut (a skip connection, a requested layer on a parallel branch), or the part above the
    cut is not `_is_linear_head`. `compiled`: run the folded part through `CompiledBelow`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _KeepLayers(set(layers)).trace(model)
    except Exception:  # any model torch.fx cannot trace takes the plain path
        return None
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    found = {str(n.target): position[n] for n in nodes if n.op == "call_module" and n.target in layers}
    if len(found) != len(set(layers)):
        return None  # a requested layer inside another requested layer
    cut = min(found, key=found.__getitem__)
    cut_at = found[cut]
    crossing = {
        arg for node in nodes[cut_at + 1 :] for arg in node.all_input_nodes if position[arg] <= cut_at
    }
    if crossing != {nodes[cut_at]}:
        return None
    parts = split_module(
        fx.GraphModule(model, graph), model, lambda node: 0 if position[node] <= cut_at else 1
    )
    below, above = getattr(parts, "submod_0", None), getattr(parts, "submod_1", None)
    if not isinstance(below, nn.Module) or not isinstance(above, nn.Module):
        return None  # the cut layer gives the output: nothing above it
    if not _is_linear_head(above):
        return None
    folded = fold_batchnorm(below).to(memory_format=torch.channels_last)
    return SplitModel(cut, CompiledBelow(folded) if compiled else folded, above)


_LINEAR_MODULES = (nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_LINEAR_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.linear, torch.flatten, torch.mean}
_LINEAR_METHODS = {"flatten", "view", "reshape", "mean", "contiguous"}


def _is_linear_head(above: nn.Module) -> bool:
    """True when everything above the cut is linear in the cut layer's output (pooling, flatten,
    the classifier): its gradient then does not depend on that output, so the folded copy's
    rounding differences cannot flip a ReLU above the cut and change a map by more than rounding.
    Measured with a nonlinear part above the cut (layer3 of a ResNet18, whose layer4 has ReLUs):
    11 of 2,560 Grad-CAM maps moved by more than 1e-4, the largest by 7.6e-3.
    """
    if not isinstance(above, fx.GraphModule):
        return False
    for node in above.graph.nodes:
        module = above.get_submodule(str(node.target)) if node.op == "call_module" else None
        if module is not None and not isinstance(module, _LINEAR_MODULES):
            return False
        if node.op == "call_function" and node.target not in _LINEAR_FUNCTIONS:
            return False
        if node.op == "call_method" and node.target not in _LINEAR_METHODS:
            return False
    return True


class CompiledBelow:
    """`below` through torch.compile (inductor, weights frozen as constants) for batches of the
    first shape it sees; other shapes (a last, smaller batch) run `below` as it is, and so does
    everything after a failed compile (no C compiler, say): same results, only slower.
    """

    def __init__(self, below: nn.Module) -> None:
        self.below = below
        self.compiled = torch.compile(below, dynamic=False, options={"freezing": True})
        self.shape: torch.Size | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape is not None and x.shape == self.shape:
            return self.compiled(x)
        if self.failed or self.shape is not None:
            return self.below(x)
        # torch logs a warning about CUDA_HOME while it compiles on a machine without CUDA
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            out = self.compiled(x)
        except Exception:  # the compile failed: stay with the folded copy
            self.failed = True
            return self.below(x)
        finally:
            quiet.setLevel(level)
        self.shape = x.shape
        return out
