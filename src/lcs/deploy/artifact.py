"""The compressed artifact: one safetensors file that really is smaller, and its loader.

Deploy side: imports only torch, safetensors, the standard library and the plain model registry;
no training code. Nothing is pickled: tensors in safetensors, everything else in JSON.

Each tensor is stored by the smallest encoding its regime allows (``lcs.deploy.encodings``: dense,
sparse values + Golomb-Rice coded positions, b-bit integer codes, or the nonzero codes + positions),
so a file comes within a few percent of the information limit of what it holds
(``information_limit_bytes``).

Quantized networks also list their quantizing layers and bits (``"quant"``), so the loader can give
those layers back their input quantizers (``lcs.layers.quant.LayerQuant``), and the BatchNorms
merged into quantized convs (``"bn_folded"``), so it can drop them (both in the compressed layout;
``describe_artifact`` shows them); physically slim networks say so in the header (``"slim"``), so
the loader shrinks the layers to the stored shapes first.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..errors import LcsError, state_dict_error
from ..files import DamagedFileError, load_tensors, read_safetensors_metadata, save_tensors, serialize_tensors
from ..layers.quant import attach_layer_quant, check_bits, folded_structure, layer_quants

__all__ = ["FORMAT", "VERSION", "encode_state", "network_meta", "dense_float32_bytes", "artifact_bytes",
           "information_limit_bytes", "save_compressed", "load_compressed", "read_metadata", "describe_artifact"]

FORMAT = "lcs.compressed"
VERSION = 2  # 2: shared blobs, entropy-coded positions; 1 (still read): one entry per tensor part


def _coded_weights(quants: dict[str, Any]) -> dict[str, Any]:
    """{weight name: its layer's input quantizer} for every weight stored as integer codes (its layer
    recorded the weight's scale and zero point when it was baked); ``quants``: ``layer_quants(model)``."""
    return {f"{fqn}.weight": lq for fqn, lq in quants.items() if hasattr(lq, "weight_scale")}


def check_version(path: str, header: dict[str, Any], newest: int, what: str) -> int:
    """The file's format version (1 when unstated), or a clear error for one newer than this lcs reads."""
    version = header.get("version", 1)
    if not isinstance(version, int) or version > newest:
        raise LcsError(f"{path} is a version {version!r} {what}; this lcs reads versions up to {newest}: upgrade lcs")
    return version


def model_on_meta(arch: dict[str, Any]) -> nn.Module:
    """The named architecture built on the meta device: shapes only, no initialization drawn (every
    value is then assigned from a file)."""
    from .. import models  # plain nn.Modules only

    with torch.device("meta"):
        return models.create(arch["name"], **arch.get("kwargs", {}))


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Assign a file's tensors to ``model`` (replacing meta tensors); a file that does not match is refused."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LcsError(f"{path} does not match its architecture: {state_dict_error(e)}") from None


def check_assigned(model: nn.Module, path: str) -> None:
    """Every tensor of ``model`` holds a value (none left on the meta device), else the file lacked one."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LcsError(f"{path} does not hold every tensor of its architecture (missing {left[0]!r})")


def encode_state(model: nn.Module, meta: dict[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of a plain model's compressed artifact. The encodings a
    quantized layer's weight may use come from its regime's record (``Regime.encoders``) when ``meta``
    names the regime; every other tensor is dense or sparse, whichever is smaller."""
    from .encodings import ENCODINGS, Writer

    allowed = ENCODINGS
    if meta and meta.get("regime"):
        from ..regimes import REGISTRY

        rec = REGISTRY.get(meta["regime"])
        if rec is not None:
            allowed = tuple(rec.encoders) + ("dense",)
    quants = layer_quants(model)
    coded = _coded_weights(quants)
    writer = Writer()
    for name, t in model.state_dict().items():
        if name in coded:
            lq = coded[name]
            qp = (lq.weight_scale.cpu(), lq.weight_zero_point.cpu(), lq.current_bits())
            codes = [e for e in allowed if e in ("dense", "packed_int", "sparse_int")]
            writer.add(name, t, codes or ["packed_int"], qp)
        else:
            writer.add(name, t, [e for e in ("dense", "sparse") if e in allowed] or ["dense"])
    header = {"format": FORMAT, "version": VERSION, **(meta or {})}
    if model.__dict__.get("lcs_slimmed"):
        header["slim"] = True
    extras: dict[str, Any] = {}
    if quants:
        extras["quant"] = {fqn: lq.current_bits() for fqn, lq in quants.items()}
    if model.__dict__.get("lcs_bn_folded"):
        extras["bn_folded"] = model.__dict__["lcs_bn_folded"]  # conv → BN merged into it (now Identity)
    return writer.tensors(extras), {"lcs": json.dumps(header, separators=(",", ":"))}


def describe_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """Everything an artifact says about itself, in one dict: the header, the quantizing layers
    (``quant``), folded BatchNorms (``bn_folded``) and per tensor its shape, dtype and encoding
    (``tensors``); for inspecting files (e.g. ``lcs.deploy.artifact.describe_artifact("net.safetensors")``)."""
    header = read_metadata(path)
    if header.get("version", 1) < 2:
        return header
    from .encodings import read_layout

    tensors, _ = load_tensors(path)
    doc = read_layout(tensors)
    out = {**header, **{k: v for k, v in doc.items() if k != "rows"}}
    out["tensors"] = {row[0]: {"shape": row[1], "dtype": row[2], "encoding": row[3],
                               **({"bits": row[4][0]} if row[3] in ("packed_int", "sparse_int") else {})}
                      for row in doc["rows"]}
    return out


def network_meta(arch: dict[str, Any] | None, regime: str, method: str | None, alpha: float,
                 levels: dict[str, float]) -> dict[str, Any]:
    """The header of the network at α as ``lcs export`` writes it: eval, export and profile all size
    this same header, so they report the same byte count for the same α."""
    meta = {"arch": arch, "regime": regime, "method": method, "alpha": alpha, **levels}
    return {k: v for k, v in meta.items() if v is not None}


def dense_float32_bytes(model: nn.Module) -> int:
    """Bytes of a plain model's state dict in float32 (lcs's own buffers left out): the reference
    for "% of dense" is this of the full-width, uncompressed network."""
    return sum(t.numel() * 4 for name, t in model.state_dict().items()
               if t.is_floating_point() and "lcs_" not in name)


def information_limit_bytes(model: nn.Module) -> float:
    """What a plain network's weights are worth at least, in bytes: per floating tensor, its nonzero
    values (b bits each for integer-coded weights, their dtype's width otherwise) plus the entropy of
    their positions, n·H(nnz/n) (``lcs.codec``); no header, no names. The artifact is measured against it."""
    from ..codec import information_limit_bits

    coded = {name: lq.current_bits() for name, lq in _coded_weights(layer_quants(model)).items()}
    bits = 0.0
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        nnz = int((t != 0).sum())
        bits += information_limit_bits(t.numel(), nnz, coded.get(name, t.element_size() * 8))
    return bits / 8


def artifact_bytes(model: nn.Module, meta: dict[str, Any] | None = None) -> int:
    """Exact size in bytes of the file ``save_compressed`` would write (serialized in memory)."""
    return len(serialize_tensors(*encode_state(model, meta)))


def save_compressed(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> int:
    """Write a plain (materialized) model as a compressed artifact, atomically; returns its bytes.

    ``meta`` should hold ``{"arch": {"name": ..., "kwargs": {...}}}`` so that ``load_compressed``
    can rebuild the model by name, and ``"regime"`` (its record says which encodings its weights may
    use); a physically slim network marks itself (the loader then shrinks the layers to the stored
    shapes); anything else JSON-serializable is kept alongside.
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
            ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[int]],
                       dict[str, Any]]:
    """The state dict, the (scale, zero point) of every tensor stored as integer codes, the shapes, and
    the layout's extras (quantizing layers, folded BatchNorms)."""
    from .encodings import decode_v1, decode_v2

    version = check_version(path, header, VERSION, "artifact")
    tensors, _ = load_tensors(path)  # verified against the file's digest
    try:
        if version >= 2:
            return decode_v2(tensors)
        return (*decode_v1(tensors, header["tensors"]), {k: header[k] for k in ("quant", "bn_folded") if k in header})
    except DamagedFileError as e:
        raise DamagedFileError(f"{path}: {e}") from None
    except (KeyError, RuntimeError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise DamagedFileError(f"{path}: corrupted artifact ({e})") from None


def _is_slim_of(shapes: dict[str, list[int]], own: dict[str, torch.Tensor], marked: bool) -> bool:
    """The file is a slim version of ``own``: no tensor larger, and it says so (``"slim"``, written by
    ``slim_down``) or some tensor is narrower (files from before the mark). A file with a larger tensor
    is no slim version: loading it reports the real size mismatch."""
    pairs = [(shape, list(own[name].shape)) for name, shape in shapes.items() if name in own]
    fits = all(len(a) == len(b) and all(x <= y for x, y in zip(a, b, strict=True)) for a, b in pairs)
    return fits and (marked or any(a != b for a, b in pairs))


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None, kernels: str = "auto") -> nn.Module:
    """Load an artifact written by ``lcs export`` / ``save_compressed`` as a plain model in eval mode.

    Args:
        path: the ``.safetensors`` artifact.
        model: an uninitialized instance of the architecture, for models that are not in
            ``lcs.models``; by default the model is rebuilt by name from the file's metadata.
        kernels: ``"auto"``: layers that are mostly zeros run on CSR kernels where a micro-benchmark on
            this machine says they are faster (``lcs.layers.kernels``); ``"dense"``: plain kernels only.
    """
    from ..layers.kernels import accelerate, check_kernels

    check_kernels(kernels)
    path = os.fspath(path)
    header = read_metadata(path)
    if header["format"] != FORMAT:
        raise LcsError(f"{path} holds {header['format']!r}, not a compressed network at one α "
                       f"(use lcs.Runtime for subspace artifacts)")
    if model is None:
        if not header.get("arch"):
            raise LcsError(f"{path} does not name its architecture: pass model=")
        model = model_on_meta(header["arch"])
    state, qparams, shapes, extras = _decode(path, header)
    try:
        folded_structure(model, extras.get("bn_folded") or {})  # quantized with BN: BN merged into convs
    except AttributeError:
        raise LcsError(f"{path} folds BatchNorm layers the architecture does not have") from None
    for fqn, bits in (extras.get("quant") or {}).items():  # quantized: input quantizers, then their buffers
        try:
            lq = attach_layer_quant(model.get_submodule(fqn), bits=check_bits(bits))
        except AttributeError:
            raise LcsError(f"{path} quantizes a layer {fqn!r} the architecture does not have") from None
        if f"{fqn}.weight" in qparams:
            lq.set_weight_qparams(*qparams[f"{fqn}.weight"])  # so that the loaded network can be saved again
    own = model.state_dict()
    if _is_slim_of(shapes, own, bool(header.get("slim"))):  # physically slim: shrink first
        from ..layers.slim import resize_to_shapes

        resize_to_shapes(model, shapes)
    assign_state(model, state, path)
    check_assigned(model, path)
    model.eval()  # first: frozen activation grids are what the int8 kernels read
    if kernels == "auto":
        accelerate(model)
    return model
