"""BatchNorm folded into the preceding convolutions: a copy of a trained model that scores
images sooner with the same logits up to rounding."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from cifarcam.models.resnet import ResNet


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of `module` (in eval mode, traceable by torch.fx) with every BatchNorm
    that follows a convolution folded into that convolution's weights and bias. It computes the
    same function up to rounding with fewer passes over memory; later weight changes do not
    reach it, and the originals' hooks are dropped (they would fire on the copy's modules)."""
    folded = fuse(module).eval()
    for part in folded.modules():
        part._forward_hooks.clear()
        part._forward_pre_hooks.clear()
        part._backward_hooks.clear()
    return folded


def scoring_model(model: nn.Module, layout: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """What scores `model` (in eval mode): for a BatchNorm ResNet, `fold_batchnorm`'s copy in `layout`
    (1.2-1.6x the images/s in bf16 on a 2-core Xeon; benchmarks/fold_eval.py); any other model as it
    is, since tracing could drop what its forward does besides computing its output."""
    batch_norm = any(isinstance(part, nn.BatchNorm2d) for part in model.modules())
    if isinstance(model, ResNet) and batch_norm and not model.training:
        return fold_batchnorm(model).to(memory_format=layout)
    return model
