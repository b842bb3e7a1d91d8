"""Quantization: per-tensor affine fake quantization of weights and of the activations entering
each quantizing layer (SPEC §1).

* Weights: ``FakeQuant``, a parametrization chained after ``Line`` (like ``TopK``), quantizes
  θ(α) to b = ``state.levels["bits"]`` bits over [min(θ, 0), max(θ, 0)]: the range always holds 0 and the
  zero point is an integer, so 0 is exactly representable (padding and pruned weights stay 0).
* Activations: ``LayerQuant``, a child ``lcs_quant`` of each quantizing layer run by a forward
  pre-hook, quantizes the layer's input over a running min/max (momentum 0.1). The trainer
  switches it on after the warm-up; it observes in training mode and is frozen in eval mode.
  Its range and on/off switch are buffers, so checkpoints and artifacts carry them.

* BatchNorm: a conv whose output only a BatchNorm reads has the BN's scale folded into its weight
  *before* quantizing, as quantization-aware training does (Jacob et al. 2018; torch.ao's
  ``ConvBn2d``): the conv computes with fq(θ·s), s = γ/√(running_var + ε), and the BN's input is
  unscaled by 1/s (a forward pre-hook), so the BN still normalizes with batch statistics in
  training and its running statistics stay in the unfolded domain. ``fold_batchnorm`` then merges
  the BN into the conv's bias for deployment: the quantized grid is the one the deployed conv uses.
  In a subspace the bits change from step to step (and, on a line, the weights with them), so
  each BN keeps one set of running statistics per bit width (``prepare_bn_stats``), selected by
  the current bits, like slimmable networks' switchable BN keeps one per width; the exported
  network carries the set of its own bits (``freeze_bn_stats``).

Scale and zero point stay tensors: no ``.item()`` host round trip in the forward pass. The
gradient is the straight-through estimator: the identity inside the representable range, 0
outside (``fake_quantize`` computes exactly what ``torch.fake_quantize_per_tensor_affine`` does,
faster).

Deploy side: imports only torch (``lcs.load_compressed`` and ``lcs.Runtime`` use it).
"""

from __future__ import annotations

import struct
from typing import Any

import torch
from torch import nn

from ..errors import LcsError
from .bn_stats import freeze_bn_stats, prepare_bn_stats, select_bn_stats

__all__ = ["MOMENTUM", "BITS_RANGE", "check_bits", "affine_qparams", "scalar_qparams", "weight_qparams",
           "fake_quantize", "fake_quantize_values",
           "quantize_codes", "codes_on_grid", "FakeQuant", "LayerQuant", "attach_layer_quant", "layer_quants",
           "set_activation_quant", "fix_bits", "bn_fold_scale", "prepare_bn_folding", "fold_batchnorm",
           "folded_structure", "prepare_bn_stats", "select_bn_stats", "freeze_bn_stats"]

MOMENTUM = 0.1  # running min/max of activations (SPEC §1)
_WEIGHT_QPARAMS = ("weight_scale", "weight_zero_point")
BITS_RANGE = (2, 16)  # what fake quantization and the packed export support


def check_bits(level: float) -> int:
    """A compression level as a whole number of bits in [2, 16]."""
    bits = int(level)
    if bits != level or not (BITS_RANGE[0] <= bits <= BITS_RANGE[1]):
        raise LcsError(f"quantization needs a whole number of bits in [{BITS_RANGE[0]}, {BITS_RANGE[1]}], "
                       f"got {level!r}")
    return bits


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of b-bit unsigned affine quantization over [min(lo, 0), max(hi, 0)].

    Including 0 in the range and rounding the zero point to an integer makes 0 exactly
    representable: code ``zero_point`` dequantizes to (zp − zp)·scale = 0.
    """
    qmax = 2**bits - 1
    lo = lo.detach().float().clamp(max=0.0)
    hi = hi.detach().float().clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)  # an all-zero tensor: any scale, every code is zp
    zero_point = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return scale, zero_point


_F32 = struct.Struct("f")


def _f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (as a Python float)."""
    return _F32.unpack(_F32.pack(v))[0]


_F32_1E_12 = _f32(1e-12)


def scalar_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """``affine_qparams`` on host scalars, in float32 arithmetic step for step (so bit for bit the same
    scale and zero point): for the bake, where tensor ops on one element cost more than the math."""
    # each step computed in double and rounded to float32: for one +, −, × or ÷ of float32 operands
    # that is the float32 result exactly (double holds more than twice float32's precision)
    qmax = 2**bits - 1
    lo32, hi32 = min(_f32(lo), 0.0), max(_f32(hi), 0.0)
    scale = max(_f32(_f32(hi32 - lo32) / qmax), _F32_1E_12)
    zero_point = int(min(max(round(_f32(-lo32 / scale)), 0), qmax))  # round(): half to even, as torch.round
    return scale, zero_point


def fake_quantize_values(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """``fake_quantize`` without autograd, for host-scalar qparams (a float32 scale as a float): the
    same float32 operations, so the same values."""
    inv = _f32(1.0 / scale)  # what ``scale.reciprocal()`` gives in float32
    qmax = 2**bits - 1
    return torch.mul(x, inv).round_().clamp_min_(-zero_point).clamp_max_(qmax - zero_point).mul_(scale)


def weight_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of a weight tensor: its own range, extended to include 0."""
    return affine_qparams(*torch.aminmax(w.detach()), bits)


class _FakeQuantize(torch.autograd.Function):
    """``torch.fake_quantize_per_tensor_affine`` with tensor qparams, bit for bit (a test checks
    values and gradients), in fewer and cheaper memory passes: clamping round(x/s) to
    [−zp, 2^b − 1 − zp] equals clamping the code to [0, 2^b − 1] and subtracting zp, exactly, in float.

    Measured on this CPU (one thread, a 1M-element activation): ``clamp`` with tensor bounds takes
    1.29 ms where ``clamp_min(t).clamp_max_(t)`` takes 0.28 ms; bool kernels are slow (``==`` 1.19 ms,
    ``where`` 4.56 ms) where float arithmetic is not. So on CPU the straight-through mask is a float
    computed arithmetically (r and its clamp are integers: 1 − min(|r − clamp(r)|, 1) is 1 inside and
    0 where clamped) and the backward is one multiply; on GPUs, where bool kernels are fast, the mask
    is a bool (a quarter of the memory) and the backward a ``where``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,  # type: ignore[override]
                qmax: int) -> torch.Tensor:
        r = torch.mul(x, scale.reciprocal()).round_()
        lo, hi = -zero_point, qmax - zero_point
        if not ctx.needs_input_grad[0]:
            return r.clamp_min_(lo).clamp_max_(hi).mul_(scale)
        y = r.clamp_min(lo).clamp_max_(hi)
        if x.device.type == "cpu":  # the mask is computed in r's memory: a fresh tensor costs page faults
            inside = r.sub_(y).abs_().clamp_max_(1.0).neg_().add_(1.0)
        else:
            inside = y == r
        ctx.save_for_backward(inside)  # straight through where the code was not clamped
        return y.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        if inside.dtype == torch.bool:
            return torch.where(inside, grad, 0.0), None, None, None
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize to b-bit codes and dequantize: (clamp(round(x/s) + zp, 0, 2^b − 1) − zp)·s, with the
    straight-through gradient (identity where the code was not clamped, 0 where it was)."""
    return _FakeQuantize.apply(x, scale, zero_point.to(scale.dtype), 2**bits - 1)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes (int32) of ``x`` under (scale, zero point): what the packed export stores."""
    return (torch.round(x.float() / scale) + zero_point).clamp(0, 2**bits - 1).to(torch.int32)


def codes_on_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor | None:
    """The codes of ``x`` when it lies exactly on the grid of (scale, zero point, bits), else None:
    the check before storing a weight as integers, so that nothing is silently re-rounded."""
    codes = quantize_codes(x, scale, zero_point, bits)
    return codes if torch.equal((codes - zero_point).float() * scale, x.float()) else None


def bn_fold_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """s = γ/√(running_var + ε): the per-channel factor a BatchNorm in eval mode multiplies its
    input by. A zero γ is nudged to 1e-12 so that unscaling by 1/s stays finite."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)


def _per_out_channel(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (like.dim() - 1)))


class FakeQuant(nn.Module):
    """Weight parametrization: per-tensor affine fake quantization to ``state.levels["bits"]`` bits, of the
    weight times its BatchNorm's scale when a BN is folded into this layer (``fold``)."""

    def __init__(self, state: Any, fold: nn.Module | None = None):
        super().__init__()
        self.state = state
        object.__setattr__(self, "fold", fold)  # a reference, not a child: the BN is the model's own

    def prescale(self, w: torch.Tensor) -> torch.Tensor:
        """The tensor that gets quantized: θ, or θ·s with a folded BatchNorm."""
        if self.fold is None:
            return w
        select_bn_stats(self.fold)  # the conv runs before its BN: use this bit width's statistics now
        return w * _per_out_channel(bn_fold_scale(self.fold), w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        bits = check_bits(self.state.levels["bits"])
        w = self.prescale(w)
        return fake_quantize(w, *weight_qparams(w, bits), bits)

    def bake(self, w: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """``forward`` for a plain network being baked (no autograd): also records the weight's scale
        and zero point on the layer's input quantizer, for the packed export. The same values as
        ``forward``, bit for bit (tested), with the qparams computed on host scalars: a switch of α
        bakes every quantized layer, and ~20 tiny tensor ops per layer cost 1.5 ms of it."""
        bits = check_bits(self.state.levels["bits"])
        w = self.prescale(w).detach()
        lo, hi = torch.aminmax(w)
        scale, zero_point = scalar_qparams(float(lo), float(hi), bits)
        module.lcs_quant.set_weight_qparams(torch.tensor(scale, dtype=torch.float32),
                                            torch.tensor(zero_point, dtype=torch.int32), fresh=True)
        return fake_quantize_values(w, scale, zero_point, bits)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


class LayerQuant(nn.Module):
    """The activation quantizer of one layer (its child ``lcs_quant``), run on the layer's input.

    Buffers (saved in state_dict): ``act_lo``/``act_hi``, the running range; ``act_observed``,
    whether the range holds data yet (the first batch sets it, later ones average with momentum
    0.1, as torch's moving-average observers do); ``act_active``, the on/off switch, mirrored in
    the plain attribute ``active`` so the forward pass never reads a tensor on the host.

    Bits: ``bits`` when set (plain networks, fixed at materialization), else ``state.levels["bits"]`` (the
    subspace's shared state). A plain network also records its weight's ``weight_scale`` and
    ``weight_zero_point`` (non-persistent buffers) so that ``lcs.save_compressed`` can store the
    weight as integer codes.
    """

    def __init__(self, state: Any = None, bits: int | None = None, momentum: float = MOMENTUM):
        super().__init__()
        if state is None and bits is None:
            raise LcsError("LayerQuant needs the subspace state or fixed bits")
        self.state = state
        self.bits = bits
        self.momentum = momentum
        self.active = False
        self.register_buffer("act_lo", torch.zeros(()))
        self.register_buffer("act_hi", torch.zeros(()))
        self.register_buffer("act_observed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("act_active", torch.zeros((), dtype=torch.bool))

    def current_bits(self) -> int:
        return check_bits(self.bits if self.bits is not None else self.state.levels["bits"])

    def set_active(self, on: bool) -> None:
        self.active = bool(on)
        self.act_active.fill_(self.active)

    def set_weight_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor, fresh: bool = False) -> None:
        """Record the weight's grid. ``fresh``: the caller made these 0-dim float32 / int32 tensors
        for this layer alone (the bake), so they are stored as they are, not converted and copied."""
        # written into the buffer dict directly: register_buffer's checks cost a switch ~0.8 ms on 21 layers
        if not fresh:
            scale = scale.detach().float().reshape(()).clone()
            zero_point = zero_point.detach().to(torch.int32).reshape(()).clone()
        self._buffers["weight_scale"], self._buffers["weight_zero_point"] = scale, zero_point
        self._non_persistent_buffers_set.update(_WEIGHT_QPARAMS)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.float(), hi.float()
        m = self.momentum
        self.act_lo.copy_(torch.where(self.act_observed, self.act_lo + m * (lo - self.act_lo), lo))
        self.act_hi.copy_(torch.where(self.act_observed, self.act_hi + m * (hi - self.act_hi), hi))
        self.act_observed.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # deferred: the layer runs on lcs.layers.kernels, which quantizes the input itself (to 8-bit
        # codes for an integer kernel, or with ``quantize`` for a float one)
        return x if self.__dict__.get("lcs_deferred", False) else self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized on this layer's grid (observed first in training mode)."""
        if not self.active:
            return x
        if self.training:
            self._observe(x)
        bits = self.current_bits()
        y = fake_quantize(x.float(), *affine_qparams(self.act_lo, self.act_hi, bits), bits)
        return y.to(x.dtype)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.active = bool(self.act_active)  # once per load, not per forward

    def extra_repr(self) -> str:
        bits = self.bits if self.bits is not None else "level"
        return f"bits={bits}, active={self.active}, momentum={self.momentum}"


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    # A module-level function (not a closure or bound method): copies of the layer (deepcopy,
    # Runtime's shared-structure copies) run their own ``lcs_quant``.
    return (module.lcs_quant(args[0]), *args[1:])


def attach_layer_quant(module: nn.Module, state: Any = None, bits: int | None = None) -> LayerQuant:
    """Give ``module`` an input quantizer (child ``lcs_quant`` + forward pre-hook)."""
    if "lcs_quant" in module._modules:
        raise LcsError(f"{type(module).__name__} already has an input quantizer")
    lq = LayerQuant(state, bits)
    module.lcs_quant = lq
    module.register_forward_pre_hook(_quantize_input)
    return lq


def layer_quants(model: nn.Module) -> dict[str, LayerQuant]:
    """Fully qualified layer name → its LayerQuant, for every quantizing layer."""
    return {fqn: m._modules["lcs_quant"] for fqn, m in model.named_modules()
            if isinstance(m._modules.get("lcs_quant"), LayerQuant)}


def set_activation_quant(model: nn.Module, on: bool) -> int:
    """Switch activation quantization on or off in every quantizing layer; returns how many."""
    quants = layer_quants(model)
    for lq in quants.values():
        lq.set_active(on)
    return len(quants)


def fix_bits(model: nn.Module, bits: int) -> int:
    """Fix every quantizing layer's input quantizer of a plain network at ``bits`` and drop its
    reference to the subspace state (each network keeps its own bits); returns how many layers."""
    quants = layer_quants(model)
    for lq in quants.values():
        lq.bits, lq.state = check_bits(bits), None
    return len(quants)


def _unscale_input(bn: nn.Module, args: tuple) -> tuple:
    # The folded conv computed conv(x, fq(θ·s)) + b: undo the scale on the weight's part only, so the
    # BN sees (and tracks) conv(x, θ) + b, the unfolded output. (Dividing the bias by s too made
    # training compute BN(conv + b/s) while the export, rightly, computes BN(conv + b).)
    x = args[0]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    s = bn_fold_scale(bn).reshape(shape)
    conv = bn.__dict__.get("lcs_fold_conv")
    bias = getattr(conv, "bias", None)
    if bias is None:
        return (x / s, *args[1:])
    b = bias.reshape(shape)
    return ((x - b) / s + b, *args[1:])


def prepare_bn_folding(model: nn.Module, compressed: set[str], folds: dict[str, str] | None = None
                       ) -> dict[str, str]:
    """Find each quantizing conv whose output only a BatchNorm reads; give that BN the unscaling
    pre-hook and mark the conv (``lcs_fold_bn``) so its ``FakeQuant`` folds the BN's scale.
    Records and returns {conv: bn} as ``model.lcs_bn_folds``. BNs elsewhere stay as they are.

    ``folds``: the pairs a subspace file recorded when it was trained: used as they are, with no
    tracing, so a loaded subspace computes what was trained even if tracing would now decide otherwise."""
    bns = (nn.BatchNorm2d,)
    if folds is None:
        if not any(isinstance(m, bns) for m in model.modules()):
            return {}
        from ..graph import norms_after_convs, trace

        graph, modules = trace(model, "folding BatchNorm into quantized convs")
        pairs = [(conv.target, norm.target) for conv, norm in norms_after_convs(graph, modules, bns)
                 if conv.target in compressed]
    else:
        modules = dict(model.named_modules())
        pairs = list(folds.items())
    chosen = {}
    for conv_fqn, bn_fqn in pairs:
        bn, conv = modules.get(bn_fqn), modules.get(conv_fqn)
        if not isinstance(bn, bns) or conv is None:
            raise LcsError(f"cannot fold {bn_fqn!r} into {conv_fqn!r}: the model has no such BatchNorm2d and conv")
        if not (bn.affine and bn.track_running_stats):
            raise LcsError(f"cannot fold {bn_fqn!r} into {conv_fqn!r}: it needs affine=True and running "
                           f"statistics")
        conv.__dict__["lcs_fold_bn"] = bn
        bn.__dict__["lcs_fold_conv"] = conv  # its bias is not scaled (``_unscale_input``)
        bn.register_forward_pre_hook(_unscale_input)
        chosen[conv_fqn] = bn_fqn
    model.__dict__["lcs_bn_folds"] = chosen
    return chosen


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    model.get_submodule(parent)._modules[name] = new


def folded_structure(model: nn.Module, folds: dict[str, str]) -> nn.Module:
    """The layout of a folded network, without values: each folded BN becomes ``nn.Identity`` and
    its conv gains a bias. The loader calls this on a fresh model before loading its weights."""
    for conv_fqn, bn_fqn in folds.items():
        conv = model.get_submodule(conv_fqn)
        if conv.bias is None:
            conv._parameters["bias"] = nn.Parameter(conv.weight.new_zeros(conv.weight.shape[0]))
        _replace(model, bn_fqn, nn.Identity())
    model.__dict__["lcs_bn_folded"] = dict(folds)
    return model


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Merge each folded BatchNorm into its conv, in place, on a plain network whose conv weights
    already hold fq(θ·s) (``materialize`` and ``Runtime`` bake them): in eval mode
    BN(conv(x, W)/s + b) = conv(x, W) + β + s·(b − μ), so the conv gets that bias and the BN goes.
    Modules are replaced in their parents' dicts and parameter dicts, never mutated, so networks
    that share structure with this one (``Runtime``'s copies) are untouched."""
    folds = model.__dict__.pop("lcs_bn_folds", None)
    if not folds:
        return model
    for conv_fqn, bn_fqn in folds.items():
        conv, bn = model.get_submodule(conv_fqn), model.get_submodule(bn_fqn)
        s = bn_fold_scale(bn)
        b = conv.bias if conv.bias is not None else torch.zeros_like(s)
        conv._parameters = {**conv._parameters, "bias": nn.Parameter(bn.bias + s * (b - bn.running_mean),
                                                                      requires_grad=False)}
        conv.__dict__.pop("lcs_fold_bn", None)
    return folded_structure(model, folds)
