"""Training throughput of LCS vs plain dense training of the same architecture, side by side.

Dense: the plain cPreResNet20 (nn.Conv2d + GroupNorm), SGD, cross-entropy.
LCS:   the same model converted with ``lcs.convert`` and trained through ``Trainer.train_step``
       (α sampling, TopK after the warm-up, cos² regularizer; quantized: weights and activations
       fake-quantized, observers updating): the real training step.
Both run on the same in-memory random batch (no data loading in the timed loop), interleaved in
rounds so that machine noise hits both alike; the median round is reported.

Quantized methods are timed in both phases of a run: ``…@warmup`` before ``method.warmup`` of the
steps (weights quantized, activations not yet), and after it (weights and activations). The
``whole_run`` ratio weighs the two phases' time per image by the schedule (80 % / 20 % by default):
what a full training run costs against dense.

    python benchmarks/train_throughput.py [--batch 128] [--rounds 5] [--steps 6] [--json PATH]
        [--methods unstructured:lcs_l,quantized:lcs_l,...]
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
import torch.nn.functional as F

import lcs
from lcs.alloc import keep_freed_memory
from lcs.data import ImageData, Split
from lcs.train.config import load_config
from lcs.train.loop import Trainer


def synthetic_data(n: int, size: int = 32, classes: int = 10) -> ImageData:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                  torch.randint(0, classes, (n,), generator=g))
    return ImageData("synthetic", split, split, [str(i) for i in range(classes)], (0.5,) * 3, (0.25,) * 3, 4, True)


def dense_runner(batch: tuple[torch.Tensor, torch.Tensor]):
    torch.manual_seed(0)
    model = lcs.models.create("cpreresnet20", num_classes=10, norm="gn")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = batch

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


TARGETS = {"unstructured": 0.1, "quantized": 4}  # a density; bits
DEFAULT_METHODS = "unstructured:lcs_l,unstructured:lcs_p,unstructured:target,quantized:lcs_l,quantized:lcs_p"


def lcs_runner(batch: tuple[torch.Tensor, torch.Tensor], regime: str, method: str, tmp: str,
               during_warmup: bool = False, extra: tuple[str, ...] = ()):
    """One real training step of ``regime``/``method`` as a function of the step index; ``extra``:
    config overrides applied last (``benchmarks/channels_last.py`` sets the norm, threads, layout)."""
    data = synthetic_data(batch[0].shape[0] * 4)
    overrides = [f"method.regime={regime}", f"method.name={method}", f"data.batch_size={batch[0].shape[0]}",
                 "optim.epochs=100", "run.progress=false"]
    if method == "target":
        overrides.append(f"method.target={TARGETS[regime]}")
    overrides.extend(extra)
    phase = "warmup" if during_warmup else "after"
    name = "-".join([regime, method, phase, *extra]).replace("=", "_")
    trainer = Trainer(load_config(None, overrides), Path(tmp) / name, data=data)
    # By default the steady state after the warm-up, when compression (and activation quantization)
    # is active; during_warmup: the first steps (quantized: weights only).
    base = 1 if during_warmup else round(trainer.cfg.method.warmup * trainer.total_steps) + 1
    x, y = batch

    def step(i: int) -> None:
        trainer.train_step(x, y, base + i)

    return step


def timed(step, steps: int, start: int) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        step(start + i)
    return time.perf_counter() - t0


def main() -> None:
    keep_freed_memory()  # what the lcs CLI runs with (lcs.alloc)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="training steps per round and contestant")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="regime:method pairs (quantized: lcs_l, lcs_p, target)")
    ap.add_argument("--json", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"dense": dense_runner(batch)}
        for item in args.methods.split(","):
            regime, method = item.split(":")
            runners[f"{regime}/{method}"] = lcs_runner(batch, regime, method, tmp)
            if regime == "quantized":
                runners[f"{regime}/{method}@warmup"] = lcs_runner(batch, regime, method, tmp, during_warmup=True)
        for run in runners.values():  # warm-up: allocator, kernels
            timed(run, 2, 0)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.rounds):
            for name, run in runners.items():
                times[name].append(timed(run, args.steps, 10 + r * args.steps))
    ips = {k: args.batch * args.steps / statistics.median(v) for k, v in times.items()}
    warm = load_config(None, []).method.warmup
    whole_run = {k: 1.0 / ((warm / ips[f"{k}@warmup"] + (1 - warm) / ips[k]) * ips["dense"])
                 for k in ips if f"{k}@warmup" in ips}
    result = {
        "benchmark": "train_throughput", "model": "cpreresnet20", "norm": "gn", "batch": args.batch,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "img_per_s": ips, "ratio_vs_dense": {k: v / ips["dense"] for k, v in ips.items() if k != "dense"},
        "whole_run_ratio_vs_dense": whole_run, "warmup_fraction": warm,
        "rounds": args.rounds, "steps_per_round": args.steps,
    }
    print(f"{'contestant':<26} {'img/s':>8} {'ratio vs dense':>15}")
    for k, v in ips.items():
        ratio = "" if k == "dense" else f"{v / ips['dense']:.2f}x"
        print(f"{k:<26} {v:8.1f} {ratio:>15}")
    for k, v in whole_run.items():
        print(f"{k + ' whole run':<26} {'':>8} {v:14.2f}x  ({warm:.0%} of the steps before activations are quantized)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
