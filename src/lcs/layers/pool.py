"""Max pooling of NCHW float32 inputs, compiled with numba: what a sparse ResNet's stem waits on.

PyTorch's CPU max pooling is vectorized for channels-last inputs only; on the NCHW tensors every
other layer here produces, ResNet18's 3×3 / 2 pool of the 64×112×112 stem output took 3.8 of the
16.8 ms of the whole network at density 0.05, batch 1 (docs/results.md, session 8), and converting
to channels-last and back costs more than it saves. Here each output row first takes the
elementwise maximum of its window's input rows (contiguous, vectorized), then of each window's
columns in that row. A plane holding a NaN is pooled again window by window, so NaN propagates as
in ``F.max_pool2d``. Deploy side: torch, numpy, (lazily) numba.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import direct

__all__ = ["FastMaxPool2d", "eligible", "max_pool2d", "output_size"]


@functools.cache
def _kernel() -> Any:
    if not direct.available():
        return None
    import numba

    @numba.njit(cache=True)
    def exact(x, out, p, kh, kw, sh, sw, ph, pw):
        # one plane, window by window, NaN winning as in torch: the path for planes holding a NaN
        h, w = x.shape[1:]
        for y in range(out.shape[1]):
            for c in range(out.shape[2]):
                m = -np.inf
                for r in range(max(y * sh - ph, 0), min(y * sh - ph + kh, h)):
                    for t in range(max(c * sw - pw, 0), min(c * sw - pw + kw, w)):
                        v = x[p, r, t]
                        if v > m or v != v:
                            m = v
                            if v != v:
                                break
                out[p, y, c] = m

    @numba.njit(parallel=True, cache=True)
    def pool(x, out, kh, kw, sh, sw, ph, pw):
        planes, h, w = x.shape
        _, ho, wo = out.shape
        width = max(w + 2 * pw, (wo - 1) * sw + kw)
        for p in numba.prange(planes):
            rows = np.full(width, -np.inf, np.float32)  # one output row's window rows, -inf padded
            bad = False
            for y in range(ho):
                lo, hi = max(y * sh - ph, 0), min(y * sh - ph + kh, h)
                for t in range(w):
                    v = x[p, lo, t]
                    bad |= v != v
                    rows[pw + t] = v
                for r in range(lo + 1, hi):
                    for t in range(w):
                        v, u = x[p, r, t], rows[pw + t]
                        bad |= v != v
                        rows[pw + t] = v if v > u else u
                if kw == 3:  # ResNets' pool: the window unrolled
                    for c in range(wo):
                        s = c * sw
                        a, b, d = rows[s], rows[s + 1], rows[s + 2]
                        m = a if a > b else b
                        out[p, y, c] = m if m > d else d
                else:
                    for c in range(wo):
                        m = rows[c * sw]
                        for t in range(1, kw):
                            v = rows[c * sw + t]
                            m = v if v > m else m
                        out[p, y, c] = m
            if bad:
                exact(x, out, p, kh, kw, sh, sw, ph, pw)

    return pool


def output_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Pooled length of one dimension, as ``F.max_pool2d`` computes it (dilation 1)."""
    n = size + 2 * p - k
    out = (n + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def eligible(pool: nn.Module) -> bool:
    """Max pools the kernel computes: no dilation, no indices returned, padding at most half the
    window (what PyTorch accepts; others keep PyTorch's pool and its error)."""
    if type(pool) is not nn.MaxPool2d or _pair(pool.dilation) != (1, 1) or pool.return_indices:
        return False
    (kh, kw), (ph, pw) = _pair(pool.kernel_size), _pair(pool.padding)
    return 2 * ph <= kh and 2 * pw <= kw


def max_pool2d(x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d(x, ...)`` of a contiguous (N, C, H, W) or (C, H, W) float32 CPU tensor."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    h, w = x.shape[-2:]
    ho, wo = output_size(h, kh, sh, ph, ceil_mode), output_size(w, kw, sw, pw, ceil_mode)
    lead = x.shape[:-2]
    out = torch.empty(*lead, ho, wo)
    if out.numel():
        direct.call(_kernel(), x.reshape(-1, h, w).numpy(), out.view(-1, ho, wo).numpy(), kh, kw, sh, sw, ph, pw)
    return out


class FastMaxPool2d(nn.MaxPool2d):
    """An ``nn.MaxPool2d`` that pools no-grad, NCHW-contiguous float32 CPU inputs with the compiled
    kernel, and everything else (autograd, channels-last, other dtypes) with PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.dim() not in (3, 4) or not x.is_contiguous()):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                ceil_mode=self.ceil_mode, return_indices=self.return_indices)
        stride = self.stride if self.stride is not None else self.kernel_size
        return max_pool2d(x, _pair(self.kernel_size), _pair(stride), _pair(self.padding), self.ceil_mode)
