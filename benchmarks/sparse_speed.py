"""Unstructured networks on sparse kernels vs the same networks on dense kernels, side by side.

For each model and density: the plain network at that density (TopK of a converted model, as
``lcs.materialize`` gives it) run on dense kernels, and the same network after ``lcs.kernels.
accelerate`` (each layer on the kernel its micro-benchmark picked here), timed interleaved in one
process (dense, sparse, dense, sparse, ...), so load changes hit both alike. Prints the speed-up
(dense ms / sparse ms), how many layers run sparse, and checks the outputs agree; writes JSON.
Two more networks, the best dense ones at hand (BatchNorm folded into the convs by
``torch.fx.experimental.optimization.fuse``, and lcs's compiled max pool; in NCHW and in
channels-last), separate what the sparse kernels buy (``speedup_vs_best_dense``, against the faster
of the two) from what folding, layout and the pool buy every α alike.

Targets (issue 15): cPreResNet20 at density 0.05: ≥ 1.5× at batch 64, ≥ 1.3× at batch 1; ResNet18
(224×224) at 0.05: ≥ 2.5× at batch 1, at 0.1: ≥ 2×; no density slower than 0.95× dense.

    python benchmarks/sparse_speed.py [--threads 2] [--repeats 15] [--json benchmarks/results/sparse_speed.json]
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
from torch.fx.experimental.optimization import fuse

import lcs
from lcs.alloc import keep_freed_memory
from lcs.layers.kernels import KernelChooser, accelerate, kernel_report

CASES = [("cpreresnet20", (3, 32, 32), (1, 64), (0.025, 0.05, 0.1, 0.25, 0.5, 1.0)),
         ("resnet18", (3, 224, 224), (1,), (0.05, 0.1, 0.25, 0.5, 1.0))]


def _interleaved(fns: list, x: torch.Tensor, repeats: int) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn(x)
        for _ in range(repeats):
            for fn, out in zip(fns, times, strict=True):
                t0 = time.perf_counter()
                fn(x)
                out.append((time.perf_counter() - t0) * 1e3)
    return times


class _ChannelsLast(torch.nn.Module):
    """A network run channels-last, its input converted inside the timed call."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


def bench(name: str, shape: tuple[int, ...], batches: tuple[int, ...], densities: tuple[float, ...],
          repeats: int, chooser: KernelChooser, norm: str = "bn") -> list[dict]:
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create(name, num_classes=10 if name == "cpreresnet20" else 1000, norm=norm),
                      lcs.UnstructuredConfig(geometry="point", d_min=min(densities)))
    sub.model.eval()
    rows = []
    for d in densities:
        dense = lcs.materialize(sub, d)
        # the fastest dense networks at hand: BatchNorm folded into the convs by torch.fx's inference
        # fusion, and the compiled max pool, in PyTorch's default layout and channels-last (oneDNN's
        # NCHW convs cost several times their channels-last time on some hosts); beside the faster,
        # the sparse kernels' own gain shows
        best_dense = fuse(lcs.materialize(sub, d))
        accelerate(best_dense, [], chooser=chooser, channels_last=False)
        cl_dense = _ChannelsLast(fuse(lcs.materialize(sub, d)))
        fast = lcs.materialize(sub, d)
        accelerate(fast, sub.compressed, chooser=chooser)
        for b in batches:
            x = torch.randn(b, *shape)
            with torch.no_grad():
                err = float((fast(x) - dense(x)).abs().max())  # also measures the kernel choice (cached)
            reps = repeats if b == 1 else max(5, repeats // 3)
            td, tn, tc, ts = _interleaved([dense, best_dense, cl_dense, fast], x, reps)
            md, mn, mc, ms = (statistics.median(t) for t in (td, tn, tc, ts))
            mb = min(mn, mc)
            chosen = [v.get(b, "dense") for v in kernel_report(fast).values()]
            sparse = sum(k != "dense" for k in chosen)
            row = {"model": name, "norm": norm, "density": d, "batch": b, "dense_ms": md, "sparse_ms": ms,
                   "speedup": md / ms, "fused_dense_ms": mn, "channels_last_dense_ms": mc,
                   "best_dense_ms": mb, "speedup_vs_best_dense": mb / ms,
                   "sparse_layers": sparse, "csr_layers": chosen.count("csr"),
                   "direct_layers": chosen.count("direct"),
                   "compressed_layers": len(sub.compressed), "max_abs_diff": err}
            rows.append(row)
            print(f"{name:>13} d={d:<5g} b{b:<3d} dense {md:8.2f} ms  best dense {mb:8.2f} ms "
                  f"({'channels-last' if mc < mn else 'NCHW'})  fast {ms:8.2f} ms  "
                  f"{md / ms:5.2f}x ({mb / ms:4.2f}x best dense)  "
                  f"{sparse:2d}/{len(sub.compressed)} layers sparse ({chosen.count('direct')} direct)  "
                  f"max|diff| {err:.1e}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--models", default="cpreresnet20,resnet18")
    p.add_argument("--norm", default="bn", help="bn (the CIFAR-10 recipes': an affine map in eval mode) "
                                                "or gn (computes statistics at inference: a larger fixed cost)")
    p.add_argument("--json", default="benchmarks/results/sparse_speed.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:  # a fresh decision cache: every choice measured in this run
        chooser = KernelChooser(path=str(Path(tmp) / "kernels.json"))
        rows = [r for name, shape, batches, densities in CASES if name in args.models.split(",")
                for r in bench(name, shape, batches, densities, args.repeats, chooser, args.norm)]
    out = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
           "threads": args.threads, "norm": args.norm, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    worst = min(r["speedup"] for r in rows)
    print(f"slowest case: {worst:.2f}x dense; wrote {args.json}")


if __name__ == "__main__":
    main()
