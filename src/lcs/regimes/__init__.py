"""Compression regimes: one module each, one registration each (``lcs.regimes.base.Regime``).

``REGISTRY`` maps a regime's name to its record; ``record_of(config)`` finds the record of a config.
To add a regime, write its module (config class + ``REGIME`` record) and register it below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import LcsError
from . import quantized, sparse_quantized, structured, unstructured
from .base import (
    BITS_RANGE,
    GEOMETRIES,
    REGISTRY,
    BakeContext,
    MethodSpec,
    Point,
    Regime,
    RegimeConfig,
    check_alpha,
    check_level,
    record_of,
    register,
)
from .quantized import QuantizedConfig
from .sparse_quantized import SparseQuantizedConfig
from .structured import StructuredConfig
from .unstructured import UnstructuredConfig

for _module in (unstructured, structured, quantized, sparse_quantized):  # the registrations
    register(_module.REGIME)

__all__ = ["RegimeConfig", "Regime", "MethodSpec", "BakeContext", "Point", "UnstructuredConfig", "StructuredConfig",
           "QuantizedConfig", "SparseQuantizedConfig", "GEOMETRIES", "BITS_RANGE", "REGISTRY", "REGIMES", "check_alpha",
           "check_level", "record_of", "register", "regime_to_dict", "regime_from_dict"]

# name → config class (the configs' own view of the registry)
REGIMES: dict[str, type[RegimeConfig]] = {name: rec.config for name, rec in REGISTRY.items()}


def regime_to_dict(config: RegimeConfig) -> dict[str, Any]:
    """JSON-ready description of a regime config (stored in artifacts)."""
    return config.to_dict()


def regime_from_dict(raw: dict[str, Any]) -> RegimeConfig:
    """Inverse of ``regime_to_dict``, accepting only known regimes and fields."""
    raw = dict(raw)
    name = raw.pop("regime", None)
    if name not in REGISTRY:
        raise LcsError(f"unknown regime {name!r} in artifact; known: {', '.join(REGISTRY)}")
    cls = REGISTRY[name].config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - fields
    if unknown:
        raise LcsError(f"unknown {name} regime fields in artifact: {', '.join(sorted(unknown))}")
    return cls(**raw)
