"""The ``lcs adapt`` scenario: serve requests under a latency budget while a competing CPU-bound
process starts part-way through, once with the budget controller and once at a fixed α, and
compare how often each goes over budget."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import torch

from .controller import BudgetController
from .runtime import Runtime
from .threads import ThreadGovernor

__all__ = ["run_scenario", "start_competitor", "timeline"]

# Saturates every core with matrix products for a bounded time, then exits by itself.
_COMPETITOR = """
import sys, time, torch
end = time.time() + float(sys.argv[1])
a = torch.randn(512, 512)
while time.time() < end:
    a = torch.tanh(a @ a)
"""


def start_competitor(seconds: float) -> subprocess.Popen:
    """A CPU-bound competitor process that ends by itself after ``seconds``."""
    return subprocess.Popen([sys.executable, "-c", _COMPETITOR, str(seconds)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _serve(step, seconds: float, load_at: float, x: torch.Tensor) -> list[dict[str, Any]]:
    trace: list[dict[str, Any]] = []
    competitor = None
    t_start = time.perf_counter()
    try:
        while (now := time.perf_counter() - t_start) < seconds:
            if competitor is None and now >= load_at:
                competitor = start_competitor(seconds - now + 1.0)
            rec = step(x)
            rec["t"] = now
            rec["loaded"] = competitor is not None
            trace.append(rec)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return trace


def run_scenario(rt: Runtime, profile: list[dict[str, Any]], budget_ms: float, seconds: float, load_at: float,
                 batch: int = 1, input_shape: tuple[int, int, int] = (3, 32, 32),
                 compare_threads: bool = False, controller: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs of ``seconds`` each with a competitor from ``load_at``: the controller (choosing α and,
    from the CPU time the competitor takes, the thread count), then α fixed at the accurate end;
    with ``compare_threads`` also the controller with the threads left alone, in between. Returns
    the traces and their over-budget fractions (overall and under load). ``controller``: keyword
    arguments for ``BudgetController`` (e.g. ``quantile``, ``window``)."""
    options = dict(controller or {})
    x = torch.randn(batch, *input_shape)

    def controlled(ctl: BudgetController):
        def step(inp: torch.Tensor) -> dict[str, Any]:
            _, d = ctl(inp)
            return {"alpha": d.alpha, "latency_ms": d.latency_ms, "feasible": d.feasible, "threads": d.threads}
        return step

    hi = rt.alpha_range[1]

    @torch.no_grad()
    def fixed(inp: torch.Tensor) -> dict[str, Any]:
        t0 = time.perf_counter()
        rt(inp)
        return {"alpha": hi, "latency_ms": (time.perf_counter() - t0) * 1e3, "feasible": True}

    governor = ThreadGovernor()
    try:
        traces = {"controller": _serve(controlled(BudgetController(rt, profile, budget_ms, batch=batch,
                                                                  governor=governor, **options)), seconds, load_at, x)}
    finally:
        governor.restore()
    if compare_threads:
        time.sleep(1.0)  # let the competitor's load fade
        rt.set_alpha(hi)
        traces["controller_fixed_threads"] = _serve(
            controlled(BudgetController(rt, profile, budget_ms, batch=batch, **options)), seconds, load_at, x)
    time.sleep(1.0)
    rt.set_alpha(hi)
    traces["fixed"] = _serve(fixed, seconds, load_at, x)
    summary = {}
    for name, trace in traces.items():
        over = [r["latency_ms"] > budget_ms for r in trace]
        loaded = [r["latency_ms"] > budget_ms for r in trace if r["loaded"]]
        summary[name] = {"requests": len(trace), "over_budget": sum(over) / max(len(over), 1),
                         "over_budget_under_load": sum(loaded) / max(len(loaded), 1),
                         "mean_alpha": sum(r["alpha"] for r in trace) / max(len(trace), 1),
                         "infeasible_requests": sum(not r["feasible"] for r in trace)}
        if any(r.get("threads") is not None for r in trace):
            summary[name]["mean_threads_under_load"] = (
                sum(r["threads"] for r in trace if r["loaded"]) / max(1, sum(r["loaded"] for r in trace)))
    return {"budget_ms": budget_ms, "seconds": seconds, "load_at": load_at, "batch": batch,
            "summary": summary, "traces": traces}


def timeline(result: dict[str, Any], step_s: float = 1.0) -> str:
    """Per time slice: mean α and worst latency of each run, and whether the competitor ran."""
    names = list(result["traces"])
    head = f"{'t (s)':>6}  load  " + "  ".join(f"{n + ' α':>13} {n + ' max ms':>18}" for n in names)
    lines = [head]
    t = 0.0
    while t < result["seconds"]:
        cells = []
        loaded = False
        for n in names:
            rows = [r for r in result["traces"][n] if t <= r["t"] < t + step_s]
            loaded = loaded or any(r["loaded"] for r in rows)
            if rows:
                cells.append(f"{sum(r['alpha'] for r in rows) / len(rows):>13.3f} "
                             f"{max(r['latency_ms'] for r in rows):>18.2f}")
            else:
                cells.append(f"{'-':>13} {'-':>18}")
        lines.append(f"{t:>6.1f}  {'yes ' if loaded else 'no  '}  " + "  ".join(cells))
        t += step_s
    return "\n".join(lines)
