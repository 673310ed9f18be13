"""The CIFAR ResNet family of the paper's experiments (DESIGN.md, "Paper's ResNet experiment").

Post-activation BasicBlocks (He et al. 2016, CIFAR variant), depth ``6n + 2``, widths
``16·widen, 32·widen, 64·widen`` with strides 1/2/2, projection shortcuts (1×1 conv + BN) only where
the shape changes, global average pooling and a Linear classifier with bias.

- ``cifar_resnet(32, 4, 100)`` has exactly 7,451,044 parameters (the paper's Fig. 2 model);
- ``cifar_resnet(56, 11, 100)`` has 103,024,340: our reading of the paper's "103-million-parameter
  ResNet" (Fig. 3), which the paper does not specify further.

Build the large one on the meta device to count or inspect it without allocating memory::

    with torch.device("meta"):
        big = cifar_resnet(56, 11)
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import as_int, check_int

__all__ = ["BasicBlock", "CIFARResNet", "cifar_resnet", "cifar_resnet_num_params"]


def _check_int(value, name: str, minimum: int) -> int:
    """An integer (Python or numpy, not a bool) ``>= minimum``, returned as a Python int: a
    ``TypeError`` for another type, a ``ValueError`` (:func:`torch_qode._checks.check_int`) below it."""
    if as_int(value) is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return check_int(value, name, minimum)


def _blocks_per_stage(depth) -> int:
    depth = _check_int(depth, "depth", 8)
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, …, 56, …), got {depth}")
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CIFARResNet(nn.Module):
    """Stem conv3×3 + BN + ReLU, three stages of BasicBlocks, global average pool, Linear."""

    def __init__(self, depth: int = 32, widen: int = 4, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        n = _blocks_per_stage(depth)
        depth = int(depth)
        widen = _check_int(widen, "widen", 1)
        num_classes = _check_int(num_classes, "num_classes", 1)
        in_channels = _check_int(in_channels, "in_channels", 1)
        self.depth, self.widen, self.num_classes, self.in_channels = depth, widen, num_classes, in_channels
        widths = (16 * widen, 32 * widen, 64 * widen)

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, width, stride if i == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

        for m in self.modules():  # Kaiming init (He et al. 2015) for convs; BN to identity
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def cifar_resnet(depth: int = 32, widen: int = 4, num_classes: int = 100, in_channels: int = 3) -> CIFARResNet:
    """The CIFAR ResNet of depth ``6n+2`` and width factor ``widen``.

    ``in_channels=1`` with ``depth=8, widen=1`` gives a cheap CPU model for 1×8×8 digits images;
    any input of at least 1×1 pixels is accepted (global average pooling).
    """
    return CIFARResNet(depth, widen, num_classes, in_channels)


def cifar_resnet_num_params(depth: int = 32, widen: int = 4, num_classes: int = 100, in_channels: int = 3) -> int:
    """Parameter count of :func:`cifar_resnet`, computed analytically (no model is built)."""
    n = _blocks_per_stage(depth)
    widen = _check_int(widen, "widen", 1)
    num_classes = _check_int(num_classes, "num_classes", 1)
    in_channels = _check_int(in_channels, "in_channels", 1)
    w = (16 * widen, 32 * widen, 64 * widen)

    def conv_bn(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + 2 * cout

    total = conv_bn(in_channels, w[0], 3)
    cin = w[0]
    for width in w:
        for _ in range(n):
            total += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            if cin != width:
                total += conv_bn(cin, width, 1)
            cin = width
    return total + w[2] * num_classes + num_classes
