"""Tensor encodings of the compressed artifact, each near its information limit.

Every tensor of a plain network is written by the smallest encoding that applies to it:

* ``dense``: the values as they are;
* ``sparse``: the nonzero values (in the tensor's dtype) plus their positions, Golomb-Rice coded
  (``lcs.codec``: within ~1.5 % of n·H(density) bits where a bitmap costs n bits);
* ``packed_int``: a quantized weight's b-bit integer codes back to back (⌈n·b/8⌉ bytes) plus its
  scale and zero point; the value is (code − zp)·scale, bit for bit what fake quantization computed;
* ``sparse_int``: a quantized weight's positions of nonzero codes (code ≠ zp) plus those codes at
  b bits each: nnz·b bits + the positions' entropy, what sparsity × bits is worth.

All encoded tensors of a file share a few blobs (one per dtype for values, one of bytes for bit
streams), so the file carries one safetensors entry per blob, not several per tensor; the layout (a
JSON list, zlib-compressed, stored as a tensor) says how to cut them. Version 1 files (one safetensors
entry per tensor part, a ``bitmap`` encoding) are still read. Deploy side: torch and the standard library.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ..codec import decode_positions, encode_positions, pack_ints, position_bits, unpack_bits, unpack_ints
from ..errors import LcsError
from ..files import DamagedFileError
from ..layers.quant import check_bits, codes_on_grid

__all__ = ["ENCODINGS", "Writer", "read_layout", "decode_v1", "decode_v2"]

ENCODINGS = ("dense", "sparse", "packed_int", "sparse_int")
_BITS = "bits"  # the byte blob of every bit stream
_LAYOUT = "layout"


def _ceil8(bits: int) -> int:
    return (bits + 7) // 8


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, shape: list[int],
                dtype: torch.dtype) -> torch.Tensor:
    """(code − zp)·scale: bit for bit the value fake quantization computed."""
    return ((codes - zp).float() * scale).view(shape).to(dtype)


def _scatter(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A dense tensor holding ``values`` where ``mask`` is set, zeros elsewhere."""
    dense = values.new_zeros(mask.numel())
    dense[mask] = values
    return dense.view(shape)


class Writer:
    """Collects encoded tensors into shared blobs; ``tensors()`` gives the safetensors entries."""

    def __init__(self) -> None:
        self.blobs: dict[str, list[torch.Tensor]] = {}
        self.rows: list[list[Any]] = []

    def _put(self, t: torch.Tensor) -> None:
        self.blobs.setdefault(str(t.dtype).removeprefix("torch."), []).append(t.detach().cpu().flatten())

    def _put_bits(self, t: torch.Tensor) -> None:
        self.blobs.setdefault(_BITS, []).append(t.to(torch.uint8).flatten())

    def _put_positions(self, mask: torch.Tensor) -> list[int]:
        streams, info = encode_positions(mask)
        self._put_bits(streams["unary"])
        self._put_bits(streams["rem"])
        return [info["k"], info["count"], info["complement"], info["unary_bits"]]

    def add(self, name: str, t: torch.Tensor, allowed: Sequence[str], qparams: tuple | None = None) -> str:
        """Encode ``t`` with the smallest of the ``allowed`` encodings that apply; returns its name.
        ``qparams``: (scale, zero point, bits) of a fake-quantized weight (its codes can then be stored)."""
        t = t.detach().cpu().contiguous()
        head = [name, list(t.shape), str(t.dtype).removeprefix("torch.")]
        codes = None
        if qparams is not None:
            scale, zp, bits = qparams
            codes = codes_on_grid(t, scale, zp, bits)
            if codes is None:  # the weight was not fake-quantized with these qparams
                raise LcsError(f"{name} is not on its {bits}-bit quantization grid: cannot store it as integer codes")
        sizes = self._sizes(t, allowed, codes, qparams)
        enc = min(sizes, key=sizes.get)
        if enc == "dense":
            self._put(t)
            self.rows.append([*head, "dense"])
        elif enc == "sparse":
            mask = t != 0
            self.rows.append([*head, "sparse", self._put_positions(mask)])
            self._put(t[mask])
        else:
            scale, zp, bits = qparams
            self._put(scale.float().reshape(1))
            self._put(zp.to(torch.int32).reshape(1))
            if enc == "packed_int":
                self._put_bits(pack_ints(codes, bits))
                self.rows.append([*head, "packed_int", [bits]])
            else:
                mask = codes != zp.to(torch.int32)
                params = [bits, *self._put_positions(mask)]
                self._put_bits(pack_ints(codes[mask], bits))
                self.rows.append([*head, "sparse_int", params])
        return enc

    @staticmethod
    def _sizes(t: torch.Tensor, allowed: Sequence[str], codes: torch.Tensor | None, qparams: tuple | None
               ) -> dict[str, float]:
        n, item = t.numel(), t.element_size()
        sizes: dict[str, float] = {"dense": n * item}
        if t.is_floating_point() and n >= 64 and "sparse" in allowed:
            mask = t != 0
            sizes["sparse"] = int(mask.sum()) * item + position_bits(mask) / 8
        if codes is not None:
            bits = qparams[2]
            if "packed_int" in allowed:
                sizes["packed_int"] = _ceil8(n * bits) + 8
            if "sparse_int" in allowed and n >= 64:
                mask = codes != qparams[1].to(torch.int32)
                sizes["sparse_int"] = _ceil8(int(mask.sum()) * bits) + position_bits(mask) / 8 + 8
        return {k: v for k, v in sizes.items() if k in allowed or k == "dense"}

    def tensors(self, extras: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The blobs plus the layout: the rows and ``extras`` (per-layer facts such as quantizing layers),
        one zlib-compressed JSON document (layer names repeat: compressed, they cost little)."""
        out = {key: torch.cat(parts) for key, parts in self.blobs.items()}
        doc = json.dumps({"rows": self.rows, **(extras or {})}, separators=(",", ":")).encode()
        out[_LAYOUT] = torch.frombuffer(bytearray(zlib.compress(doc, 9)), dtype=torch.uint8)
        return out


def read_layout(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The layout document: ``rows`` (name, shape, dtype, encoding, parameters) and the extras."""
    try:
        doc = json.loads(zlib.decompress(tensors[_LAYOUT].numpy().tobytes()))
    except (KeyError, zlib.error, ValueError) as e:
        raise DamagedFileError(f"corrupted artifact layout ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise DamagedFileError("corrupted artifact layout (no rows)")
    return doc


class _Reader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.offsets: dict[str, int] = {}

    def take(self, key: str, n: int) -> torch.Tensor:
        start = self.offsets.get(key, 0)
        blob = self.tensors[key]
        if start + n > blob.numel():
            raise DamagedFileError(f"the {key!r} blob ends early")
        self.offsets[key] = start + n
        return blob[start:start + n]

    def positions(self, params: Sequence[int], numel: int) -> torch.Tensor:
        k, count, complement, unary_bits = (int(v) for v in params)
        unary = self.take(_BITS, _ceil8(unary_bits))
        rem = self.take(_BITS, _ceil8(count * k))
        info = {"k": k, "count": count, "complement": complement, "unary_bits": unary_bits}
        return decode_positions({"unary": unary, "rem": rem}, info, numel)


def decode_v2(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                         dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                         dict[str, list[int]], dict[str, Any]]:
    """(state dict, {name: (scale, zero point)} of integer-coded tensors, {name: shape}, the extras)."""
    reader = _Reader(tensors)
    doc = read_layout(tensors)
    state: dict[str, torch.Tensor] = {}
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shapes: dict[str, list[int]] = {}
    for row in doc["rows"]:
        name, shape, dtype_name, enc = row[:4]
        dtype = getattr(torch, dtype_name)
        numel = math.prod(shape)
        shapes[name] = shape
        if enc == "dense":
            state[name] = reader.take(dtype_name, numel).view(shape).clone()
        elif enc == "sparse":
            mask = reader.positions(row[4], numel)
            state[name] = _scatter(mask, reader.take(dtype_name, int(mask.sum())), shape)
        elif enc in ("packed_int", "sparse_int"):
            bits = check_bits(int(row[4][0]))
            scale, zp = reader.take("float32", 1).clone(), reader.take("int32", 1).clone()
            if enc == "packed_int":
                codes = unpack_ints(reader.take(_BITS, _ceil8(numel * bits)), bits, numel)
            else:
                mask = reader.positions(row[4][1:], numel)
                nnz = int(mask.sum())
                codes = torch.full((numel,), int(zp), dtype=torch.int32)
                codes[mask] = unpack_ints(reader.take(_BITS, _ceil8(nnz * bits)), bits, nnz)
            state[name] = _dequantize(codes, scale, zp, shape, dtype)
            qparams[name] = (scale, zp)
        else:
            raise DamagedFileError(f"unknown tensor encoding {enc!r}")
    return state, qparams, shapes, {k: v for k, v in doc.items() if k != "rows"}


def decode_v1(tensors: dict[str, torch.Tensor], layout: dict[str, dict[str, Any]]
              ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[int]]]:
    """Version 1 files: one safetensors entry per tensor part (dense, bitmap, packed_int)."""
    state: dict[str, torch.Tensor] = {}
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, info in layout.items():
        shape = info["shape"]
        if info["encoding"] == "dense":
            state[name] = tensors[name]
        elif info["encoding"] == "bitmap":
            mask = unpack_bits(tensors[f"{name}.bitmap"], math.prod(shape))
            state[name] = _scatter(mask, tensors[f"{name}.values"], shape)
        elif info["encoding"] == "packed_int":
            scale, zp = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"]
            codes = unpack_ints(tensors[f"{name}.codes"], int(info["bits"]), math.prod(shape))
            state[name] = _dequantize(codes, scale, zp, shape, getattr(torch, info["dtype"]))
            qparams[name] = (scale, zp)
        else:
            raise DamagedFileError(f"unknown tensor encoding {info['encoding']!r}")
    return state, qparams, {name: info["shape"] for name, info in layout.items()}

