"""Direct sparse convolution: each output plane accumulates, for every nonzero weight, a shifted copy
of one input plane (Park et al. 2017, "Faster CNNs with direct sparse convolutions"), compiled with
numba.

Why not only CSR × im2col (``lcs.layers.kernels``)? The columns of a thin layer at batch 64 are
large and a CSR product over them is memory-bound: on cPreResNet20 at density 0.05 the 3×3 convs
lost 3–5× to oneDNN that way. Here nothing is unfolded. The input is padded once and, for stride
s > 1, split into s² phases (one copy), so every tap (c, i, j) of the kernel reads one contiguous
run of a (phase) plane laid out with the padded row width. Each output plane is accumulated on
that row width (a few columns past each row's end are computed and dropped when the plane is
copied out), so the inner loop is one long contiguous multiply-add per nonzero, eight nonzeros
at a time so each accumulator element is loaded and stored once per eight. Measured here at batch
64, density 0.05, with the BatchNorm that follows: 16→16 3×3 on 32×32 4.1×, 32→32 on 16×16 3.4×,
64→64 on 8×8 2.0× faster than ``F.conv2d`` (strided layers 0.5–1.2×: the phase copy costs).

The kernel is optional: without numba, ``available()`` is False and the layers use the other
kernels. Deploy side: torch, numpy and (lazily) numba.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["available", "eligible", "DirectWeight", "direct_conv2d"]

_LOCK = threading.Lock()
_THREADS = threading.local()  # the thread count last given to numba, per Python thread
_THREAD_SAFE: bool | None = None  # numba's OpenMP / TBB layers take concurrent calls; its workqueue does not


@functools.cache
def _kernel() -> Any:
    """The compiled kernel (numba), or None when numba is missing."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, fastmath={"contract"}, cache=True)  # FMAs; no reassociation
    def accumulate(xf, sample, starts, ptr, vals, pa, pb, bias, res, relu, out, ho, wo, row):
        # acc[t] = bias[o] (+ res[b, o] at t's output position, when res is given: a residual add in
        # the same pass) + Σ_n vals[n] · x_n(t), with x_n(t) = xf[b·sample + starts[n] + t], or, when a
        # prologue (pa, pb) is given, max(pa[n]·x + pb[n], 0): the norm and ReLU before the conv, computed
        # as each tap reads its input; t over the output rows laid out with the phase plane's row width;
        # the valid columns then go to out[b, o], clamped at 0 when relu
        batch, outs, _ = out.shape
        length = (ho - 1) * row + wo
        with_res = res.shape[0] > 0
        with_pre = pa.shape[0] > 0
        for bo in numba.prange(batch * outs):
            b = bo // outs
            o = bo - b * outs
            acc = np.empty(length, np.float32)
            if with_res:  # explicit loops: a slice += here allocated and cost more than the add it saves
                r = res[b, o]
                for y in range(ho):
                    for q in range(wo):
                        acc[y * row + q] = r[y * wo + q] + bias[o]
            else:
                acc[:] = bias[o]
            base = b * sample
            n, end = ptr[o], ptr[o + 1]
            while n + 8 <= end:  # eight nonzeros per pass: each acc element loaded and stored once per eight
                s0, s1, s2, s3 = base + starts[n], base + starts[n + 1], base + starts[n + 2], base + starts[n + 3]
                s4, s5, s6, s7 = base + starts[n + 4], base + starts[n + 5], base + starts[n + 6], base + starts[n + 7]
                x0, x1, x2, x3 = xf[s0:s0 + length], xf[s1:s1 + length], xf[s2:s2 + length], xf[s3:s3 + length]
                x4, x5, x6, x7 = xf[s4:s4 + length], xf[s5:s5 + length], xf[s6:s6 + length], xf[s7:s7 + length]
                w0, w1, w2, w3, w4, w5, w6, w7 = vals[n], vals[n + 1], vals[n + 2], vals[n + 3], vals[n + 4], \
                    vals[n + 5], vals[n + 6], vals[n + 7]
                if with_pre:
                    a0, a1, a2, a3, a4, a5, a6, a7 = pa[n], pa[n + 1], pa[n + 2], pa[n + 3], pa[n + 4], \
                        pa[n + 5], pa[n + 6], pa[n + 7]
                    c0, c1, c2, c3, c4, c5, c6, c7 = pb[n], pb[n + 1], pb[n + 2], pb[n + 3], pb[n + 4], \
                        pb[n + 5], pb[n + 6], pb[n + 7]
                    for t in range(length):
                        acc[t] += (w0 * max(a0 * x0[t] + c0, 0.0) + w1 * max(a1 * x1[t] + c1, 0.0)
                                   + w2 * max(a2 * x2[t] + c2, 0.0) + w3 * max(a3 * x3[t] + c3, 0.0)) + \
                            (w4 * max(a4 * x4[t] + c4, 0.0) + w5 * max(a5 * x5[t] + c5, 0.0)
                             + w6 * max(a6 * x6[t] + c6, 0.0) + w7 * max(a7 * x7[t] + c7, 0.0))
                else:
                    for t in range(length):
                        acc[t] += (w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]) + \
                            (w4 * x4[t] + w5 * x5[t] + w6 * x6[t] + w7 * x7[t])
                n += 8
            while n < end:
                s0 = base + starts[n]
                x0 = xf[s0:s0 + length]
                w0 = vals[n]
                if with_pre:
                    a0, c0 = pa[n], pb[n]
                    for t in range(length):
                        acc[t] += w0 * max(a0 * x0[t] + c0, 0.0)
                else:
                    for t in range(length):
                        acc[t] += w0 * x0[t]
                n += 1
            dst = out[b, o]
            if relu:
                for y in range(ho):
                    for q in range(wo):
                        dst[y * wo + q] = max(acc[y * row + q], 0.0)
            else:
                for y in range(ho):
                    dst[y * wo:(y + 1) * wo] = acc[y * row:y * row + wo]

    return numba, accumulate


@functools.cache
def _split_kernel() -> Any:
    """The compiled phase split (numba; only asked for once ``_kernel()`` found numba)."""
    import numba

    @numba.njit(parallel=True, cache=True)
    def split(x, out, sh, sw, ph, pw):
        # out[b, c, a, e, y, q] = padded x at row a + sh·y, column e + sw·q (zero outside x)
        n, c, h, w = x.shape
        _, _, uh, uw, hq, wq = out.shape
        for bc in numba.prange(n * c):
            b = bc // c
            ch = bc - b * c
            for a in range(uh):
                for e in range(uw):
                    for y in range(hq):
                        r = a + sh * y - ph
                        dst = out[b, ch, a, e, y]
                        if r < 0 or r >= h:
                            dst[:] = 0.0
                            continue
                        src = x[b, ch, r]
                        for q in range(wq):
                            col = e + sw * q - pw
                            dst[q] = src[col] if 0 <= col < w else 0.0

    return split


def available() -> bool:
    """Whether the direct kernel can run here (numba importable)."""
    return _kernel() is not None


def eligible(conv: nn.Module) -> bool:
    """Plain 2-D convolutions the kernel computes: one group, no dilation, zero padding given as numbers."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


class DirectWeight:
    """A conv weight's nonzeros grouped by output channel, each with its input channel, stride phase
    and offset within the phase plane: what ``direct_conv2d`` reads. Built once per weight."""

    def __init__(self, weight: torch.Tensor, stride: tuple[int, int]):
        w = weight.detach().float().cpu().numpy()
        o, c, i, j = np.nonzero(w)  # row-major order: grouped by output channel
        (sh, sw), kw = stride, w.shape[3]
        self.ptr = np.concatenate([[0], np.cumsum(np.bincount(o, minlength=w.shape[0]))]).astype(np.int64)
        self.chan = c.astype(np.int64)
        self.phase = ((i % sh) * min(kw, sw) + (j % sw)).astype(np.int64)  # among the phases a tap can use
        self.di, self.dj = (i // sh).astype(np.int64), (j // sw).astype(np.int64)
        self.vals = np.ascontiguousarray(w[o, c, i, j], dtype=np.float32)
        self.outs = w.shape[0]
        self.no_bias = np.zeros(self.outs, np.float32)  # for bias-free convs: not allocated per call
        self._starts: dict[tuple[int, int, int], np.ndarray] = {}

    def starts(self, phases: int, plane: int, row: int) -> np.ndarray:
        """Where each nonzero's input run starts within one sample's phase planes (``phases`` planes
        of ``plane`` elements, rows of ``row``), per input size, computed once rather than per sample
        and pass inside the kernel."""
        key = (phases, plane, row)
        if key not in self._starts:
            self._starts[key] = (self.chan * phases + self.phase) * plane + self.di * row + self.dj
        return self._starts[key]


def _phase_planes(x: torch.Tensor, conv: nn.Conv2d, compiled: bool = True) -> tuple[torch.Tensor, int, int, int, int]:
    """The zero-padded input split into the stride phases the kernel's taps read (all s² of them for
    a kernel at least as wide as the stride, one for a strided 1×1): (N, C, phases, Hq, Wq),
    contiguous, plus the output size (Ho, Wo) and the phase plane size (Hq, Wq). Written in one
    pass over the input: an unpadded stride-1 input is used as it is, and strided phases are copied
    straight from the input into a zeroed buffer (padding and splitting as two copies cost a
    strided 1×1 conv twice its dense time at batch 64). Several phases are split by one compiled
    pass (``compiled``; the slice copies otherwise)."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    n, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    hq, wq = -(-hp // sh), -(-wp // sw)
    if (sh, sw) == (1, 1):
        padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
        return padded.view(n, c, 1, hq, wq), ho, wo, hq, wq
    uh, uw = min(kh, sh), min(kw, sw)
    if compiled and uh * uw > 1 and x.dtype == torch.float32 and x.device.type == "cpu":
        # several phases: one compiled pass (at batch 1 the slice copies below cost a 32-channel
        # 3×3 stride-2 conv 66 µs against 17, most of the layer's time; at batch 64 1.3 ms against 0.8)
        planes = torch.empty(n, c, uh, uw, hq, wq)
        call(_split_kernel(), x.contiguous().numpy(), planes.numpy(), sh, sw, ph, pw)
        return planes.view(n, c, uh * uw, hq, wq), ho, wo, hq, wq
    planes = x.new_zeros(n, c, uh, uw, hq, wq)
    for a in range(uh):  # phase row a holds padded rows a, a + s, …, i.e. input rows a − p + s·y
        y0 = max(0, -(-(ph - a) // sh))
        r0 = y0 * sh + a - ph
        ny = min(hq - y0, -(-(h - r0) // sh)) if r0 < h else 0
        for b in range(uw):
            x0 = max(0, -(-(pw - b) // sw))
            c0 = x0 * sw + b - pw
            nx = min(wq - x0, -(-(w - c0) // sw)) if c0 < w else 0
            if ny > 0 and nx > 0:
                planes[:, :, a, b, y0:y0 + ny, x0:x0 + nx] = x[:, :, r0::sh, c0::sw][:, :, :ny, :nx]
    return planes.view(n, c, uh * uw, hq, wq), ho, wo, hq, wq


_NO_RESIDUAL = np.zeros((0, 0, 0), np.float32)


_NO_PROLOGUE = np.zeros(0, np.float32)


def direct_conv2d(x: torch.Tensor, weight: DirectWeight, conv: nn.Conv2d, bias: torch.Tensor | None,
                  residual: torch.Tensor | None = None, *, prologue: tuple[np.ndarray, np.ndarray] | None = None,
                  relu: bool = False) -> torch.Tensor:
    """``relu?(conv(relu(s·x + t)) + residual)`` (float32, CPU) by direct sparse convolution:
    ``prologue`` = (s, t) per nonzero of ``weight`` (the input channel's scale and shift: an eval
    BatchNorm, then a ReLU; unpadded convs only, where every tap reads a real input element),
    ``residual`` a tensor of the output's shape, added in the same pass, and ``relu`` applied as
    the output is written. Equal to ``F.conv2d`` with those steps around it up to float summation
    order. None of them costs a pass of its own: at batch 64 a residual network's adds took a
    third of its sparse forward, its pre-activation norms and ReLUs a fifth."""
    if prologue is not None and any(conv.padding):
        raise ValueError("a prologue needs an unpadded conv: the padded zeros would not stay zero")
    accumulate = _kernel()[1]
    planes, ho, wo, hq, wq = _phase_planes(x.float(), conv)
    n, c = planes.shape[:2]
    out = torch.empty(n, weight.outs, ho * wo)
    b = bias.detach().float().contiguous().numpy() if bias is not None else weight.no_bias
    res = _NO_RESIDUAL
    if residual is not None:
        if residual.shape != (n, weight.outs, ho, wo) or residual.dtype != torch.float32:
            y = direct_conv2d(x, weight, conv, bias, prologue=prologue) + residual  # broadcasting / dtype: torch's add
            return y.relu_() if relu else y
        res = residual.detach().contiguous().view(n, weight.outs, ho * wo).numpy()
    phases = planes.shape[2]
    pa, pb = prologue if prologue is not None else (_NO_PROLOGUE, _NO_PROLOGUE)
    args = (planes.numpy().reshape(-1), c * phases * hq * wq, weight.starts(phases, hq * wq, wq), weight.ptr,
            weight.vals, pa, pb, b, res, bool(relu), out.numpy(), ho, wo, wq)
    call(accumulate, *args)
    return out.view(n, weight.outs, ho, wo)


def call(kernel: Any, *args: Any) -> None:
    """Run a compiled parallel kernel on torch's thread count, serialized until numba's threading
    layer is known to take concurrent calls (serving threads may call at once; the workqueue layer
    does not allow it).

    numba's OpenMP layer binds to torch's own libgomp, and starting it on the first parallel call
    sets that runtime's thread count to numba's default (every core): torch's count, which a
    ``ThreadGovernor`` may have lowered, is put back afterwards."""
    global _THREAD_SAFE
    threads = torch.get_num_threads()
    if _THREADS.__dict__.get("numba") != threads:  # numba's count is per Python thread
        numba = _kernel()[0]
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        _THREADS.numba = threads
    if _THREAD_SAFE:
        kernel(*args)
        return
    with _LOCK:
        kernel(*args)
        if torch.get_num_threads() != threads:  # the layer's start reset torch's thread count
            torch.set_num_threads(threads)
        if _THREAD_SAFE is None:
            _THREAD_SAFE = _kernel()[0].threading_layer() in ("omp", "tbb")
