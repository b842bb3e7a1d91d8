"""Normalization layers by name. GroupNorm and InstanceNorm have no running statistics, which is
why LCS uses them: one set of statistics cannot be right for every compression level."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ..errors import LcsError

__all__ = ["NORMS", "get_norm_layer"]


def _group_norm(channels: int) -> nn.Module:
    # 32 groups, capped at the channel count; gcd keeps odd user widths valid.
    return nn.GroupNorm(math.gcd(32, channels) if channels >= 32 else channels, channels)


def _instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


def _layer_norm(channels: int) -> nn.Module:
    # One group: normalizes each image over all its channels and positions. Like InstanceNorm it
    # keeps no running statistics and serves any width, but it keeps the channels' relative
    # magnitudes, which InstanceNorm erases before the global pool.
    return nn.GroupNorm(1, channels)


def _batch_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


NORMS: dict[str, Callable[[int], nn.Module]] = {"gn": _group_norm, "in": _instance_norm, "ln": _layer_norm,
                                                "bn": _batch_norm}


def get_norm_layer(name: str) -> Callable[[int], nn.Module]:
    """``"gn"`` (GroupNorm, 32 groups capped at C), ``"in"`` (affine InstanceNorm), ``"ln"``
    (GroupNorm with one group) or ``"bn"``."""
    if name not in NORMS:
        raise LcsError(f"unknown norm {name!r}; choose one of {', '.join(NORMS)}")
    return NORMS[name]
