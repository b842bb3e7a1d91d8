"""Pick α from a latency budget while the device's load changes.

The controller starts from a measured profile (latency per α on this device) and corrects it
online: the ratio of measured to profiled latency is tracked (the *load factor*), so a competing
process that makes everything 2× slower shifts every prediction 2×. Predictions use a high quantile
of the recent ratios, not their mean: under load, latency jitters, and an α predicted to fit on
average is over budget for about half of its requests. It then serves the largest α whose
predicted latency fits the budget. Hysteresis:
moving up needs the prediction to fit with a safety margin, and any switch is followed by a few
requests of dwell, so the choice does not oscillate at the boundary.

A load does not slow every α alike (under a CPU competitor a small network's overhead-bound
operators suffer differently from a large one's matrix products), so a move up can miss the budget
although the load measured at the lower α said it would fit. Such a failed move doubles the dwell
before the next attempt (up to ``max_dwell`` requests), the way TCP backs off: a load that
persists costs a few over-budget requests in all, not one per dwell; a move up that holds resets it,
and so does the load going away (the load factor falling ``jump``× below the one the failed move
trusted).

The first request after a switch runs slower than the ones after it (measured here on ResNet18 at
batch 1: 1.5–3× for a network fresh from the switch cache, whose weights are no longer in the CPU
caches). The ratio of each switch's first request to the next one at the same α (the same load,
so a load that arrives with the switch does not count as a penalty) is tracked as the *switch
penalty*; a first request measures the load with that penalty taken out, and a move is made
only to an α whose first request, so penalized, is predicted to fit.

With a ``governor`` (``lcs.deploy.threads.ThreadGovernor``) it also runs with as many threads as
the other processes leave cores free: on a contended CPU an OpenMP runtime with a thread per core
stalls at every barrier (a 657 ms 90th percentile at batch 32 here, against 32 ms with one thread
fewer), which no α can make up for. A change of thread count starts the load estimate afresh, and
predictions then come from the profile measured at that thread count where there is one: fewer
threads do not slow every α alike.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LcsError
from .runtime import Runtime
from .threads import ThreadGovernor

__all__ = ["BudgetController", "Decision"]


@dataclass
class Decision:
    alpha: float
    latency_ms: float
    predicted_ms: float
    load_factor: float
    feasible: bool  # False when even the most efficient α is predicted over budget
    threads: int | None = None  # the intra-op threads the request ran with (with a governor)


class BudgetController:
    """Serve requests within ``budget_ms`` by choosing α before each one.

    Args:
        rt: the runtime to drive.
        profile: records with ``alpha`` and ``latency_ms_b{batch}`` (and, optionally, per thread count
            ``latency_ms_b{batch}_t{T}``, used with a governor), or the JSON (path or dict) that
            ``lcs profile`` writes.
        budget_ms: the latency budget per request.
        batch: which batch size's latencies to use from the profile.
        smoothing: EMA weight of each new measurement in the load factor.
        margin: moving up requires predicted ≤ (1 − margin)·budget.
        dwell: requests to stay at an α after switching.
        jump: a measured slowdown this far (×) from the load factor replaces it instead of being smoothed.
        max_dwell: the longest wait before moving up again after moves up kept failing.
        governor: sets the thread count from the CPU time other processes take (None: threads untouched).
        max_penalty: the largest switch penalty learned (first request after a switch ÷ the next one).
        window, quantile: predictions scale the profile by this quantile of the last ``window`` ratios of
            measured to profiled latency (1.0: the worst; 0.5: the median).
        clock: seconds, monotonic (tests pass a simulated one).
    """

    def __init__(self, rt: Runtime, profile: Sequence[dict[str, Any]] | dict[str, Any] | str | os.PathLike,
                 budget_ms: float, *, batch: int = 1, smoothing: float = 0.3, margin: float = 0.15, dwell: int = 3,
                 jump: float = 1.5, window: int = 32, quantile: float = 0.95, max_dwell: int = 64,
                 governor: ThreadGovernor | None = None, max_penalty: float = 4.0, clock=time.perf_counter):
        if isinstance(profile, (str, os.PathLike)):
            with open(profile) as f:
                profile = json.load(f)
        if isinstance(profile, dict):  # the JSON that `lcs profile` writes
            profile = profile["records"]
        if budget_ms <= 0:
            raise LcsError(f"budget_ms must be > 0, got {budget_ms}")
        key = f"latency_ms_b{batch}"
        lo, hi = rt.alpha_range
        inside = [r for r in profile if lo - 1e-9 <= r.get("alpha", math.nan) <= hi + 1e-9]
        points = sorted((float(r["alpha"]), float(r[key])) for r in inside if key in r)
        if not points:
            raise LcsError(f"the profile has no {key} entries inside the runtime's range [{lo:g}, {hi:g}]")
        # per thread count, where the profile measured them (``profile_runtime(threads=...)``)
        per_thread: dict[int, list[tuple[float, float]]] = {}
        for r in inside:
            for k, v in r.items():
                if k.startswith(key + "_t") and k[len(key) + 2:].isdigit():
                    per_thread.setdefault(int(k[len(key) + 2:]), []).append((float(r["alpha"]), float(v)))
        tables = {t: sorted(pts) for t, pts in per_thread.items() if len(pts) == len(points)}
        # the table for each count the governor can pick (the nearest profiled one), resolved once
        self._by_threads = {n: tables.get(n) or tables[min(tables, key=lambda t: abs(math.log(t / n)))]
                            for n in range(1, governor.max_threads + 1)} if governor is not None and tables else {}
        self.rt, self.budget_ms, self._points = rt, float(budget_ms), points
        self.smoothing, self.margin, self.dwell, self.jump, self.clock = smoothing, margin, dwell, jump, clock
        if not (0.0 < quantile <= 1.0) or window < 1:
            raise LcsError(f"need 0 < quantile <= 1 and window >= 1, got quantile={quantile}, window={window}")
        self.quantile = quantile
        self.load_factor = 1.0
        self._ratios: deque[float] = deque(maxlen=window)
        self._since_switch = dwell
        self._up_dwell = dwell  # grows while moves up fail (back-off), back to ``dwell`` when one holds
        self.max_dwell = max(dwell, int(max_dwell))
        self.max_penalty = max(1.0, float(max_penalty))
        self._moved_up_from: float | None = None  # the α left by the last move up, while it is on trial
        self._trusted_factor: float | None = None  # the load factor a failed move up trusted
        self.failed_moves = 0
        self.governor = governor
        self._fresh = False  # the next measurement replaces the load factor (threads just changed)
        self._over = False  # the last request went over budget
        self.feasible = True
        self.switch_penalty = 1.0  # first request after a switch ÷ the next one at that α (smoothed)
        self._pending_first: tuple[float, float] | None = None  # (α, ms) of a switch's first request

    @property
    def points(self) -> list[tuple[float, float]]:
        """(α, profiled latency) at the thread count the requests run with now: the governor's, when
        the profile measured per thread count (the nearest one it measured), else the profile's own."""
        return self._by_threads[self.governor.threads] if self._by_threads else self._points

    def profiled_ms(self, alpha: float) -> float:
        """Profile latency at α (linear interpolation between profiled points)."""
        pts = self.points
        if alpha <= pts[0][0]:
            return pts[0][1]
        for (a0, l0), (a1, l1) in zip(pts, pts[1:], strict=False):
            if alpha <= a1:
                return l0 + (l1 - l0) * (alpha - a0) / (a1 - a0)
        return pts[-1][1]

    @property
    def tail_factor(self) -> float:
        """The ``quantile`` of the recent ratios (the load factor until there are any)."""
        if not self._ratios:
            return self.load_factor
        ordered = sorted(self._ratios)
        return ordered[min(len(ordered) - 1, math.ceil(self.quantile * len(ordered)) - 1)]

    def predicted_ms(self, alpha: float) -> float:
        return self.profiled_ms(alpha) * self.tail_factor

    def predicted_first_ms(self, alpha: float) -> float:
        """The next request's predicted latency at α: a move there pays the switch penalty, except
        a move up after ``max_dwell`` requests in one place (one try per stay that long, so a large
        penalty cannot hold the controller at a low α for good)."""
        if alpha == self.rt.alpha or (alpha > self.rt.alpha and self._since_switch >= self.max_dwell):
            return self.predicted_ms(alpha)
        return self.predicted_ms(alpha) * self.switch_penalty

    def choose(self) -> float:
        """The α for the next request."""
        current = self.rt.alpha
        fits = [a for a, _ in self.points if self.predicted_first_ms(a) <= self.budget_ms]
        self.feasible = bool(fits)
        if not fits:
            return self.points[0][0]  # nothing fits: the most efficient point, and say so
        best = max(fits)
        if best > current:
            if self._since_switch < self._up_dwell:
                return current
            up = [a for a in fits if a > current and self.predicted_first_ms(a) <= (1 - self.margin) * self.budget_ms]
            return max(up) if up else (current if current in fits else best)
        return best  # moving down is never delayed: the budget comes first

    def observe(self, alpha: float, latency_ms: float) -> None:
        """Learn the load factor from one request. A measurement far from the current factor (load
        arriving or going away: over ``jump``× off) replaces it at once, so the next request already
        jumps to the α that fits; small deviations are smoothed, so noise does not make α flicker."""
        ratio = latency_ms / max(self.profiled_ms(alpha), 1e-6)
        if self._fresh or ratio > self.jump * self.load_factor or ratio * self.jump < self.load_factor:
            self._fresh = False
            self.load_factor = ratio
            self._ratios.clear()  # the old load's ratios say nothing about the new one
        else:
            self.load_factor += self.smoothing * (ratio - self.load_factor)
        self._ratios.append(ratio)

    def _learn(self, alpha: float, ms: float, switched: bool) -> None:
        """Learn the load from one request, a switch's first request with the switch penalty taken
        out; the request after it at the same α (the same load) measures that penalty."""
        pending, self._pending_first = self._pending_first, None
        if pending is not None and pending[0] == alpha and not switched:
            ratio = min(max(pending[1] / max(ms, 1e-6), 1.0), self.max_penalty)
            self.switch_penalty += self.smoothing * (ratio - self.switch_penalty)
        if switched:
            self._pending_first = (alpha, ms)
            ms /= self.switch_penalty
        self.observe(alpha, ms)

    def _judge_move_up(self, latency_ms: float, trusted_factor: float) -> None:
        """A move up on trial fails with its first request over budget (back off: double the wait
        before the next one) and holds after ``dwell`` requests within it (the wait is reset)."""
        if self._trusted_factor is not None and self.load_factor * self.jump < self._trusted_factor:
            self._up_dwell, self._trusted_factor = self.dwell, None  # that load has gone away
        if self._moved_up_from is None:
            return
        if latency_ms > self.budget_ms:
            self._up_dwell = min(2 * self._up_dwell, self.max_dwell)
            self._moved_up_from, self._trusted_factor = None, trusted_factor
            self.failed_moves += 1
        elif self._since_switch >= self.dwell:
            self._up_dwell, self._moved_up_from, self._trusted_factor = self.dwell, None, None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Decision]:
        """Set the threads (with a governor), choose α, switch if needed, run the request, learn
        from its latency."""
        if self.governor is not None and self.governor.decide(force=self._over) is not None:
            self._ratios.clear()
            self._fresh = True
        alpha = self.choose()
        current = self.rt.alpha
        predicted, trusted = self.predicted_first_ms(alpha), self.tail_factor  # before the switch: penalized
        switched = alpha != current
        if switched:
            self._moved_up_from = current if alpha > current else None
            self.rt.set_alpha(alpha)
            self._since_switch = 0
        else:
            self._since_switch += 1
        t0 = self.clock()
        y = self.rt(x)
        ms = (self.clock() - t0) * 1e3
        self._learn(alpha, ms, switched)
        self._judge_move_up(ms, trusted)
        self._over = ms > self.budget_ms  # the governor looks again at once
        threads = self.governor.threads if self.governor is not None else None
        return y, Decision(alpha, ms, predicted, self.load_factor, self.feasible, threads)
