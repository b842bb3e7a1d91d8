"""Time of ``Runtime.set_alpha`` on cPreResNet20, per regime and geometry, and the first batch after
a switch vs the steady state, measured in one run. Structured switches build a physically slim
network; each distinct set of channel counts is sized once by a forward pass and then cached, so
the figures here (alphas visited repeatedly) are the steady switch cost. "switch ms" bakes on every
move (``cache_mb=0``: a first visit); "return ms" is a move back to a point the runtime's default
cache holds (a reference swap), with its first batch over the steady state. Targets (issues 7, 15):
switch ≤ 10 ms on a 2-core CPU; first batch after a switch ≤ 1.2× steady state.

    python benchmarks/switch.py [--repeats 15] [--batch 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lcs
from lcs.alloc import keep_freed_memory
from lcs.deploy.runtime import Runtime, save_subspace
from lcs.eval.evaluate import default_grid
from lcs.layers.quant import set_activation_quant
from lcs.regimes import REGISTRY


def _points(config) -> list:
    """Four points of the regime's default grid, spread over it (α, or level dicts)."""
    grid = default_grid(config)
    return [grid[round(i * (len(grid) - 1) / 3)] for i in range(4)]


def bench(regime: str, geometry: str, repeats: int, batch: int, tmp: str) -> dict:
    torch.manual_seed(0)
    record = REGISTRY[regime]
    kwargs = {"num_classes": 10, "norm": record.default_norm("lcs_l")}
    sub = lcs.convert(lcs.models.create("cpreresnet20", **kwargs), record.config(geometry=geometry))
    if set_activation_quant(sub.model, True):  # quantized: frozen input grids, as a trained network has
        sub.model.train()  # (so the integer kernels take part in the switch and its first batch)
        with torch.no_grad():
            for a in _points(sub.config):
                sub.move(a)
                sub.model(torch.randn(16, 3, 32, 32))
        sub.model.eval()
    path = Path(tmp) / f"{regime}-{geometry}.safetensors"
    save_subspace(sub, path, {"name": "cpreresnet20", "kwargs": kwargs}, {"input_shape": [3, 32, 32]})
    rt = Runtime.load(path, cache_mb=0)  # every switch bakes: the cost of a first visit
    x = torch.randn(batch, 3, 32, 32)
    alphas = _points(sub.config)
    switch, first, steady = [], [], []
    for i in range(repeats):
        a = alphas[i % len(alphas)]
        rt(x)  # the previous network is warm
        t0 = time.perf_counter()
        rt.move(a)
        switch.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        rt(x)
        first.append((time.perf_counter() - t0) * 1e3)
        for _ in range(3):
            t0 = time.perf_counter()
            rt(x)
            steady.append((time.perf_counter() - t0) * 1e3)
    cached, cached_first = [], []
    rt = Runtime.load(path)  # the default switch cache: return visits reuse the network
    for a in alphas:
        rt.move(a)
        rt(x)
    for i in range(repeats):
        rt(x)
        t0 = time.perf_counter()
        rt.move(alphas[i % len(alphas)])
        cached.append((time.perf_counter() - t0) * 1e3)
        assert rt.last_switch_cached
        t0 = time.perf_counter()
        rt(x)
        cached_first.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median
    return {"regime": regime, "geometry": geometry, "switch_ms_median": med(switch), "switch_ms_max": max(switch),
            "first_batch_ms": med(first), "steady_ms": med(steady), "first_over_steady": med(first) / med(steady),
            "cached_switch_ms_median": med(cached), "cached_first_over_steady": med(cached_first) / med(steady)}


def main() -> None:
    keep_freed_memory()  # what the lcs CLI runs with (lcs.alloc)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/switch.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(r, g, args.repeats, args.batch, tmp) for r in REGISTRY for g in ("line", "point")]
    print(f"{'regime':<18}{'geometry':<10}{'switch ms':>10}{'max':>8}{'1st batch':>11}{'steady':>9}{'ratio':>7}"
          f"{'return ms':>11}{'ratio':>7}")
    for r in rows:
        print(f"{r['regime']:<18}{r['geometry']:<10}{r['switch_ms_median']:>10.2f}{r['switch_ms_max']:>8.2f}"
              f"{r['first_batch_ms']:>11.2f}{r['steady_ms']:>9.2f}{r['first_over_steady']:>7.2f}"
              f"{r['cached_switch_ms_median']:>11.3f}{r['cached_first_over_steady']:>7.2f}")
    result = {"benchmark": "switch", "model": "cpreresnet20", "batch": args.batch, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
