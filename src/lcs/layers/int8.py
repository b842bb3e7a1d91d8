"""Integer kernels for quantized convs: the codes a quantized lcs network already computes with,
handed from conv to conv as 8-bit tensors.

A quantized lcs conv computes conv(DQ(x), DQ(w)) + b: its input and weight on b-bit grids (b ≤ 8),
the output in float. Where that output reaches the next quantized conv through nothing but ReLUs
and identities (``lcs.graph.conv_chains``: in a pre-activation bottleneck, 1×1 → 3×3 → 1×1), the
next conv quantizes it anyway, to its own grid. So the producer can run PyTorch's quantized conv
(``torch.ops.quantized.conv2d``: oneDNN / fbgemm int8 kernels, VNNI and AMX where the CPU has them)
with the *consumer's* grid as its output grid: integer sums, one requantization, codes clamped to
the consumer's 2^b − 1, and the ReLU between them is the max with the zero point on the codes.
That is the function the float network computes, up to ties in rounding (a code in about 10^5
moves by one) and the int32 rounding of the bias. Convs whose output feeds anything else (a
residual add, the classifier's pooling) keep float kernels: their output is not requantized in the
trained network, and requantizing it would change what the network computes.

Weights are exact: each weight is s·(c − z) for integer codes c on its b-bit grid, so c − z fits
a signed 8-bit tensor with zero point 0 (b ≤ 7, or an 8-bit grid centred on 128: oneDNN's kernel)
or with zero point z − 128 (any 8-bit grid: fbgemm's kernel, which takes a weight zero point).

Deploy side: imports only torch.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
from torch import nn

__all__ = ["Grid", "available", "input_grid", "pack_weight", "quantize_input", "int8_conv2d"]

_ENGINES = ("x86", "fbgemm")  # engines whose conv takes u8 activations with a zero point
# PyTorch marks its quantized tensors deprecated (pytorch/pytorch#184982) and says so on their first
# use; these kernels are what it ships for int8 on CPUs today (``available`` turns False without them)
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel",
                        category=UserWarning)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A b-bit unsigned activation grid as host scalars: value = scale·(code − zero_point)."""

    scale: float
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def max_value(self) -> float:
        """The largest value on the grid (clamping quantized tensors takes values, not codes)."""
        return (self.qmax - self.zero_point) * self.scale


def available() -> bool:
    """Whether this PyTorch build has an int8 conv engine for x86 CPUs, it is the current one, and the
    CPU computes its sums exactly (``_exact_pair_sums``): elsewhere the float kernels compute what the
    quantized network computes, and int8 chains are never chosen."""
    try:
        engine = torch.backends.quantized.engine in _ENGINES and hasattr(torch.ops.quantized, "conv2d_prepack")
    except (AttributeError, RuntimeError):
        return False
    return engine and _exact_pair_sums()


@functools.cache
def _exact_pair_sums() -> bool:
    """Whether this CPU sums u8·s8 products exactly, in int32 (VNNI, AMX). Without them (AVX2,
    AVX-512BW) the kernels add pairs of products in int16 with saturation (``vpmaddubsw``): 8-bit
    activations times 8-bit weights overflow it (codes off by up to 43 on an AVX2 EPYC), and a quantized
    network's outputs moved by 2e-4 from the float kernels'."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def input_grid(quant: nn.Module) -> Grid | None:
    """The activation grid of a layer's input quantizer (``lcs.layers.quant.LayerQuant``) once it is
    active and frozen, else None."""
    from .quant import affine_qparams

    if not getattr(quant, "active", False) or quant.training:
        return None
    bits = quant.current_bits()
    if bits > 8:
        return None
    scale, zero_point = affine_qparams(quant.act_lo, quant.act_hi, bits)
    return Grid(float(scale), int(zero_point), bits)


def pack_weight(conv: nn.Conv2d, quant: nn.Module) -> torch.ScriptObject | None:
    """``conv``'s weight (and float bias) packed for the int8 kernel, from its exact integer codes;
    None where the weight is not on the grid its quantizer recorded or the codes do not fit."""
    scale = quant._buffers.get("weight_scale")
    zero_point = quant._buffers.get("weight_zero_point")
    if scale is None or zero_point is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    w = conv.weight.detach().float()
    s = float(scale)
    rel = torch.round(w / s)  # c − z
    if not torch.equal(rel * scale, w):  # not on the grid: nothing is silently re-rounded
        return None
    lo, hi = int(rel.min()), int(rel.max())
    if lo >= -128 and hi <= 127:
        zp = 0  # symmetric: oneDNN's int8 kernel (VNNI / AMX)
    elif hi - lo <= 255:
        zp = -128 - lo  # a weight zero point: fbgemm's kernel
    else:
        return None
    codes = (rel + zp).to(torch.int8)
    wq = torch._make_per_tensor_quantized_tensor(codes, s, zp)
    bias = conv.bias.detach().float() if conv.bias is not None else None
    return torch.ops.quantized.conv2d_prepack(wq, bias, list(conv.stride), list(conv.padding),
                                              list(conv.dilation), conv.groups)


def quantize_input(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``x`` as u8 codes on ``grid`` (channels-last, as the int8 kernels read it): the codes the layer's
    fake quantization rounds to."""
    q = torch.quantize_per_tensor(x, grid.scale, grid.zero_point, torch.quint8)
    if grid.qmax < 255:
        q = torch.clamp(q, max=grid.max_value)
    return q.contiguous(memory_format=torch.channels_last)


def int8_conv2d(q: torch.Tensor, packed: torch.ScriptObject, out: Grid) -> torch.Tensor:
    """The conv of u8 codes ``q`` with the packed weight, requantized onto the consumer's grid ``out``."""
    y = torch.ops.quantized.conv2d(q.contiguous(memory_format=torch.channels_last), packed,
                                   out.scale, out.zero_point)
    return torch.clamp(y, max=out.max_value) if out.qmax < 255 else y
