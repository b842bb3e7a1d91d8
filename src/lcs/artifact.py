"""The compressed artifact: one safetensors file that really is smaller, and its loader.

Deploy side: imports only torch, safetensors, the standard library and the plain model registry;
no training code. Nothing is pickled: tensors in safetensors, everything else in JSON metadata.

Encodings, chosen per tensor by size:
  * ``dense``: the tensor as is;
  * ``bitmap``: a packed 1-bit occupancy mask (n/8 bytes) plus the nonzero values (4 bytes each);
    smaller than dense whenever more than 1/32 of the entries are zero.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .errors import LcsError

__all__ = ["FORMAT", "encode_state", "artifact_bytes", "save_compressed", "load_compressed", "pack_bits",
           "unpack_bits", "read_metadata"]

FORMAT = "lcs.compressed"
VERSION = 1
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → uint8 tensor of ⌈n/8⌉ bytes, most significant bit first (like numpy.packbits)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` bits as a bool tensor."""
    bits = (packed.view(-1, 1) & _BIT_WEIGHTS) != 0
    return bits.flatten()[:numel]


def _encode(name: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    t = t.detach().cpu().contiguous()
    info: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.is_floating_point() and t.numel() >= 64:
        nonzero = t != 0
        nnz = int(nonzero.sum())
        if math.ceil(t.numel() / 8) + nnz * t.element_size() < t.numel() * t.element_size():
            info["encoding"] = "bitmap"
            return {f"{name}.bitmap": pack_bits(nonzero), f"{name}.values": t[nonzero]}, info
    info["encoding"] = "dense"
    return {name: t}, info


def encode_state(model: nn.Module, meta: dict[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of a plain model's compressed artifact."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        enc, info = _encode(name, t)
        tensors.update(enc)
        layout[name] = info
    header = {"format": FORMAT, "version": VERSION, **(meta or {}), "tensors": layout}
    return tensors, {"lcs": json.dumps(header)}


def artifact_bytes(model: nn.Module, meta: dict[str, Any] | None = None) -> int:
    """Exact size in bytes of the file ``save_compressed`` would write (serialized in memory)."""
    return len(st_save(*encode_state(model, meta)))


def save_compressed(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> int:
    """Write a plain (materialized) model as a compressed artifact, atomically; returns its bytes.

    ``meta`` should hold ``{"arch": {"name": ..., "kwargs": {...}}}`` so that ``load_compressed``
    can rebuild the model by name, and ``"regime": "structured"`` for physically slim networks
    (the loader then shrinks the layers to the stored shapes); anything else JSON-serializable is
    kept alongside.
    """
    data = st_save(*encode_state(model, meta))
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(data)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an lcs artifact; a clear error for missing, truncated or foreign files."""
    if not os.path.isfile(path):
        raise LcsError(f"no such artifact: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lcs")
    except (SafetensorError, OSError, ValueError) as e:
        raise LcsError(f"{path} is not a readable safetensors file ({e})") from None
    if raw is None:
        raise LcsError(f"{path} is a safetensors file but not an lcs artifact (no 'lcs' metadata)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        raise LcsError(f"{path}: corrupted lcs metadata") from None
    if not isinstance(header, dict) or "format" not in header:
        raise LcsError(f"{path}: corrupted lcs metadata")
    return header


def _decode(path: str, header: dict[str, Any]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for name, info in header["tensors"].items():
                shape = info["shape"]
                if info["encoding"] == "dense":
                    state[name] = f.get_tensor(name)
                elif info["encoding"] == "bitmap":
                    values = f.get_tensor(f"{name}.values")
                    mask = unpack_bits(f.get_tensor(f"{name}.bitmap"), math.prod(shape))
                    dense = values.new_zeros(mask.numel())
                    dense[mask] = values
                    state[name] = dense.view(shape)
                else:
                    raise LcsError(f"{path}: unknown tensor encoding {info['encoding']!r}")
    except (SafetensorError, KeyError, RuntimeError) as e:
        raise LcsError(f"{path}: corrupted artifact ({e})") from None
    return state


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load an artifact written by ``lcs export`` / ``save_compressed`` as a plain model in eval mode.

    Args:
        path: the ``.safetensors`` artifact.
        model: an uninitialized instance of the architecture, for models that are not in
            ``lcs.models``; by default the model is rebuilt by name from the file's metadata.
    """
    path = os.fspath(path)
    header = read_metadata(path)
    if header["format"] != FORMAT:
        raise LcsError(f"{path} holds {header['format']!r}, not a compressed network at one α "
                       f"(use lcs.Runtime for subspace artifacts)")
    if model is None:
        from . import models  # plain nn.Modules only

        arch = header.get("arch")
        if not arch:
            raise LcsError(f"{path} does not name its architecture: pass model=")
        model = models.create(arch["name"], **arch.get("kwargs", {}))
    state = _decode(path, header)
    if header.get("regime") == "structured":  # physically slim: shrink the full-width layers first
        from .slim import resize_to_shapes

        resize_to_shapes(model, {name: info["shape"] for name, info in header["tensors"].items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LcsError(f"{path} does not match the architecture: {str(e).splitlines()[0]}") from None
    return model.eval()
