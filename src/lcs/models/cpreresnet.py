"""cPreResNet20: the pre-activation bottleneck ResNet of network slimming (SPEC §3).

A plain nn.Module: it knows nothing of LCS; ``lcs.convert`` makes it compressible afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._norms import get_norm_layer
from ._registry import register_model

__all__ = ["CPreResNet", "cpreresnet20"]


class Bottleneck(nn.Module):
    """norm → ReLU → 1×1 → norm → ReLU → 3×3 (stride) → norm → ReLU → 1×1, plus an optional 1×1
    strided shortcut conv on the block input."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        out = planes * self.expansion
        self.norm1 = norm(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.norm2 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm3 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(inplanes, out, 1, stride=stride, bias=False) if stride != 1 or inplanes != out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        y = self.conv1(self.relu(self.norm1(x)))
        y = self.conv2(self.relu(self.norm2(y)))
        y = self.conv3(self.relu(self.norm3(y)))
        return y + residual


class CPreResNet(nn.Module):
    """Depth 9n+2: a 3×3 stem, three stages of n bottlenecks (planes 16, 32, 64; ×4 expansion),
    final norm → ReLU → global average pool → 1×1 conv classifier.

    ``zero_init_residual``: each block's last conv starts at zero, so every block starts as its
    shortcut (Goyal et al. 2017; a pre-activation block has no norm after its last conv to zero).
    Off by default: the network-slimming model this is has no such init.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, norm: str = "gn", in_channels: int = 3,
                 zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 9 != 0:
            raise ValueError(f"depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        norm_layer = get_norm_layer(norm)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        inplanes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Bottleneck(inplanes, planes, stride, norm_layer))
                inplanes = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm_layer(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = the 8×8 average pool at 32×32 input
        self.classifier = nn.Conv2d(inplanes, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The classifier is the network's fully connected layer: a small init keeps the first
        # logits near zero (Kaiming fan-out with 10 outputs gives initial losses ~7 and stalls GN nets).
        nn.init.normal_(self.classifier.weight, std=0.01)
        if zero_init_residual:
            for block in self.blocks:
                nn.init.zeros_(block.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.pool(self.relu(self.norm(x)))
        return self.classifier(x).flatten(1)


@register_model
def cpreresnet20(num_classes: int = 10, norm: str = "gn", in_channels: int = 3,
                 zero_init_residual: bool = False) -> CPreResNet:
    return CPreResNet(20, num_classes=num_classes, norm=norm, in_channels=in_channels,
                      zero_init_residual=zero_init_residual)
