"""A name → constructor registry, so new architectures are added by name (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import LcsError

__all__ = ["register_model", "create", "list_models"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name."""
    if fn.__name__ in _MODELS:
        raise RuntimeError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. Keyword arguments that are None are dropped, so unset CLI flags
    keep the model's own defaults.

    Example:
        >>> model = create("cpreresnet20", norm="gn", num_classes=10)
    """
    if name not in _MODELS:
        raise LcsError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**{k: v for k, v in kwargs.items() if v is not None})
