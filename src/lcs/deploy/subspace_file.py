"""The subspace file: one safetensors file holding a whole trained subspace (both endpoints for a
line, one weight set for a point), its architecture, its regime, and the decisions its conversion
made that change the math (``Subspace.decisions``: which BatchNorms fold into quantized convs), so a
loaded subspace computes what was trained without re-deriving them by tracing.

Loading builds the model on the meta device and assigns the file's tensors: no random
initialization is drawn only to be overwritten. Format versions are written and checked.
Deploy side: torch, safetensors and the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from torch import nn

from ..errors import LcsError
from ..files import load_tensors, save_tensors
from ..layers.bn_stats import select_bn_stats
from ..regimes import regime_from_dict, regime_to_dict
from ..subspace import Subspace, convert
from .artifact import assign_state, check_assigned, check_version, model_on_meta, read_metadata

__all__ = ["SUBSPACE_FORMAT", "SUBSPACE_VERSION", "save_subspace", "load_subspace"]

SUBSPACE_FORMAT = "lcs.subspace"
SUBSPACE_VERSION = 2  # 2: conversion decisions recorded; 1 (still read): re-derived at load


def save_subspace(sub: Subspace, path: str | os.PathLike, arch: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> int:
    """Write the whole subspace to one safetensors file, atomically; returns its size in bytes.

    ``arch`` names the plain architecture (``{"name": ..., "kwargs": {...}}``) so that the file
    can be served without the code that trained it.
    """
    header = {"format": SUBSPACE_FORMAT, "version": SUBSPACE_VERSION, "arch": arch,
              "regime": regime_to_dict(sub.config), "alpha_range": list(sub.alpha_range),
              "compressed": list(sub.compressed), "decisions": sub.decisions}
    if sub.input_shape is not None:
        header["input_shape"] = list(sub.input_shape)
    header.update(extra or {})
    return save_tensors(sub.model.state_dict(), path, {"lcs": json.dumps(header)})


def load_subspace(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[Subspace, dict[str, Any]]:
    """The Subspace stored in a subspace file, in eval mode, and the file's metadata.

    ``model``: an instance of the architecture for models not in ``lcs.models`` (its values are
    replaced); by default the model is built by name, on the meta device (no initialization)."""
    path = os.fspath(path)
    header = read_metadata(path)
    if header.get("format") != SUBSPACE_FORMAT:
        raise LcsError(f"{path} holds {header.get('format')!r}, not a subspace (export it with "
                       f"`lcs export RUN --subspace`)")
    version = check_version(path, header, SUBSPACE_VERSION, "subspace file")
    try:
        config = regime_from_dict(header["regime"])
        compressed = set(header["compressed"])
        decisions = header.get("decisions") if version >= 2 else None
        if model is None:
            model = model_on_meta(header["arch"])
    except (KeyError, TypeError) as e:
        raise LcsError(f"{path}: incomplete subspace metadata ({e})") from None
    on_meta = any(p.is_meta for p in model.parameters())
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        sub = convert(model, config, filter_fn=lambda m, fqn: fqn in compressed, decisions=decisions)
    if header.get("input_shape"):
        sub.input_shape = tuple(header["input_shape"])
    state, _ = load_tensors(path)  # verified against the file's digest
    assign_state(sub.model, state, path)
    for m in sub.model.modules():  # per-level BN statistics: the plain views onto the loaded rows
        select_bn_stats(m)
    check_assigned(sub.model, path)
    sub.model.eval()
    return sub, header

