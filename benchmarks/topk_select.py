"""The selection step of a switch: TopK of every compressed weight, per layer with ``torch.topk``
(``lcs.ops.topk_sparsify``, what training runs) against all layers in one compiled call
(``lcs.layers.topk_batch.topk_sparsify_many``, what a bake runs), timed interleaved in one process.
Checks the two agree exactly; prints the ratio; writes JSON.

    python benchmarks/topk_select.py [--threads 2] [--repeats 30] [--json benchmarks/results/topk_select.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lcs
from lcs.alloc import keep_freed_memory
from lcs.layers.topk_batch import topk_sparsify_many, warm_up
from lcs.ops import topk_sparsify

MODELS = {"cpreresnet20": 10, "resnet18": 1000}
DENSITIES = (0.025, 0.1, 0.3, 0.5, 0.9)


def _time_into(fn, times: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)


def bench(name: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create(name, num_classes=MODELS[name], norm="bn"), lcs.UnstructuredConfig())
    modules = dict(sub.model.named_modules())
    # a line's weights at an interior α: what a switch selects from
    weights = [torch.lerp(p.original0, p.original1, 0.3).detach()
               for p in (modules[f].parametrizations.weight for f in sub.compressed)]
    rows = []
    for d in DENSITIES:
        per_layer = [topk_sparsify(w, d) for w in weights]
        batched = topk_sparsify_many(weights, [d] * len(weights))
        assert all(torch.equal(a, b) for a, b in zip(per_layer, batched, strict=True))
        tl: list[float] = []
        tb: list[float] = []
        for _ in range(repeats):
            _time_into(lambda: [topk_sparsify(w, d) for w in weights], tl)  # noqa: B023
            _time_into(lambda: topk_sparsify_many(weights, [d] * len(weights)), tb)  # noqa: B023
        ml, mb = statistics.median(tl), statistics.median(tb)
        row = {"model": name, "layers": len(weights), "params": sum(w.numel() for w in weights), "density": d,
               "per_layer_ms": ml, "batched_ms": mb, "speedup": ml / mb}
        rows.append(row)
        print(f"{name:>13} {len(weights):3d} layers d={d:<6g} torch.topk per layer {ml:8.2f} ms   "
              f"one compiled call {mb:8.2f} ms   {ml / mb:5.2f}x", flush=True)
    return rows


def main() -> None:
    keep_freed_memory()  # what the lcs CLI runs with (lcs.alloc)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default="benchmarks/results/topk_select.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warm_up()
    rows = [r for name in MODELS
            for r in bench(name, args.repeats if name == "cpreresnet20" else max(3, args.repeats // 6))]
    result = {"benchmark": "topk_select", "threads": args.threads, "torch": torch.__version__,
              "machine": platform.machine(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
