"""Which layers a conversion sees: the layer types lcs compresses and normalizes, and the default
choices of compressed layers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["LINEAR_TYPES", "NORM_TYPES", "FilterFn", "leaf_layers", "default_filter", "all_but_classifier"]

LINEAR_TYPES = (nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm, nn.BatchNorm1d)

FilterFn = Callable[[nn.Module, str], bool]


def leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]


def default_filter(model: nn.Module) -> FilterFn:
    """Compress every Conv2d/Linear except the first and the last (the stem and the classifier),
    which SPEC §2 keeps dense: they are tiny and the most sensitive."""
    layers = leaf_layers(model)
    keep_dense = {layers[0][0], layers[-1][0]} if layers else set()
    return lambda module, fqn: isinstance(module, LINEAR_TYPES) and fqn not in keep_dense


def all_but_classifier(model: nn.Module) -> FilterFn:
    """Every Conv2d/Linear but the last: the stem narrows its outputs too (it sees all input
    channels), so that residual sums of any width line up; the classifier keeps all outputs."""
    layers = leaf_layers(model)
    last = layers[-1][0] if layers else None
    return lambda module, fqn: isinstance(module, LINEAR_TYPES) and fqn != last
