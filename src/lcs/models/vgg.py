"""VGG19 (configuration E of Simonyan & Zisserman) with a norm after every conv (SPEC §3).

- ``vgg19``: torchvision's ``vgg19_bn`` layout for ImageNet: 16 3×3 convs (with bias) each
  followed by a norm and ReLU, five 2×2 max pools, a 7×7 adaptive average pool and the
  512·7·7 → 4096 → 4096 → classes head with dropout (143,678,248 parameters for 1000 classes).
- ``vgg19_cifar``: the network-slimming CIFAR variant: the same 16 convs, the fifth max pool
  replaced by a global average pool (2×2 → 1×1 at 32×32 inputs) and one Linear 512 → classes.

Plain nn.Modules that know nothing of LCS, with forwards that hard-code no channel count
(``torch.flatten(x, 1)`` is channel-major), so a structured conversion can shrink any layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import LcsError
from ._norms import get_norm_layer
from ._registry import register_model
from .resnet import _init_weights

__all__ = ["VGG", "CFG_E", "vgg19", "vgg19_cifar"]

# Output channels of each 3×3 conv; "M" is a 2×2 stride-2 max pool.
CFG_E: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _features(cfg: tuple[int | str, ...], norm: Callable[[int], nn.Module], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(channels, v, 3, padding=1), norm(v), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` → ``avgpool`` → flatten → ``classifier``; ``head="imagenet"`` or ``"cifar"``
    (see the module docstring)."""

    def __init__(self, num_classes: int = 1000, norm: str = "gn", in_channels: int = 3, head: str = "imagenet",
                 dropout: float = 0.5):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        if head == "imagenet":
            self.features = _features(CFG_E, norm_layer, in_channels)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )
        elif head == "cifar":
            self.features = _features(CFG_E[:-1], norm_layer, in_channels)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(512, num_classes))
        else:
            raise LcsError(f"unknown VGG head {head!r}; choose 'imagenet' or 'cifar'")
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model
def vgg19(num_classes: int = 1000, norm: str = "gn", in_channels: int = 3) -> VGG:
    """VGG19 with a norm after each conv, ImageNet layout (224×224 inputs)."""
    return VGG(num_classes=num_classes, norm=norm, in_channels=in_channels, head="imagenet")


@register_model
def vgg19_cifar(num_classes: int = 10, norm: str = "gn", in_channels: int = 3) -> VGG:
    """VGG19 with a norm after each conv, CIFAR layout (32×32 inputs, one Linear classifier)."""
    return VGG(num_classes=num_classes, norm=norm, in_channels=in_channels, head="cifar")
