"""The compressed artifact: one safetensors file that really is smaller, and its loader.

Deploy side: imports only torch, safetensors, the standard library and the plain model registry;
no training code. Nothing is pickled: tensors in safetensors, everything else in JSON metadata.

Encodings, chosen per tensor by size:
  * ``dense``: the tensor as is;
  * ``bitmap``: a packed 1-bit occupancy mask (n/8 bytes) plus the nonzero values (4 bytes each);
    smaller than dense whenever more than 1/32 of the entries are zero;
  * ``packed_int``: the weights of a quantized layer as b-bit integer codes packed back to back
    (⌈n·b/8⌉ bytes) plus the tensor's scale and zero point; the value is (code − zp)·scale,
    bit for bit what fake quantization computed.

Quantized networks also list their quantizing layers and bits in the header (``"quant"``), so
the loader can give those layers back their input quantizers (``lcs.quant.LayerQuant``), and the
BatchNorms merged into quantized convs (``"bn_folded"``), so it can drop them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn

from .errors import LcsError, state_dict_error
from .files import DamagedFileError, load_tensors, read_safetensors_metadata, save_tensors, serialize_tensors
from .quant import LayerQuant, attach_layer_quant, check_bits, codes_on_grid, folded_structure, layer_quants

__all__ = ["FORMAT", "encode_state", "network_meta", "dense_float32_bytes",
           "artifact_bytes", "save_compressed", "load_compressed", "pack_bits",
           "unpack_bits", "pack_ints", "unpack_ints", "read_metadata"]

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


_CHUNK = 1 << 20  # codes per chunk: a whole number of bytes for every b, bounded temporary memory


def pack_ints(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) → uint8 tensor of ⌈n·bits/8⌉ bytes: each code's bits, most
    significant first, back to back (``pack_bits`` of the codes' bit planes)."""
    check_bits(bits)
    flat = codes.detach().flatten().to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise LcsError(f"codes must lie in [0, {2**bits - 1}] to be packed in {bits} bits")
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    parts = [pack_bits((chunk[:, None] >> shifts) & 1) for chunk in flat.split(_CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_ints(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_ints``: the first ``numel`` codes as int32."""
    check_bits(bits)
    if packed.numel() * 8 < numel * bits:
        raise LcsError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    weights = torch.tensor([1 << s for s in range(bits - 1, -1, -1)], dtype=torch.int32)
    chunk_bytes = _CHUNK * bits // 8
    parts, left = [], numel
    for chunk in packed.split(chunk_bytes):
        n = min(left, _CHUNK)
        planes = unpack_bits(chunk, n * bits).view(n, bits).to(torch.int32)
        parts.append((planes * weights).sum(1, dtype=torch.int32))
        left -= n
        if left == 0:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def _encode_packed(name: str, t: torch.Tensor, lq: LayerQuant) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    t = t.detach().cpu().contiguous()
    bits, scale, zp = lq.current_bits(), lq.weight_scale.cpu(), lq.weight_zero_point.cpu()
    codes = codes_on_grid(t, scale, zp, bits)
    if codes is None:  # the weight was not fake-quantized with these qparams
        raise LcsError(f"{name} is not on its {bits}-bit quantization grid: cannot store it as integer codes")
    info = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "encoding": "packed_int",
            "bits": bits}
    return {f"{name}.codes": pack_ints(codes, bits), f"{name}.scale": scale.reshape(1),
            f"{name}.zero_point": zp.reshape(1)}, info


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
    quants = layer_quants(model)
    packed = {f"{fqn}.weight": lq for fqn, lq in quants.items() if hasattr(lq, "weight_scale")}
    for name, t in model.state_dict().items():
        enc, info = _encode_packed(name, t, packed[name]) if name in packed else _encode(name, t)
        tensors.update(enc)
        layout[name] = info
    header = {"format": FORMAT, "version": VERSION, **(meta or {}), "tensors": layout}
    if quants:
        header["quant"] = {fqn: lq.current_bits() for fqn, lq in quants.items()}
    if model.__dict__.get("lcs_bn_folded"):
        header["bn_folded"] = model.__dict__["lcs_bn_folded"]  # conv → BN merged into it (now Identity)
    return tensors, {"lcs": json.dumps(header)}


def network_meta(arch: dict[str, Any] | None, regime: str, method: str | None, alpha: float, level_name: str,
                 level: float) -> dict[str, Any]:
    """The header of the network at α as ``lcs export`` writes it: eval, export and profile all size
    this same header, so they report the same byte count for the same α."""
    meta = {"arch": arch, "regime": regime, "method": method, "alpha": alpha, level_name: level}
    return {k: v for k, v in meta.items() if v is not None}


def dense_float32_bytes(model: nn.Module) -> int:
    """Bytes of a plain model's state dict in float32 (lcs's own buffers left out): the reference
    for "% of dense" is this of the full-width, uncompressed network."""
    return sum(t.numel() * 4 for name, t in model.state_dict().items()
               if t.is_floating_point() and "lcs_" not in name)


def artifact_bytes(model: nn.Module, meta: dict[str, Any] | None = None) -> int:
    """Exact size in bytes of the file ``save_compressed`` would write (serialized in memory)."""
    return len(serialize_tensors(*encode_state(model, meta)))


def save_compressed(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> int:
    """Write a plain (materialized) model as a compressed artifact, atomically; returns its bytes.

    ``meta`` should hold ``{"arch": {"name": ..., "kwargs": {...}}}`` so that ``load_compressed``
    can rebuild the model by name, and ``"regime": "structured"`` for physically slim networks
    (the loader then shrinks the layers to the stored shapes); anything else JSON-serializable is
    kept alongside.
    """
    tensors, metadata = encode_state(model, meta)
    return save_tensors(tensors, path, metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an lcs artifact; a clear error for missing, truncated or foreign files."""
    if not os.path.isfile(path):
        raise LcsError(f"no such artifact: {path}")
    try:
        raw = read_safetensors_metadata(path).get("lcs")
    except DamagedFileError as e:
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


def _decode(path: str, header: dict[str, Any]
            ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The state dict, and the (scale, zero point) of every tensor stored as integer codes."""
    state: dict[str, torch.Tensor] = {}
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tensors, _ = load_tensors(path)  # verified against the file's digest
    try:
        for name, info in header["tensors"].items():
            shape = info["shape"]
            if info["encoding"] == "dense":
                state[name] = tensors[name]
            elif info["encoding"] == "bitmap":
                values = tensors[f"{name}.values"]
                mask = unpack_bits(tensors[f"{name}.bitmap"], math.prod(shape))
                dense = values.new_zeros(mask.numel())
                dense[mask] = values
                state[name] = dense.view(shape)
            elif info["encoding"] == "packed_int":
                scale, zp = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"]
                codes = unpack_ints(tensors[f"{name}.codes"], int(info["bits"]), math.prod(shape))
                state[name] = ((codes - zp).float() * scale).view(shape).to(getattr(torch, info["dtype"]))
                qparams[name] = (scale, zp)
            else:
                raise LcsError(f"{path}: unknown tensor encoding {info['encoding']!r}")
    except (KeyError, RuntimeError, AttributeError) as e:
        raise DamagedFileError(f"{path}: corrupted artifact ({e})") from None
    return state, qparams


def _is_slim_of(shapes: dict[str, list[int]], own: dict[str, torch.Tensor]) -> bool:
    """The file's own shapes say it is a slim version of ``own``: no tensor larger, some narrower."""
    pairs = [(shape, list(own[name].shape)) for name, shape in shapes.items() if name in own]
    fits = all(len(a) == len(b) and all(x <= y for x, y in zip(a, b, strict=True)) for a, b in pairs)
    return fits and any(a != b for a, b in pairs)


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None, kernels: str = "auto") -> nn.Module:
    """Load an artifact written by ``lcs export`` / ``save_compressed`` as a plain model in eval mode.

    Args:
        path: the ``.safetensors`` artifact.
        model: an uninitialized instance of the architecture, for models that are not in
            ``lcs.models``; by default the model is rebuilt by name from the file's metadata.
        kernels: ``"auto"``: layers that are mostly zeros run on CSR kernels where a micro-benchmark on
            this machine says they are faster (``lcs.kernels``); ``"dense"``: plain kernels only.
    """
    from .kernels import accelerate, check_kernels

    check_kernels(kernels)
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
    state, qparams = _decode(path, header)
    try:
        folded_structure(model, header.get("bn_folded") or {})  # quantized with BN: BN merged into convs
    except AttributeError:
        raise LcsError(f"{path} folds BatchNorm layers the architecture does not have") from None
    for fqn, bits in (header.get("quant") or {}).items():  # quantized: input quantizers, then their buffers
        try:
            lq = attach_layer_quant(model.get_submodule(fqn), bits=check_bits(bits))
        except AttributeError:
            raise LcsError(f"{path} quantizes a layer {fqn!r} the architecture does not have") from None
        if f"{fqn}.weight" in qparams:
            lq.set_weight_qparams(*qparams[f"{fqn}.weight"])  # so that the loaded network can be saved again
    shapes = {name: info["shape"] for name, info in header["tensors"].items()}
    own = model.state_dict()
    if header.get("regime") == "structured" or _is_slim_of(shapes, own):  # physically slim: shrink first
        from .slim import resize_to_shapes

        resize_to_shapes(model, shapes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LcsError(f"{path} does not match the architecture: {state_dict_error(e)}") from None
    if kernels == "auto":
        accelerate(model)
    return model.eval()
