"""TopK of many weight tensors in one compiled call: the selection step of a switch.

A switch on an unstructured line selects the largest magnitudes of every compressed weight anew
(the weights move with α, so no order can be kept from one α to the next). ``torch.topk`` is a
quickselect over (value, index) pairs, one call and a few more ops per layer: on cPreResNet20 that
was 3–5 ms of a 13 ms switch. Here one numba call does every layer: a radix select on the float
bits of |w| (11 + 11 + 9 bits, the last two passes over the candidates only) finds each layer's
k-th largest magnitude, and one branch-free pass keeps what is at least that large.

The kept set is the one ``torch.topk`` keeps whenever it is unique. Where it is not (a tie for the
k-th place: equal magnitudes, which ``torch.topk`` breaks its own way) or where a layer holds an
inf or NaN, that layer goes to ``lcs.ops.topk_sparsify``, so the result always equals the training
path's. Runs on one thread: measured here, a second (numba) thread made it slower (0.63 → 0.80 ms
for cPreResNet20's 21 layers). Deploy side: torch, numpy, (lazily) numba.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..ops import num_kept, topk_sparsify
from . import direct

__all__ = ["topk_sparsify_many", "warm_up"]

_UNIQUE, _NOT_FINITE, _TIE = 0, 1, 2


@functools.cache
def _kernel() -> Any:
    if not direct.available():
        return None
    import numba

    # (one function, no jitted helper: numba caches no function that closes over another)
    @numba.njit(cache=True)
    def select(flat, offsets, ks, out, status):
        bits = flat.view(np.uint32)
        obits = out.view(np.uint32)
        mag = np.uint32(0x7FFFFFFF)  # |w| as bits: for finite floats the order of the magnitudes
        for s in range(ks.shape[0]):
            a, b, k = offsets[s], offsets[s + 1], ks[s]
            status[s] = _UNIQUE
            h4 = np.zeros((4, 2048), np.int64)  # four histograms: no stall on one hot bin
            i = a
            while i + 4 <= b:
                h4[0, (bits[i] & mag) >> 20] += 1
                h4[1, (bits[i + 1] & mag) >> 20] += 1
                h4[2, (bits[i + 2] & mag) >> 20] += 1
                h4[3, (bits[i + 3] & mag) >> 20] += 1
                i += 4
            while i < b:
                h4[0, (bits[i] & mag) >> 20] += 1
                i += 1
            hist = h4[0] + h4[1] + h4[2] + h4[3]
            if hist[0x7F8:].sum() > 0:  # inf or NaN
                status[s] = _NOT_FINITE
                continue
            # each time: the bin holding the need-th largest, and the rank within it
            b1, need = 2047, k
            while hist[b1] < need:
                need -= hist[b1]
                b1 -= 1
            cand = np.empty(hist[b1], np.uint32)
            c = 0
            for i in range(a, b):
                m = bits[i] & mag
                if (m >> 20) == b1:
                    cand[c] = m
                    c += 1
            hist2 = np.zeros(2048, np.int64)
            for j in range(c):
                hist2[(cand[j] >> 9) & 0x7FF] += 1
            b2 = 2047
            while hist2[b2] < need:
                need -= hist2[b2]
                b2 -= 1
            hist3 = np.zeros(512, np.int64)
            for j in range(c):
                if ((cand[j] >> 9) & 0x7FF) == b2:
                    hist3[cand[j] & 0x1FF] += 1
            b3 = 511
            while hist3[b3] < need:
                need -= hist3[b3]
                b3 -= 1
            if hist3[b3] != need:  # equal magnitudes straddle the k-th place
                status[s] = _TIE
                continue
            t = np.uint32((b1 << 20) | (b2 << 9) | b3)
            for i in range(a, b):  # keep |w| >= t: the bits, or +0.0
                v = bits[i]
                obits[i] = v & (np.uint32(0) - np.uint32((v & mag) >= t))

    return select


def topk_sparsify_many(weights: Sequence[torch.Tensor], densities: Sequence[float]) -> list[torch.Tensor]:
    """``[topk_sparsify(w, d) for w, d in zip(weights, densities)]``, without gradients: new tensors,
    equal to those (the same kept entries, zeros elsewhere), computed in one compiled call where
    numba is available. Tensors kept whole (density 1) come back as they are, as from
    ``topk_sparsify``; float32 CPU tensors go through the kernel, anything else one by one."""
    with torch.no_grad():
        out: list[torch.Tensor | None] = [None] * len(weights)
        batch: list[tuple[int, torch.Tensor, int]] = []
        kernel = _kernel()
        for i, (w, d) in enumerate(zip(weights, densities, strict=True)):
            n = w.numel()
            k = num_kept(n, d)
            if k >= n or k <= 0 or kernel is None or w.dtype != torch.float32 or w.device.type != "cpu":
                out[i] = topk_sparsify(w, d)
            else:
                batch.append((i, w.detach(), k))
        if batch:
            sizes = [w.numel() for _, w, _ in batch]
            flat = torch.cat([w.reshape(-1) for _, w, _ in batch])
            kept = torch.empty_like(flat)
            offsets = np.zeros(len(batch) + 1, np.int64)
            np.cumsum(sizes, out=offsets[1:])
            ks = np.array([k for _, _, k in batch], np.int64)
            status = np.zeros(len(batch), np.int64)
            kernel(flat.numpy(), offsets, ks, kept.numpy(), status)
            for (i, w, _), part, st in zip(batch, kept.split(sizes), status, strict=True):
                # a tie or a non-finite value: torch's selection, as training makes it
                out[i] = part.view_as(w).clone() if st == _UNIQUE else topk_sparsify(w, densities[i])
    return out  # type: ignore[return-value]


@functools.cache
def warm_up() -> None:
    """Load the compiled kernel now (about 0.7 s from numba's on-disk cache, a few seconds the first
    time it compiles) rather than in the first switch that needs it."""
    if _kernel() is not None:
        topk_sparsify_many([torch.ones(4)], [0.5])
