"""Quantized networks on integer kernels vs the same networks on float kernels, side by side.

For each bit width: the plain quantized cPreResNet20 at that width (``lcs.materialize`` of a
quantized LCS+L line) run three ways, interleaved in one process so load changes hit all alike:
* ``float``: float kernels with fake-quantized inputs, what lcs ran before integer kernels;
* ``best float``: the same, channels-last (weights and input), the fastest float layout here;
* ``fast``: ``kernels="auto"``: each conv whose output the next conv quantizes runs PyTorch's int8
  conv where its micro-benchmark won (``lcs.layers.int8``), the rest float, channels-last.
Prints the speed-ups, how many layers run int8, and how far the outputs are apart (rounding ties
only); writes JSON with the CPU's int8 features (VNNI, AMX), which decide what int8 buys.

A reference row per batch (``--ptq``): the plain network quantized whole by torch.ao's FX
post-training quantization (every tensor 8-bit, calibrated on random data): the ceiling of integer
kernels on this CPU, *not* the function the trained lcs network computes.

Target (issue 15): at 8 bits ≥ 1.5× the float network at batch 64 where an integer kernel is
available on this CPU.

    python benchmarks/quantized_speed.py [--threads 2] [--repeats 15] [--subspace FILE] [--json PATH]

``--subspace``: a trained quantized subspace (``lcs export RUN --subspace``) instead of a random
network whose activation ranges were observed on random inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lcs
from lcs.alloc import keep_freed_memory
from lcs.layers import int8
from lcs.layers.kernels import KernelChooser, accelerate, int8_layer_count
from lcs.layers.quant import set_activation_quant


def _interleaved(fns: list, xs: list[torch.Tensor], repeats: int) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn, x in zip(fns, xs, strict=True):
            fn(x)
        for _ in range(repeats):
            for fn, x, out in zip(fns, xs, times, strict=True):
                t0 = time.perf_counter()
                fn(x)
                out.append((time.perf_counter() - t0) * 1e3)
    return times


def _random_subspace() -> lcs.Subspace:
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10, norm="bn"), lcs.QuantizedConfig())
    set_activation_quant(sub.model, True)
    sub.model.train()
    with torch.no_grad():
        for a in torch.linspace(0, 1, 6).tolist():
            sub.set_alpha(a)
            sub.model(torch.randn(32, 3, 32, 32))
    sub.model.eval()
    return sub


def _cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "vnni" in f or f.startswith("amx") or f in ("avx2", "avx512f"))


def _networks(args: argparse.Namespace, chooser: KernelChooser):
    """(bits, float network, fast network) per bit width."""
    if args.subspace:
        from lcs.deploy.runtime import Runtime

        for bits in range(3, 9):
            slow, fast = Runtime.load(args.subspace, kernels="dense"), Runtime.load(args.subspace)
            alpha = slow.config.alpha_of(bits)
            slow.set_alpha(alpha)
            fast.set_alpha(alpha)
            yield bits, slow.network, fast.network
        return
    sub = _random_subspace()
    for bits in range(3, 9):
        alpha = sub.config.alpha_of(bits)
        plain = lcs.materialize(sub, alpha)
        fast = copy.deepcopy(plain)
        accelerate(fast, sub.compressed, chooser=chooser)
        yield bits, plain, fast


def _ptq(x: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    net = lcs.models.create("cpreresnet20", num_classes=10, norm="bn").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(net, get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for _ in range(4):
                prepared(torch.randn_like(x))
        return quantize_fx.convert_fx(prepared)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--subspace", default=None)
    p.add_argument("--no-ptq", action="store_true", help="skip the torch.ao whole-network reference rows")
    p.add_argument("--json", default="benchmarks/results/quantized_speed.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # a fresh decision cache: every choice measured in this run
        chooser = KernelChooser(path=str(Path(tmp) / "kernels.json"))
        for bits, plain, fast in _networks(args, chooser):
            best = copy.deepcopy(plain).to(memory_format=torch.channels_last)
            for b in batches:
                x = torch.randn(b, 3, 32, 32)
                xcl = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    ref, out = plain(x), fast(x)  # also makes the kernel choices (timed, cached)
                err = float((out - ref).abs().max())
                agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
                reps = args.repeats if b == 1 else max(5, args.repeats // 3)
                tf, tb, ts = _interleaved([plain, best, fast], [x, xcl, x], reps)
                mf, mb, ms = statistics.median(tf), statistics.median(tb), statistics.median(ts)
                n8 = int8_layer_count(fast, b) or 0
                rows.append({"bits": bits, "batch": b, "float_ms": mf, "best_float_ms": mb, "fast_ms": ms,
                             "speedup": mf / ms, "speedup_vs_best_float": mb / ms, "int8_layers": n8,
                             "max_abs_diff": err, "max_abs_logit": float(ref.abs().max()),
                             "argmax_agreement": agree})
                print(f"{bits} bits b{b:<3d} float {mf:7.2f} ms  best float {mb:7.2f} ms  fast {ms:7.2f} ms  "
                      f"{mf / ms:4.2f}x ({mb / ms:4.2f}x best float)  {n8:2d} layers int8  "
                      f"max|diff| {err:.1e} (|logit| ≤ {float(ref.abs().max()):.2f})", flush=True)
        if not args.no_ptq and int8.available():
            for b in batches:
                x = torch.randn(b, 3, 32, 32)
                plain = lcs.models.create("cpreresnet20", num_classes=10, norm="bn").eval()
                q = _ptq(x)
                xcl = x.contiguous(memory_format=torch.channels_last)
                reps = args.repeats if b == 1 else max(5, args.repeats // 3)
                tf, tq = _interleaved([plain, q], [x, xcl], reps)
                mf, mq = statistics.median(tf), statistics.median(tq)
                rows.append({"reference": "torch.ao FX PTQ, all tensors 8-bit", "batch": b, "float_ms": mf,
                             "ptq_ms": mq, "speedup": mf / mq})
                print(f"reference: torch.ao whole-network int8, b{b:<3d} float {mf:7.2f} ms  int8 {mq:7.2f} ms  "
                      f"{mf / mq:4.2f}x (not the trained function)", flush=True)
    out = {"machine": platform.machine(), "processor": platform.processor(), "cpu_flags": _cpu_flags(),
           "torch": torch.__version__, "engine": torch.backends.quantized.engine, "threads": args.threads,
           "subspace": args.subspace, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    eight = [r for r in rows if r.get("bits") == 8 and r["batch"] == 64]
    if eight:
        print(f"8 bits, batch 64: {eight[0]['speedup']:.2f}x the float network; wrote {args.json}")


if __name__ == "__main__":
    main()
