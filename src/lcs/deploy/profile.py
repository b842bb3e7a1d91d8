"""Measure what each α costs on the machine this runs on: latency, switch time, size, MACs,
and (given data) accuracy. The controller (``lcs.controller``) starts from these numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..layers.kernels import int8_layer_count, layout_at, sparse_layer_count
from ..stats import count_macs, count_params
from .artifact import artifact_bytes, network_meta
from .runtime import Runtime

__all__ = ["thread_counts", "measure_latency", "profile_runtime", "quick_grid"]


def quick_grid(alpha_range: tuple[float, float]) -> list[float]:
    """A few α spread over the trained range (both ends included): enough for the controller."""
    lo, hi = alpha_range
    return sorted({lo, *[a for a in (0.1, 0.25, 0.5, 0.75) if lo < a < hi], hi})


@torch.no_grad()
def measure_latency(fn, x: torch.Tensor, *, warmup: int = 3, repeats: int = 20,
                    max_seconds: float = 5.0) -> list[float]:
    """Wall-clock milliseconds of ``fn(x)`` after ``warmup`` untimed calls (at most ``max_seconds``)."""
    for _ in range(warmup):
        fn(x)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def thread_counts(most: int | None = None) -> list[int]:
    """The intra-op thread counts a ``ThreadGovernor`` may pick, as profiled: 1, 2, 4, … and ``most``
    (default torch's current count)."""
    most = most or torch.get_num_threads()
    counts, t = {most}, 1
    while t < most:
        counts.add(t)
        t *= 2
    return sorted(counts)


def _repeats(batch: int, repeats: int) -> int:
    """Timed calls per latency measurement: big batches get fewer, longer ones."""
    return repeats if batch <= 8 else max(5, repeats // 4)


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def profile_runtime(rt: Runtime, grid: Sequence[Any], batches: Sequence[int], input_shape: tuple[int, int, int],
                    *, data=None, repeats: int = 20, threads: Sequence[int] = (), progress=None
                    ) -> list[dict[str, Any]]:
    """One record per α: ``switch_ms`` (median of 3 first visits of α: the bake), ``first_batch_ms``
    (the first forward after it, batch ``batches[0]``), ``cached_switch_ms`` (a return visit, from
    the runtime's cache; 0-MiB caches bake again), ``latency_ms_b{B}`` / ``p90_ms_b{B}`` per
    batch size, ``params``, ``nonzero_params``, ``macs``, ``bytes`` and, with data, ``accuracy``.

    ``threads``: also measure each batch's latency at these intra-op thread counts
    (``latency_ms_b{B}_t{T}``), for a controller whose governor changes them: the α of a subspace
    do not slow down alike with fewer threads (dense and CSR kernels, thin and wide layers scale
    differently), so one table scaled by one load factor mispredicts the other α after a change."""
    records = []
    lo, hi = rt.alpha_range
    rt.tune(list(grid), list(batches), input_shape)  # kernel choices measured (or read from cache) first
    for alpha in grid:
        rec: dict[str, Any] = {"alpha": alpha}  # a dict of levels on multi-level points: dropped below
        other = hi if alpha != hi else lo
        switches, firsts, cached = [], [], []
        x0 = torch.randn(batches[0], *input_shape)
        for _ in range(3):
            rt.set_alpha(other)
            rt(x0)
            rt.clear_cache()  # a first visit: the network at α is baked
            t0 = time.perf_counter()
            rec.update(rt.move(alpha))
            switches.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            rt(x0)
            firsts.append((time.perf_counter() - t0) * 1e3)
            rt.set_alpha(other)
            t0 = time.perf_counter()
            rt.move(alpha)  # a return visit: from the runtime's cache
            cached.append((time.perf_counter() - t0) * 1e3)
        if isinstance(alpha, dict):  # a point of levels has no α of its own
            del rec["alpha"]
        rec["switch_ms"] = statistics.median(switches)
        rec["first_batch_ms"] = statistics.median(firsts)
        rec["cached_switch_ms"] = statistics.median(cached)
        for b in batches:
            times = measure_latency(rt, torch.randn(b, *input_shape), repeats=_repeats(b, repeats))
            rec[f"latency_ms_b{b}"] = statistics.median(times)
            rec[f"p90_ms_b{b}"] = p90(times)
            rec[f"sparse_layers_b{b}"] = sparse_layer_count(rt.network, b)
            rec[f"layout_b{b}"] = layout_at(rt.network, b)
            n8 = int8_layer_count(rt.network, b)
            if n8 is not None:
                rec[f"int8_layers_b{b}"] = n8
        current = torch.get_num_threads()
        try:
            for t in threads:
                torch.set_num_threads(t)
                for b in batches:
                    key = f"latency_ms_b{b}"
                    rec[f"{key}_t{t}"] = (rec[key] if t == current else
                                          statistics.median(measure_latency(rt, torch.randn(b, *input_shape),
                                                                            repeats=_repeats(b, repeats))))
        finally:
            torch.set_num_threads(current)
        net = rt.network
        rec["params"], rec["nonzero_params"] = count_params(net)
        rec["macs"], rec["dense_macs"] = count_macs(net, input_shape)
        rec["bytes"] = artifact_bytes(net, network_meta(rt.header.get("arch"), rt.regime, rt.header.get("method"),
                                                        rt.alpha, rt.levels))
        rec["dense_bytes"] = rt.dense_bytes
        if data is not None:
            from ..eval.evaluate import evaluate_accuracy

            rec["accuracy"], rec["loss"] = evaluate_accuracy(net, data, torch.device("cpu"))
        records.append(rec)
        if progress is not None:
            progress(rec)
    return records
