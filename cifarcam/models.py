"""The CIFAR ResNet family (3x3 stem, no max-pool, layer1..layer4, `linear` head)."""

from __future__ import annotations

import difflib

import torch
from torch import nn
from torch.nn import functional as F

from cifarcam.errors import UsageError

BLOCKS_PER_STAGE = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
MODEL_NAMES = tuple(BLOCKS_PER_STAGE)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # ReLU as a module (not F.relu) so that guided backpropagation can hook every one of them.
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        stages = []
        for index, (count, out_planes) in enumerate(zip(blocks, planes, strict=True)):
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, out_planes, stride))
                in_planes = out_planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def build_model(name: str, width: int = 64, num_classes: int = 10) -> ResNet:
    if name not in BLOCKS_PER_STAGE:
        choices = ", ".join(MODEL_NAMES)
        raise UsageError(
            f"unknown model '{name}'; choose one of: {choices}{_closest(name, list(MODEL_NAMES))}"
        )
    return ResNet(BLOCKS_PER_STAGE[name], width=width, num_classes=num_classes)


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name` (e.g. 'layer3', 'layer4.1.conv2'), or a UsageError."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    top_level = [child for child, _ in model.named_children()]
    raise UsageError(
        f"unknown layer '{name}'; top-level layers are: {', '.join(top_level)} "
        f"(dotted names like layer4.1.conv2 reach inside them){_closest(name, list(modules))}"
    )
