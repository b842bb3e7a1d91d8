"""Sparse and integer kernels for compressed networks, chosen per layer by measurement on this machine.

A TopK network at density 0.05 holds 95 % zeros, but ``nn.Conv2d`` multiplies them all. Here each
mostly-zero Conv2d / Linear can run on one of two sparse kernels:

* ``csr``: a CSR × dense product on MKL (``torch.sparse.mm``): a 1×1 conv multiplies the input
  viewed as a (C, N·H·W) matrix, a k×k conv its unfolded columns (``conv_columns``: the padded
  input's windows, one strided copy), a linear the transposed input;
* ``direct`` (convs, with numba): direct sparse convolution, one contiguous multiply-add of a
  shifted input plane per nonzero (``lcs.layers.direct``), nothing unfolded: it wins where the
  columns of a thin layer at a large batch made the CSR product memory-bound.

Which of ``dense``, ``csr`` and ``direct`` is fastest depends on the layer's shape, its density, the
batch and the CPU (SPEC §8), so it is decided by a micro-benchmark of each kernel on the real input
shape, once per (machine, layer shape, input size, batch, density bucket), and cached on disk
(``$LCS_CACHE/kernels-*.json``), so that a later switch of α costs only building the sparse weights.

A quantized conv that hands its output to the next quantized conv (``KernelPlan.chains``) has a
fourth candidate, ``int8`` (``lcs.layers.int8``): the codes go from conv to conv as 8-bit tensors.

A sparse conv computes the chain around it in its own pass (``KernelPlan.forwards``,
``lcs.graph.conv_fusions``): its folded norm, a residual add, a ReLU after, and a pre-activation
norm → ReLU before it. A network left on dense kernels runs in whichever layout (NCHW or
channels-last) measured faster, whole, per input shape (``_Layout``).

``accelerate(net)`` turns a plain network's compressible layers into ``SparseConv2d`` /
``SparseLinear``: subclasses with the same parameters and state dict (the dense weight stays, so
artifacts, ONNX export and ``load_state_dict`` see an ordinary layer) plus its sparse copies (built
on first use) and, per batch size, the kernel that won. ``kernel_report(net)`` says which kernel each layer runs.

Deploy side: imports only torch, the standard library and (lazily, for ``direct``) numba.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import threading
import time
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import direct as direct_kernel
from . import int8 as int8_kernel
from . import pool as pool_kernel

__all__ = ["SparseConv2d", "SparseLinear", "FoldedBatchNorm2d", "accelerate", "KernelPlan", "kernel_plan",
           "conv_fused", "dense_kernels",
           "kernel_report", "layout_report", "layout_at", "sparse_layer_count", "int8_layer_count",
           "check_kernels", "KernelChooser",
           "MAX_DENSITY", "csr_conv2d", "csr_linear", "conv_columns"]

MAX_DENSITY = 0.5  # above this, dense kernels win on every shape measured here: not even tried
_BUCKET = 40  # densities are bucketed in steps of 1/40 for the cached decisions


def conv_columns(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The im2col matrix of ``x`` for ``conv`` (N, C·kh·kw, Ho·Wo), equal to ``F.unfold``'s, built as
    one strided copy of the padded input's windows: 2–6× faster than ``F.unfold`` here (b64, 16×32×32,
    3×3: 2.1 vs 8.4 ms; b1, 64×56×56: 0.27 vs 1.55 ms), and the unfolding was what made sparse
    3×3 convs lose."""
    if conv.dilation != (1, 1):
        return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    n, c = x.shape[:2]
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    win = x.unfold(2, kh, sh).unfold(3, kw, sw)  # N, C, Ho, Wo, kh, kw (a view)
    ho, wo = win.shape[2], win.shape[3]
    return win.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def csr_conv2d(x: torch.Tensor, csr: torch.Tensor, conv: nn.Conv2d, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(x)`` computed as CSR(weight as O × C·k·k) × each sample's input columns, written in
    place into the output (one ``torch.mm(..., out=)`` per sample: measured 5× faster than one
    product over the batch's transposed columns, which costs two transposing copies)."""
    n, c, h, w = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    if (kh, kw) == (1, 1) and conv.padding in ((0, 0), "valid"):
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        ho, wo = x.shape[2], x.shape[3]
        cols = x.reshape(n, c, ho * wo)
    else:
        cols = conv_columns(x, conv)  # N, C·k·k, L
        ho = (h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // sw + 1
    out = x.new_empty(n, csr.shape[0], ho * wo)
    for i in range(n):
        torch.mm(csr, cols[i], out=out[i])
    out = out.view(n, -1, ho, wo)
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


def csr_linear(x: torch.Tensor, csr: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as CSR(weight) × xᵀ."""
    lead = x.shape[:-1]
    out = torch.sparse.mm(csr, x.reshape(-1, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, out.shape[-1])


def _to_csr(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are tested
        warnings.simplefilter("ignore")
        return w.reshape(w.shape[0], -1).to_sparse_csr()


KERNELS = ("dense", "csr", "direct")


def _nearest(decisions: dict[int, str], batch: int) -> str:
    if batch in decisions:
        return decisions[batch]
    if not decisions:
        return "dense"
    near = min(decisions, key=lambda b: abs(math.log(b) - math.log(batch)))
    return decisions[near]


class _SparseMixin:
    """What both sparse layers share: the density, the sparse weights (built on first use: many layers
    measure faster dense, and a switch of α should not pay for their sparse copies), the per-batch
    kernel decisions, the chooser."""

    lcs_density: float
    lcs_decisions: dict[int, str]
    lcs_chooser: KernelChooser | None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) the sparse kernels compute with, built once: the layer's own, or, where
        ``accelerate`` folded the BatchNorm that reads this conv (``lcs_fold``), W·s and β + s·(b − μ)
        with s = γ/√(σ² + ε): the same zeros, and the norm's pass over the output is gone."""
        eff = self.__dict__.get("lcs_effective")
        if eff is None:
            w = self.weight.detach()
            b = self.bias.detach() if self.bias is not None else None
            bn = self.__dict__.get("lcs_fold")
            if bn is not None:
                s, shift = _norm_affine(bn)
                w = w * s.view(-1, *([1] * (w.dim() - 1)))
                b = shift if b is None else shift + s * b
            eff = self.__dict__["lcs_effective"] = (w, b)
        return eff

    def csr(self) -> torch.Tensor:
        """The weight as a CSR matrix (rows: output channels), built once."""
        csr = self.__dict__.get("lcs_csr")
        if csr is None:  # two threads may both build it: the same value, one assignment wins
            csr = self.__dict__["lcs_csr"] = _to_csr(self.effective()[0])
        return csr

    def direct(self) -> direct_kernel.DirectWeight:
        """The weight's nonzeros as the direct kernel reads them, built once."""
        packed = self.__dict__.get("lcs_direct")
        if packed is None:
            packed = self.__dict__["lcs_direct"] = direct_kernel.DirectWeight(self.effective()[0], self.stride)
        return packed

    def __deepcopy__(self, memo: dict) -> nn.Module:
        # torch cannot deep-copy CSR tensors: copy the layer as a plain one; the copy builds its own
        # CSR weight on first use (the chooser is shared: it is a cache)
        cls, chooser = type(self), self.__dict__.pop("lcs_chooser")
        built = {k: self.__dict__.pop(k) for k in _BUILT if k in self.__dict__}
        try:
            self.__class__ = _PLAIN[cls]
            new = copy.deepcopy(self, memo)
        finally:
            self.__class__, self.lcs_chooser = cls, chooser
            self.__dict__.update(built)
        new.__class__ = cls
        new.lcs_chooser = chooser
        return new

    def int8_weight(self) -> torch.ScriptObject | None:
        """The weight packed for the int8 kernel (``lcs.layers.int8``), built once; None where this
        layer hands no codes to a next conv or its weight is not on an 8-bit grid."""
        d = self.__dict__
        if "lcs_int8" not in d:
            quant = d.get("lcs_quant_in")
            ok = d.get("lcs_int8_out") is not None and quant is not None and isinstance(self, nn.Conv2d)
            d["lcs_int8"] = int8_kernel.pack_weight(self, quant) if ok else None
        return d["lcs_int8"]

    def _dense_weight(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the dense kernel at inference: the folded ones where a norm folded
        (``effective()``), else the layer's own (read live); for a channels-last input, a
        channels-last copy of the weight, kept while the weight is unchanged. oneDNN reorders an
        NCHW weight on every call: ResNet18 at batch 1 ran 38 ms channels-last with NCHW weights,
        28 ms with channels-last ones."""
        d = self.__dict__
        w, b = self.effective() if d.get("lcs_fold") is not None else (self.weight, self.bias)
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return w, b
        cl = d.get("lcs_effective_cl")
        if cl is None or cl[0] is not w or cl[1] != w._version:
            cl = d["lcs_effective_cl"] = (w, w._version, w.detach().contiguous(memory_format=torch.channels_last))
        return cl[2], b

    def prologue(self, pre: nn.Module) -> tuple[Any, Any]:
        """``pre``'s eval affine map (s = γ/√(σ² + ε), t = β − μ·s) per nonzero of the direct weight
        (the scale and shift of the input channel each nonzero reads), built once: the direct
        kernel computes ReLU(s·x + t) as it reads x, so the norm's and the ReLU's passes are gone."""
        packed = self.__dict__.get("lcs_prologue")
        if packed is None or packed[0] is not pre:
            s, t = _norm_affine(pre)
            chan = torch.from_numpy(self.direct().chan)
            packed = (pre, s.float()[chan].contiguous().numpy(), t.float()[chan].contiguous().numpy())
            self.__dict__["lcs_prologue"] = packed
        return packed[1], packed[2]

    def _kernel(self, x: torch.Tensor, pre: nn.Module | None = None, relu: bool = False) -> str:
        """The kernel for this input: "dense" for a dense layer that only folds its norm, for
        autograd, norms in training and inputs neither float32 nor 8-bit codes, else the measured choice."""
        d = self.__dict__
        fold = d.get("lcs_fold")
        if d.get("lcs_dense_only") or (x.dtype != torch.float32 and not x.is_quantized) or torch.is_grad_enabled() \
                or (fold is not None and fold.training) or (pre is not None and pre.training):
            return "dense"
        batch = int(x.shape[0]) if x.dim() > 1 else 1
        if batch not in self.lcs_decisions and self.lcs_chooser is not None:
            self.lcs_decisions[batch] = self.lcs_chooser.decide(self, x, pre=pre, relu=relu)
        return _nearest(self.lcs_decisions, batch)

    def run(self, kernel: str, x: torch.Tensor, residual: torch.Tensor | None = None,
            pre: nn.Module | None = None, relu: bool = False) -> torch.Tensor:
        """This layer's output on ``kernel`` (what the chooser times, and the forward pass runs):
        ``relu?(conv(relu(pre(x))) + residual?)``, where ``pre`` is a BatchNorm before the ReLU
        before this conv (``conv_fused``). The direct kernel computes the pre-norm, the add and the
        last ReLU in its own pass; the others run them around the product. A layer on a chain of
        integer kernels (``lcs_quant_in``) quantizes its input here (after ``pre``): to u8 codes
        for ``int8`` (8-bit codes from the conv before it are used as they are), by fake
        quantization otherwise."""
        d = self.__dict__
        in_kernel = kernel == "direct" and d.get("lcs_quant_in") is None and not x.is_quantized
        if pre is not None and not (in_kernel and _eval_affine(pre)):
            x = _relu_fresh(pre(x), x)
            pre = None
        if in_kernel:
            return direct_kernel.direct_conv2d(x, self.direct(), self, self.effective()[1], residual,
                                               prologue=self.prologue(pre) if pre is not None else None,
                                               relu=relu)
        if kernel == "int8":
            grid = d["lcs_grid_in"]
            q = x if x.is_quantized else int8_kernel.quantize_input(x, grid)
            y = int8_kernel.int8_conv2d(q, self.int8_weight(), d["lcs_int8_out"])
            return _finish(y, residual, relu)
        if x.is_quantized:
            x = x.dequantize()  # codes on this layer's own grid: its fake quantization would not move them
        elif d.get("lcs_quant_in") is not None:
            quant = d["lcs_quant_in"]
            if torch.is_grad_enabled() or quant.training or x.dtype != torch.float32:
                x = quant.quantize(x)  # with its straight-through gradient (and observation, in training)
            else:  # the same grid values in two passes over x instead of five
                x = int8_kernel.quantize_input(x, d["lcs_grid_in"]).dequantize()
        if kernel == "direct":
            return direct_kernel.direct_conv2d(x, self.direct(), self, self.effective()[1], residual, relu=relu)
        if kernel == "dense":
            fold = d.get("lcs_fold")
            if isinstance(self, nn.Conv2d) and not (torch.is_grad_enabled() or (fold is not None and fold.training)):
                # the folded weights (one dense conv instead of conv, then norm), in the input's layout
                y = self._conv_forward(x, *self._dense_weight(x))
            else:
                y = _PLAIN[type(self)].forward(self, x)  # the plain layer, then its norm's own forward
                y = y if fold is None else nn.BatchNorm2d.forward(fold, y)
        elif kernel == "csr":
            y = (csr_conv2d(x, self.csr(), self, self.effective()[1]) if isinstance(self, nn.Conv2d)
                 else csr_linear(x, self.csr(), self.bias))
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
        return _finish(y, residual, relu)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, pre: nn.Module | None = None,
                relu: bool = False) -> torch.Tensor:
        return self.run(self._kernel(x, pre, relu), x, residual, pre, relu)


def _finish(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``relu?(y + residual?)``; in place where autograd allows (y is the kernel's fresh output:
    writing into it skips a fresh 16 MB buffer per op at batch 64, which cost 1.7 ms against 0.3)."""
    in_place = not (y.requires_grad or y.is_quantized)
    if residual is not None:
        same = not residual.is_quantized and residual.shape == y.shape and residual.dtype == y.dtype
        y = y.add_(residual) if in_place and same else y + residual
    if not relu:
        return y
    return y.relu_() if in_place else torch.relu(y)


def _relu_fresh(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ReLU of a norm's output ``y`` of input ``x``: in place where ``y`` is a fresh tensor and
    autograd allows (a norm that passes its input through must not overwrite it)."""
    return torch.relu(y) if (y is x or y.requires_grad) else y.relu_()


def _norm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = s·x + t per channel in eval mode: s = γ/√(σ² + ε), t = β − μ·s."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    t = -bn.running_mean * s
    if bn.affine:
        s, t = s * bn.weight.detach(), t * bn.weight.detach() + bn.bias.detach()
    return s, t


def _eval_affine(norm: nn.Module) -> bool:
    """A BatchNorm2d that, in eval mode, is the per-channel affine map of its running statistics."""
    return (type(norm) is nn.BatchNorm2d and not norm.training and norm.track_running_stats
            and norm.running_mean is not None)


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """An ``nn.Conv2d`` that runs on CSR × columns or direct sparse convolution for the batch sizes
    where that measured faster."""


class SparseLinear(_SparseMixin, nn.Linear):
    """An ``nn.Linear`` that runs as CSR × xᵀ for the batch sizes where that measured faster."""


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that the sparse conv before it applies (``accelerate``): it passes its input
    through. Its parameters and statistics stay, so the state dict is the plain network's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


_PLAIN = {SparseConv2d: nn.Conv2d, SparseLinear: nn.Linear, pool_kernel.FastMaxPool2d: nn.MaxPool2d,
          FoldedBatchNorm2d: nn.BatchNorm2d}
# derived from the weight (and the norm before it), rebuilt on first use
_BUILT = ("lcs_csr", "lcs_direct", "lcs_effective", "lcs_effective_cl", "lcs_int8", "lcs_prologue")
# an integer-kernel chain's wiring (``accelerate``): the input quantizer and its grid, the next conv's grid
_CHAIN = ("lcs_quant_in", "lcs_grid_in", "lcs_int8_out")


def _machine_key() -> str:
    """Decisions hold for this CPU, this torch build and this thread count only."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    raw = f"{cpu}|{os.cpu_count()}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _cache_path() -> str:
    root = os.environ.get("LCS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lcs")
    return os.path.join(root, f"kernels-{_machine_key()}.json")


class KernelChooser:
    """Times every kernel of one layer (dense, csr, and direct for convs where numba is available)
    on its real input and remembers the winner per (layer shape, input size, batch, density
    bucket), in memory and on disk.

    ``margin``: a sparse kernel must be this much faster than dense, alone, to be chosen (0.75: 25 %
    faster): inside the network its unfolded columns compete for cache, and with 10 % the digits
    demo's batch-64 network at density 0.025 ran 1.6× slower than dense (15 layers sparse).
    ``path=None``: the machine's cache file; ``""``: no file.
    """

    def __init__(self, path: str | None = None, repeats: int = 5, margin: float = 0.75):
        self.path = _cache_path() if path is None else path
        self.repeats = repeats
        self.margin = margin
        self._lock = threading.Lock()
        self._table: dict[str, dict[str, Any]] = {}
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    loaded = json.load(f)
                self._table = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._table = {}  # a damaged cache only costs re-measuring

    @staticmethod
    def key(layer: nn.Module, x: torch.Tensor, pre: nn.Module | None = None, relu: bool = False) -> str:
        bucket = round(layer.lcs_density * _BUCKET)
        if isinstance(layer, nn.Conv2d):
            shape = (f"conv{tuple(layer.weight.shape)}s{layer.stride}p{layer.padding}d{layer.dilation}"
                     f"in{tuple(x.shape[2:])}")
        else:
            shape = f"linear{tuple(layer.weight.shape)}"
        folded = "|bn" if layer.__dict__.get("lcs_fold") is not None else ""  # its timings include the norm
        # int8: timed on the integer kernel too; q: its input arrives as 8-bit codes
        codes = ("|int8" if "int8" in KernelChooser.candidates(layer) else "") + ("|q" if x.is_quantized else "")
        # pre / relu: its timings include the norm and ReLU before it, the ReLU after it
        around = ("|pre" if pre is not None else "") + ("|relu" if relu else "")
        return f"{shape}|b{int(x.shape[0])}|d{bucket}/{_BUCKET}{folded}{codes}{around}|k5"  # k5: compiled phase split

    def measure(self, layer: nn.Module, x: torch.Tensor, pre: nn.Module | None = None,
                relu: bool = False) -> dict[str, float]:
        """Each candidate kernel's best time on ``x``, in ms. The kernels take turns, round by round
        (dense, csr, direct, dense, ...). Timed one kernel after the other, a change of load on the
        machine between two kernels' turns decided the choice: on this VM, whose speed drifts by
        ±50 % within minutes, cached choices marked 1×1 convs dense at one density that direct ran
        in two thirds of dense's time at the densities beside it, and when timed again."""
        around = {"pre": pre, "relu": relu} if pre is not None or relu else {}
        runs = {k: functools.partial(layer.run, k, **around) for k in self.candidates(layer)}
        for run in runs.values():
            run(x)  # warm-up: first use builds the sparse copies
        best = dict.fromkeys(runs, math.inf)
        for _ in range(self.repeats):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run(x)
                best[k] = min(best[k], time.perf_counter() - t0)
        return {k: t * 1e3 for k, t in best.items()}

    @staticmethod
    def candidates(layer: nn.Module) -> tuple[str, ...]:
        """The kernels that can run ``layer`` here: the sparse ones for a layer at most ``MAX_DENSITY``
        dense, the integer one for a quantized conv that hands its codes to the next."""
        kernels: tuple[str, ...] = ("dense",)
        if layer.__dict__.get("lcs_density", 0.0) <= MAX_DENSITY:  # unset: a layer made sparse by hand
            sparse_direct = isinstance(layer, nn.Conv2d) and direct_kernel.eligible(layer) and direct_kernel.available()
            kernels = KERNELS if sparse_direct else ("dense", "csr")
        if layer.int8_weight() is not None:
            kernels += ("int8",)
        return kernels

    def choose(self, timings: dict[str, float]) -> str:
        """The fastest kernel, where a sparse or integer one must beat dense by the margin."""
        best = min((k for k in timings if k != "dense"), key=lambda k: timings[k], default=None)
        return best if best is not None and timings[best] < self.margin * timings["dense"] else "dense"

    def decide(self, layer: nn.Module, x: torch.Tensor, pre: nn.Module | None = None, relu: bool = False) -> str:
        """The kernel for ``layer`` on ``x`` (inside ``relu?(layer(relu(pre(x))))`` where given):
        cached, or measured now."""
        key = self.key(layer, x, pre, relu)
        with self._lock:
            hit = self._table.get(key)
        if hit is not None:  # timings are cached, the margin is applied now
            # only kernels that can run here (a cache written where numba was installed may name direct)
            return self.choose({k: hit[f"{k}_ms"] for k in self.candidates(layer) if f"{k}_ms" in hit})
        with torch.no_grad():
            timings = self.measure(layer, x, pre, relu)
        kernel = self.choose(timings)
        with self._lock:
            self._table[key] = {"kernel": kernel, **{f"{k}_ms": ms for k, ms in timings.items()}}
            self._save()
        return kernel

    def layout(self, signature: str, x: torch.Tensor, measure: Any) -> bool:
        """Whether a network (``signature``) runs faster channels-last on inputs shaped like ``x``:
        cached, or ``measure()``d now ({"nchw": ms, "channels_last": ms}). Channels-last must win
        by 5 %: the default layout costs no conversion of the input."""
        key = f"layout|{signature}|in{tuple(x.shape)}|l1"
        with self._lock:
            hit = self._table.get(key)
        if hit is None:
            timings = measure()
            hit = {"layout": "channels_last" if timings["channels_last"] < 0.95 * timings["nchw"] else "nchw",
                   **{f"{k}_ms": ms for k, ms in timings.items()}}
            with self._lock:
                self._table[key] = hit
                self._save()
        return hit["layout"] == "channels_last"

    def _save(self) -> None:
        if not self.path:
            return
        from ..errors import LcsError
        from ..files import atomic_write

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_write(self.path, "w") as f:
                json.dump(self._table, f, indent=0, sort_keys=True)
        except (OSError, LcsError):
            pass  # read-only or full disk: the decisions stay in memory


_DEFAULT_CHOOSER: KernelChooser | None = None


def default_chooser() -> KernelChooser:
    global _DEFAULT_CHOOSER
    if _DEFAULT_CHOOSER is None:
        _DEFAULT_CHOOSER = KernelChooser()
    return _DEFAULT_CHOOSER


def _eligible(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return type(m) is nn.Linear


def conv_fused(conv: nn.Module, pre: nn.Module | None, norm: nn.Module | None, x: torch.Tensor,
               residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``relu?(norm?(conv(relu(pre(x)))) + residual?)`` (a ``lcs.graph.ConvFusion``): what a
    ``KernelPlan``'s forward calls in place of the chain. A sparse conv that folded the norm
    computes it all in its own pass (the direct kernel applies the pre-norm and ReLU as it reads
    its input, adds the residual as it accumulates and clamps as it writes); anything else runs
    the modules and the add as the model did."""
    if isinstance(conv, SparseConv2d) and (norm is None or conv.__dict__.get("lcs_fold") is norm):
        return conv(x, residual, pre=pre, relu=relu)
    if pre is not None:
        x = _relu_fresh(pre(x), x)
    y = conv(x)
    if norm is not None:
        y = norm(y)
    return _finish(y, residual, relu)  # y: the conv's or norm's fresh output


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What ``accelerate`` reads from a model's dataflow, once per architecture (``torch.fx`` traces
    of the plain network; ``Baker`` keeps it for every α it bakes).

    ``folds``: {conv: BatchNorm2d} for each BN that reads a plain conv's output and nothing else
    does (what may fold into a sparse conv). ``forwards``: {module: (forward, convs)} for each
    module whose own forward holds a chain "norm → ReLU →" conv "(→ norm) (→ + residual) (→ ReLU)"
    nothing else reads (``lcs.graph.ConvFusion``; a residual block): that forward, recompiled with
    each chain as one ``conv_fused`` call, and the convs (full names) it fuses. ``accelerate`` binds
    it to the block where one of those convs is sparse: at batch 64 the adds took a third of the
    sparse cPreResNet20's time, and the pre-activation norms and ReLUs a fifth. Blocks are
    rewritten one by one, not the whole network as one flat forward: the flat one's attribute
    chains (``getattr(self.blocks, "0").conv1``) cost 0.15 ms a forward at batch 1. ``chains``:
    {conv: next conv} where the first's output reaches the second through ReLUs and identities
    only (``lcs.graph.conv_chains``): a quantized conv can hand the next its input as 8-bit codes."""

    folds: dict[str, str]
    forwards: dict[str, tuple[Any, frozenset[str]]] = dataclasses.field(default_factory=dict)
    chains: dict[str, str] = dataclasses.field(default_factory=dict)


def _fused_forward(block: nn.Module) -> tuple[Any, list[str]] | None:
    """``block``'s forward with each ``ConvFusion`` in it computed by one ``conv_fused`` call,
    compiled by fx, and the fused convs' names within the block; None where there is nothing to
    fuse or fx cannot trace or compile the block alone."""
    from ..errors import LcsError
    from ..graph import conv_fusions, trace

    try:
        graph, modules = trace(block, "fusing residual adds and ReLUs")
    except LcsError:
        return None
    fusions = conv_fusions(graph, modules, (nn.BatchNorm2d,))
    if not fusions:
        return None
    for f in fusions:  # arguments read now: an earlier fusion's replacement is already in place
        last = f.nodes[-1]
        with graph.inserting_before(last):
            mods = [graph.get_attr(n.target) if n is not None else None for n in (f.conv, f.pre_norm, f.norm)]
            fused = graph.call_function(conv_fused, (*mods, f.input, f.residual, f.relu))
        last.replace_all_uses_with(fused)
        for node in reversed(f.nodes):
            graph.erase_node(node)
    try:
        graph.lint()
        forward = type(torch.fx.GraphModule(block, graph)).forward
    except Exception:  # noqa: BLE001 - a graph fx cannot compile back: keep the block's own forward
        return None
    return forward, [f.conv.target for f in fusions]


def _owner(nodes: tuple[torch.fx.Node, ...]) -> str:
    """The innermost module whose own forward holds every node (a module call's own entry on fx's
    module stack is the called leaf, not its owner); "" for the root."""
    common: list[str] | None = None
    for node in nodes:
        stack = [name for name, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module":
            stack = stack[:-1]
        common = stack if common is None else [a for a, b in zip(common, stack, strict=False) if a == b]
    return common[-1] if common else ""


def kernel_plan(net: nn.Module) -> KernelPlan:
    """The ``KernelPlan`` of a plain network; an empty one for a model that cannot be traced
    (folding and fusing are only savings)."""
    from ..errors import LcsError
    from ..graph import conv_chains, conv_fusions, norms_after_convs, trace

    try:
        graph, modules = trace(net, "folding BatchNorm into sparse convs")
    except LcsError:
        return KernelPlan({})
    folds = {conv.target: bn.target for conv, bn in norms_after_convs(graph, modules, (nn.BatchNorm2d,))}
    chains = {a.target: b.target for a, b in conv_chains(graph, modules)}
    # the modules whose own forward holds a fusion; the root only in a flat model: where blocks hold
    # fusions too, one flat forward's attribute chains cost more than the root's own fusions save
    owners = {_owner(f.nodes) for f in conv_fusions(graph, modules, (nn.BatchNorm2d,))}
    if len(owners) > 1:
        owners.discard("")
    forwards = {}
    for owner in sorted(owners):
        fused = _fused_forward(net.get_submodule(owner))
        if fused is not None:
            forwards[owner] = (fused[0], frozenset(f"{owner}.{c}" if owner else c for c in fused[1]))
    return KernelPlan(folds, forwards, chains)



@torch.no_grad()
def accelerate(net: nn.Module, layers: list[str] | None = None, *, chooser: KernelChooser | None = None,
               max_density: float = MAX_DENSITY, plan: KernelPlan | None = None,
               channels_last: bool | None = None) -> int:
    """Give each eligible layer (the named ``layers``, default every Conv2d / Linear) whose density is
    at most ``max_density`` a CSR copy of its weight and the per-batch kernel choice, in place.
    Inference then runs each on whichever kernel measured faster here (no-grad float32 only;
    training and autograd always take the dense kernel). Every ``nn.MaxPool2d`` (named or not, at
    any density) pools NCHW inputs with the compiled kernel of ``lcs.layers.pool`` where numba is
    installed: PyTorch's is 4–10× slower on them.

    A BatchNorm (eval statistics) that only reads a sparse conv's output is folded into that conv's
    sparse weights and passes its input through (``FoldedBatchNorm2d``): at batch 64 the norms'
    passes over the activations cost as much as the sparse convs. A residual add that only reads a
    sparse conv's output (or its folded norm's) is computed in the conv's pass. Both come from
    ``plan`` (by default traced here; see ``KernelPlan``).

    A quantized conv (frozen input grid of at most 8 bits) whose output the next quantized conv
    reads through ReLUs and identities only (``plan.chains``) may also run on the int8 kernel
    (``lcs.layers.int8``), emitting its output as codes on the next conv's grid; both then quantize
    their input themselves (their ``LayerQuant`` hooks are deferred).

    ``channels_last``: whether the network runs channels-last (its input converted on entry, its
    output handed back contiguous); None decides: always where integer kernels run (they read and
    write channels-last codes); elsewhere, for a network with a conv, per input shape, whichever
    plan the whole network measured faster on its first no-grad eval call (cached with the kernel
    choices; ``layout_report``): oneDNN's channels-last convs skip the reorders its NCHW convs pay at
    every layer (dense cPreResNet20 at batch 64 here: 1.5× faster), but lost at batch 1 on ResNet18
    and on 16×16 inputs. The sparse kernels read NCHW planes (converting around each of them cost
    more than it saved), so with sparse layers the plans are: each layer on its own choice, NCHW, or
    every layer dense, channels-last, where a few sparse layers do not pay for the NCHW reorders
    (``_Layout``). Returns how many layers may run sparse (the plan may still run them dense)."""
    chooser = chooser or default_chooser()
    names = set(layers) if layers is not None else None
    fast_pool, integer = direct_kernel.available(), int8_kernel.available()
    pools, candidates, grids = [], {}, {}  # decided before any class changes: the traces need the plain network
    for fqn, m in net.named_modules():
        if fast_pool and pool_kernel.eligible(m):
            pools.append(m)
            continue
        if (names is not None and fqn not in names) or not _eligible(m) or m.weight.device.type != "cpu":
            continue
        w = m.weight.detach()
        # nonzeros counted in float (|w|'s sign is 1 or 0): 2.7x faster than count_nonzero's bool kernel
        # here, exact below 2^24 elements and within rounding above
        candidates[fqn] = (m, float(w.abs().sign_().sum()) / max(1, w.numel()))
        quant = m._modules.get("lcs_quant")
        grid = int8_kernel.input_grid(quant) if quant is not None and integer else None
        if grid is not None and isinstance(m, nn.Conv2d):
            grids[fqn] = grid
    sparse = {fqn for fqn, (_, density) in candidates.items() if density <= max_density}
    convs = {fqn for fqn, (m, _) in candidates.items() if isinstance(m, nn.Conv2d)}
    if plan is None and (grids or convs):
        plan = kernel_plan(net)  # traced where a conv may fold its norm, go sparse or integer
    plan = plan or KernelPlan({})
    chains = {a: b for a, b in plan.chains.items() if a in grids and b in grids}
    # a dense conv folds its norm too: the dense kernel then runs on the folded weight (the norm's pass is gone)
    dense_folds = {f for f in convs - sparse - set(grids) if _foldable(net, plan.folds.get(f)) is not None}
    for m in pools:
        m.__class__ = pool_kernel.FastMaxPool2d
    for fqn in sorted(sparse | set(grids) | dense_folds):
        m, density = candidates[fqn]
        m.__class__ = SparseConv2d if isinstance(m, nn.Conv2d) else SparseLinear
        d = m.__dict__  # plain attributes, written directly (nn.Module.__setattr__ is slow, and a switch pays it)
        for k in (*_BUILT, *_CHAIN, "lcs_fold", "lcs_dense_only"):  # of an earlier weight, if any: rebuilt on first use
            d.pop(k, None)
        d["lcs_density"], d["lcs_decisions"], d["lcs_chooser"] = density, {}, chooser
        if fqn in dense_folds:
            d["lcs_dense_only"] = True
        if fqn in grids:  # the layer quantizes its own input (8-bit codes may arrive from the conv before)
            quant = m._modules["lcs_quant"]
            quant.__dict__["lcs_deferred"] = True
            d["lcs_quant_in"], d["lcs_grid_in"] = quant, grids[fqn]
            d["lcs_int8_out"] = grids.get(chains.get(fqn, ""))
        bn = _foldable(net, plan.folds.get(fqn))
        if bn is not None:
            d["lcs_fold"] = bn
            bn.__class__ = FoldedBatchNorm2d
    if channels_last is None:  # whichever plan measures faster, per input shape (_Layout)
        cpu_convs = any(isinstance(m, nn.Conv2d) and m.weight.device.type == "cpu" for m in net.modules())
        layout: bool | str = True if chains else ("measure" if cpu_convs else False)
    else:
        layout = channels_last
    _channels_last_input(net, layout, chooser)
    changed = sparse | dense_folds
    for owner, (forward, fused) in plan.forwards.items():
        block = net.get_submodule(owner)
        _unfuse(block)  # an earlier plan's; a fused forward only where one of its convs is sparse or folded
        if fused & changed:
            block.__dict__["forward"] = types.MethodType(forward, block)
            block.__dict__["lcs_fused"] = True
    return len(sparse)


def _signature(net: nn.Module) -> str:
    """A network's architecture as the layout decision sees it: module names, types, parameter
    shapes, and each sparse layer's density bucket (a mixed network's times depend on it)."""
    parts = [f"{n}:{type(m).__name__}:{[tuple(p.shape) for p in m.parameters(recurse=False)]}"
             + (f":d{round(m.lcs_density * _BUCKET)}" if isinstance(m, _SparseMixin) else "")
             for n, m in net.named_modules()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class _Layout:
    """The root pre-hook that feeds a network channels-last inputs: always (``always``: integer
    kernels run in it), or per input shape where the whole network measured faster that way
    (``KernelChooser.layout``, measured on the first no-grad eval call with that shape).

    The sparse kernels read NCHW planes, so for a network with sparse layers the two candidates
    are whole plans: its per-layer kernel choices in NCHW, or every layer on the dense kernel
    (folded norms included) channels-last. Where the second wins, the hook sets the sparse layers'
    decision for that batch size to dense."""

    def __init__(self, net: nn.Module, chooser: KernelChooser, always: bool):
        self.always, self.chooser = always, chooser
        self.signature = "" if always else _signature(net)
        self.sparse = [] if always else [m for m in net.modules()
                                         if isinstance(m, _SparseMixin) and not m.__dict__.get("lcs_dense_only")]
        self.chosen: dict[tuple[int, ...], bool] = {}
        self.busy = False  # inside its own measurement: inputs pass as given

    def __deepcopy__(self, memo: dict) -> _Layout:  # the chooser is a shared cache (it holds a lock)
        new = copy.copy(self)
        new.chosen, new.busy = dict(self.chosen), False
        new.sparse = [copy.deepcopy(m, memo) for m in self.sparse]  # the copy's own layers (memo: already copied)
        return new

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype == torch.float32) or self.busy:
            return args
        if not self.always:
            shape = tuple(x.shape)
            cl = self.chosen.get(shape)
            if cl is None:
                if torch.is_grad_enabled() or module.training:
                    return args
                cl = self.chosen[shape] = self.chooser.layout(self.signature, x, lambda: self._measure(module, x))
                if cl:
                    self._plan(int(x.shape[0]), None)
            if not cl:
                return args
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])

    def _plan(self, batch: int, own: list[str | None] | None) -> None:
        """The sparse layers' decisions for ``batch``: their own (``own``), or dense (None)."""
        for i, m in enumerate(self.sparse):
            kernel = "dense" if own is None else own[i]
            if kernel is None:
                m.lcs_decisions.pop(batch, None)
            else:
                m.lcs_decisions[batch] = kernel

    def _measure(self, module: nn.Module, x: torch.Tensor) -> dict[str, float]:
        """The network's best time on ``x`` in each layout (ms), the layouts taking turns; with
        sparse layers, channels-last runs every layer dense and NCHW runs each on its own choice."""
        runs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}
        best = dict.fromkeys(runs, math.inf)
        batch = int(x.shape[0])
        self.busy = True
        try:
            with torch.no_grad():
                module(runs["nchw"])  # warm-up: the layers choose their kernels, build folded / sparse weights
                own = [m.lcs_decisions.get(batch) for m in self.sparse]
                self._plan(batch, None)
                module(runs["channels_last"])  # warm-up: oneDNN's channels-last primitives
                for _ in range(self.chooser.repeats):
                    for k, inp in runs.items():
                        self._plan(batch, None if k == "channels_last" else own)
                        t0 = time.perf_counter()
                        module(inp)
                        best[k] = min(best[k], time.perf_counter() - t0)
                self._plan(batch, own)
        finally:
            self.busy = False
        return {k: t * 1e3 for k, t in best.items()}


def _contiguous_output(module: nn.Module, args: tuple, out: Any) -> Any:
    return out.contiguous() if isinstance(out, torch.Tensor) else out


def _channels_last_input(net: nn.Module, layout: bool | str, chooser: KernelChooser | None = None) -> None:
    """Feed ``net`` channels-last inputs (and hand back a contiguous output): every layer after
    then runs in that layout (integer kernels read and write channels-last codes; convs, norms
    and residual adds follow their input's layout) instead of converting at every mixed add
    (int8 cPreResNet20 at batch 64: 37 → 33 ms). ``layout``: True always, "measure" where that
    measured faster (``_Layout``), False never. Hooks on the root, in dicts of its own (a
    ``Runtime`` network shares its template's)."""
    d = net.__dict__
    ids = d.pop("lcs_channels_last", None)
    if ids is not None:
        net._forward_pre_hooks.pop(ids[0], None)
        net._forward_hooks.pop(ids[1], None)
    if layout:
        d["_forward_pre_hooks"] = type(net._forward_pre_hooks)(net._forward_pre_hooks)
        d["_forward_hooks"] = type(net._forward_hooks)(net._forward_hooks)
        pre = net.register_forward_pre_hook(_Layout(net, chooser or default_chooser(), layout is True))
        post = net.register_forward_hook(_contiguous_output)
        d["lcs_channels_last"] = (pre.id, post.id)


def layout_report(net: nn.Module) -> dict[tuple[int, ...], str] | None:
    """{input shape: "channels_last" or "nchw"} as decided so far for a network ``accelerate`` lets
    choose its layout; None for one whose layout is fixed."""
    hook = _layout_hook(net)
    if hook is None or hook.always:
        return None
    return {shape: "channels_last" if cl else "nchw" for shape, cl in hook.chosen.items()}


def _layout_hook(net: nn.Module) -> _Layout | None:
    ids = net.__dict__.get("lcs_channels_last")
    hook = net._forward_pre_hooks.get(ids[0]) if ids is not None else None
    return hook if isinstance(hook, _Layout) else None


def layout_at(net: nn.Module, batch: int) -> str:
    """"channels_last" or "nchw": the layout ``net`` runs batches of ``batch`` in, as decided so far
    (a network ``accelerate`` lets choose decides on its first eval call per input shape)."""
    hook = _layout_hook(net)
    if hook is None:
        return "nchw"
    if hook.always:
        return "channels_last"
    cl = next((c for shape, c in hook.chosen.items() if shape[0] == batch), False)
    return "channels_last" if cl else "nchw"


def _unfuse(m: nn.Module) -> None:
    """The block's own forward again, where ``accelerate`` bound a fused one."""
    if m.__dict__.pop("lcs_fused", False):
        m.__dict__.pop("forward", None)


def _foldable(net: nn.Module, bn_fqn: str | None) -> nn.Module | None:
    if bn_fqn is None:
        return None
    try:
        bn = net.get_submodule(bn_fqn)
    except AttributeError:
        return None
    ok = type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
    return bn if ok else None


def dense_kernels(net: nn.Module) -> nn.Module:
    """Undo ``accelerate`` in place: plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.MaxPool2d`` again (for ONNX
    export, training)."""
    _channels_last_input(net, False)
    for m in net.modules():
        _unfuse(m)
        plain = _PLAIN.get(type(m))
        if plain is not None:
            m.__class__ = plain
            quant = m.__dict__.get("lcs_quant_in")
            if quant is not None:
                quant.__dict__.pop("lcs_deferred", None)  # its hook quantizes the input again
            for attr in (*_BUILT, *_CHAIN, "lcs_fold", "lcs_dense_only", "lcs_density", "lcs_decisions",
                         "lcs_chooser"):
                m.__dict__.pop(attr, None)
    return net


def check_kernels(kernels: str) -> str:
    """The ``kernels=`` argument of the deploy entry points: ``"auto"`` or ``"dense"``."""
    if kernels not in ("auto", "dense"):
        from ..errors import LcsError

        raise LcsError(f"kernels must be 'auto' or 'dense', got {kernels!r}")
    return kernels


def sparse_layer_count(net: nn.Module, batch: int) -> int:
    """How many layers of ``net`` run on a sparse kernel (csr, direct) at ``batch`` (as decided so far)."""
    return sum(d.get(batch, "dense") in ("csr", "direct") for d in kernel_report(net).values())


def int8_layer_count(net: nn.Module, batch: int) -> int | None:
    """How many layers of ``net`` run on the int8 kernel at ``batch``; None where no layer can."""
    layers = [m for m in net.modules() if isinstance(m, _SparseMixin) and m.int8_weight() is not None]
    return sum(m.lcs_decisions.get(batch) == "int8" for m in layers) if layers else None


def kernel_report(net: nn.Module) -> dict[str, dict[int, str]]:
    """{layer: {batch: kernel}} ("dense", "csr", "direct" or "int8") for every accelerated layer that
    has served a batch."""
    return {fqn: dict(m.lcs_decisions) for fqn, m in net.named_modules()
            if isinstance(m, _SparseMixin) and not m.__dict__.get("lcs_dense_only")}
