"""The CIFAR ResNet family (3x3 stem, no max-pool, layer1..layer4, `linear` head)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from cifarcam.errors import UsageError

BLOCKS_PER_STAGE = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
Norm = Callable[[int], nn.Module]


def norm_layer(name: str) -> Norm:
    """BatchNorm2d, or GroupNorm with groups of 8 channels (gcd(channels, 8) otherwise): several
    channels per group keep it well conditioned on layer4's 4x4 maps, where one per group
    (instance norm) turns a near-constant channel's rounding into noise."""
    if name == "group":
        return lambda channels: nn.GroupNorm(channels // math.gcd(channels, 8), channels)
    return nn.BatchNorm2d


def _place_after_load(module: nn.Module, _incompatible_keys: object) -> None:
    if isinstance(module, BasicBlock):
        module._place_shortcut()


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: Norm = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        # ReLU as a module (not F.relu) so that guided backpropagation can hook every one of them.
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()  # identity, or a 1x1 projection and its norm
        self.stride = stride
        if stride != 1 or in_planes != planes:
            projection = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(projection, norm(planes))
        self.subsample = 1  # pixels the shortcut's input skips; its convolution strides the rest
        self._place_shortcut()
        # load_state_dict(assign=True) swaps in tensors without a move: place the shortcut again.
        self.register_load_state_dict_post_hook(_place_after_load)

    def _place_shortcut(self) -> None:
        """On the CPU the projection shortcut keeps every `stride`-th pixel, then convolves with
        stride 1: the same function, without oneDNN's strided weight-gradient kernel, which in torch
        2.14.1 (oneDNN issue 6035) writes past its buffer in channels_last when the input has fewer
        channels than its block (8 on AVX2, 16 on AVX-512): it hung, crashed or corrupted the heap
        at widths 4 and 8. Elsewhere the convolution itself strides: the subsampling's copies made
        H100 epochs 2-20 about 1 s (5-7%) slower (docs/performance.md). The parameters are the same,
        so checkpoints load on every device. A torch.fx trace (fold_batchnorm's copies) keeps the
        choice made when traced; those copies only score, and the broken kernel is a training one."""
        self.subsample = self.stride if self.conv1.weight.device.type == "cpu" else 1
        if len(self.shortcut) > 0:
            projection = cast(nn.Conv2d, self.shortcut[0])
            projection.stride = (self.stride // self.subsample,) * 2

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> BasicBlock:
        # Every move between devices (.to, .cuda, .cpu) passes through here, as in torch's RNNs.
        super()._apply(fn, recurse)
        self._place_shortcut()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x[:, :, :: self.subsample, :: self.subsample] if self.subsample > 1 else x
        return self.relu(out + self.shortcut(skip))


class ResNet(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...], width: int = 64, num_classes: int = 10, norm: Norm = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU()
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        stages = []
        for index, (count, out_planes) in enumerate(zip(blocks, planes, strict=True)):
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, out_planes, stride, norm))
                in_planes = out_planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build_model(name: str, width: int = 64, num_classes: int = 10, norm: str = "batch") -> ResNet:
    """A CIFAR ResNet (`name` and `norm` as TrainConfig validates them); the module names (bn1,
    layer4.1.conv2, ...) are the same for either norm."""
    return ResNet(BLOCKS_PER_STAGE[name], width=width, num_classes=num_classes, norm=norm_layer(norm))


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name` (e.g. 'layer3', 'layer4.1.conv2'), or a UsageError."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    top_level = [child for child, _ in model.named_children()]
    match = difflib.get_close_matches(name, [module for module in modules if module], n=1)
    raise UsageError(
        f"unknown layer '{name}'; top-level layers are: {', '.join(top_level)} "
        f"(dotted names like layer4.1.conv2 reach inside them)"
        + (f"; did you mean '{match[0]}'?" if match else "")
    )
