"""ResNet-18, CIFAR variant (He et al. 2016; the model of Figs. 1e-f, 2e-f, 3b, 8b and 10).

A 3×3 stem convolution (no max-pool, as usual for 32×32 inputs), four stages of two basic blocks
with ``w, 2w, 4w, 8w`` channels (``w = 64``: 11,173,962 parameters for 10 classes), the first
block of stages 2-4 with stride 2 and a 1×1 projection shortcut, batch norm after every
convolution, global average pooling and one linear layer named ``top``.

Parameter names read as the network does: ``stem.conv.weight``, ``stage2.block1.conv1.weight``,
``stage2.block1.shortcut.conv.weight``, ``top.bias``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x)``; the shortcut is the identity, or
    a strided 1×1 convolution with batch norm when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_channels)))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images.

    Args:
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        num_outputs: outputs of the ``top`` layer.
        width: channels of the first stage (64 in the standard network; small values give tiny
            test instances, e.g. ``width=1`` has under 3,000 parameters).
    """

    def __init__(self, in_channels: int, num_outputs: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(
            conv=_conv3x3(in_channels, width), bn=nn.BatchNorm2d(width), relu=nn.ReLU()))
        channels = width
        for stage, multiple in enumerate((1, 2, 4, 8), start=1):
            stride = 1 if stage == 1 else 2
            blocks = OrderedDict(block1=BasicBlock(channels, width * multiple, stride),
                                 block2=BasicBlock(width * multiple, width * multiple))
            self.add_module(f"stage{stage}", nn.Sequential(blocks))
            channels = width * multiple
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.top = nn.Linear(channels, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.top(self.flatten(self.pool(x)))
