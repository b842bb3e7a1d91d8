"""Latency of the physically slim cPreResNet20 vs width, side by side in one run, next to the MAC
ratio. Target (issue 3): width 0.25 at least 4× faster than width 1.0 at batch 64 on this CPU.

The networks are what ``lcs export RUN --alpha A`` ships for a structured subspace: plain Conv2d /
norm layers with fewer channels. Widths are measured interleaved (round robin over several
rounds), so a change in machine load hits every width alike; the figure is the median per width.

    python benchmarks/slim_latency.py [--batch 1,64] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

import lcs
from lcs.alloc import keep_freed_memory
from lcs.deploy.bake import materialize
from lcs.deploy.profile import measure_latency
from lcs.regimes import StructuredConfig
from lcs.stats import count_macs

WIDTHS = [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]


def main() -> None:
    keep_freed_memory()  # what the lcs CLI runs with (lcs.alloc)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--norm", default="ln", help="ln | in | bn")
    ap.add_argument("--json", default="benchmarks/results/slim_latency.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    torch.manual_seed(0)
    config = StructuredConfig(geometry="point")
    sub = lcs.convert(lcs.models.create("cpreresnet20", norm=args.norm), config)
    shape = (3, 32, 32)
    nets = {w: materialize(sub, config.alpha_of(w), shape) for w in WIDTHS}
    macs = {w: count_macs(net, shape)[0] for w, net in nets.items()}
    params = {w: sum(p.numel() for p in net.parameters()) for w, net in nets.items()}
    times: dict[tuple[int, float], list[float]] = {(b, w): [] for b in batches for w in WIDTHS}
    for _ in range(args.rounds):
        for b in batches:
            x = torch.randn(b, *shape)
            for w in WIDTHS:
                times[(b, w)] += measure_latency(nets[w], x, warmup=2, repeats=5 if b > 1 else 20)
    rows = []
    for w in WIDTHS:
        row = {"width": w, "params": params[w], "macs": macs[w], "mac_ratio": macs[1.0] / macs[w]}
        for b in batches:
            med = statistics.median(times[(b, w)])
            row[f"ms_b{b}"] = med
            row[f"speedup_b{b}"] = statistics.median(times[(b, 1.0)]) / med
        rows.append(row)
    head = f"{'width':>6}{'params':>10}{'MACs':>13}{'MAC ratio':>10}" + "".join(
        f"{f'b{b} ms':>10}{f'b{b} speedup':>13}" for b in batches)
    print(head)
    for r in rows:
        print(f"{r['width']:>6.3f}{r['params']:>10,}{r['macs']:>13,}{r['mac_ratio']:>10.2f}" + "".join(
            f"{r[f'ms_b{b}']:>10.2f}{r[f'speedup_b{b}']:>13.2f}" for b in batches))
    result = {"benchmark": "slim_latency", "model": "cpreresnet20", "norm": args.norm, "input": list(shape),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
              "rounds": args.rounds, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
