"""Training steps in channels-last memory format against contiguous (NCHW), side by side.

The same LCS training step (``Trainer.train_step``: α sampling, compression, regularizer) on one
in-memory batch, once with ``run.channels_last=false`` and once with ``=true``, interleaved in rounds
so that machine noise hits both alike; the median round is reported per regime, method and norm.
This is the measurement behind ``lcs.train.loop.channels_last_by_default`` (on CPU: channels-last
for BatchNorm models, contiguous for GroupNorm ones).

    python benchmarks/channels_last.py [--threads 1] [--batch 128] [--rounds 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import lcs_runner  # noqa: E402

from lcs.alloc import keep_freed_memory  # noqa: E402

CASES = [("unstructured", "lcs_l", "bn"), ("unstructured", "target", "bn"), ("quantized", "lcs_l", "bn"),
         ("structured", "lcs_p", "bn"), ("unstructured", "lcs_l", "gn"), ("quantized", "lcs_l", "gn")]


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="training steps per round and contestant")
    ap.add_argument("--json", default="benchmarks/results/channels_last.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for regime, method, norm in CASES:
            extra = (f"model.norm={norm}", f"run.threads={args.threads}", *(("method.target=1.0",) if method == "target"
                                                                             else ()))
            steps = {cl: lcs_runner(batch, regime, method, tmp, extra=(*extra, f"run.channels_last={str(cl).lower()}"))
                     for cl in (False, True)}
            for step in steps.values():  # warm-up: first-step allocations, oneDNN primitive caches
                step(0)
                step(1)
            times: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.rounds):
                for cl, step in steps.items():
                    t0 = time.perf_counter()
                    for i in range(args.steps):
                        step(2 + r * args.steps + i)
                    times[cl].append((time.perf_counter() - t0) / args.steps)
            contiguous, last = statistics.median(times[False]), statistics.median(times[True])
            row = {"regime": regime, "method": method, "norm": norm, "contiguous_img_per_s": args.batch / contiguous,
                   "channels_last_img_per_s": args.batch / last, "speedup": contiguous / last}
            rows.append(row)
            print(f"{regime:>12}:{method:<7} {norm}  contiguous {row['contiguous_img_per_s']:6.1f} img/s  "
                  f"channels-last {row['channels_last_img_per_s']:6.1f} img/s  {row['speedup']:.2f}x", flush=True)
    out = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
           "threads": args.threads, "batch": args.batch, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
