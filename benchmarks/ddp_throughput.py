"""Training throughput of one process (2 threads) vs two DDP processes on gloo (1 thread each).

Both train the same model with the real loop pieces (``train_batches`` + ``Trainer.train_step``) at
the same *global* batch, after the compression warm-up so TopK is active, on the same in-memory
synthetic data. The 2-process run is launched with ``torchrun --nproc_per_node 2`` (this script
re-invoked with ``--worker``); its time is rank 0's, between two barriers. Same cores, so the
ratio shows what DDP's gradient all-reduce and per-process overhead cost against intra-op
threading, not a speed-up from more hardware.

    python benchmarks/ddp_throughput.py [--model cpreresnet20] [--method lcs_l] [--batch 128]
                                        [--steps 8] [--warmup 2] [--json PATH] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lcs.alloc import keep_freed_memory
from lcs.data import ImageData, Split, train_batches
from lcs.train.config import load_config
from lcs.train.loop import Trainer


def synthetic_data(n: int, size: int = 32, classes: int = 10) -> ImageData:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                  torch.randint(0, classes, (n,), generator=g))
    return ImageData("synthetic", split, split, [str(i) for i in range(classes)], (0.5,) * 3, (0.25,) * 3, 4, True)


def measure(args: argparse.Namespace, threads: int, out: str) -> dict:
    """Time ``args.steps`` steps after ``args.warmup`` untimed ones; under torchrun, this rank's share."""
    data = synthetic_data(args.batch * (args.warmup + args.steps))
    overrides = [f"model.name={args.model}", f"method.name={args.method}", f"data.batch_size={args.batch}",
                 "optim.epochs=100", "run.progress=false", f"run.threads={threads}"]
    if args.method == "target":
        overrides.append("method.target=0.1")
    trainer = Trainer(load_config(None, overrides), out, data=data)
    base = round(trainer.cfg.method.warmup * trainer.total_steps) + 1  # steady state: compression active
    dist = trainer.dist
    batches = train_batches(data, args.batch, epoch=0, seed=0, rank=dist.rank, world_size=dist.world_size)

    def sync() -> None:
        if dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    for i in range(args.warmup):
        x, y = next(batches)
        trainer.train_step(x, y, base + i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        x, y = next(batches)
        trainer.train_step(x, y, base + args.warmup + i)
    sync()
    elapsed = time.perf_counter() - t0
    result = {"processes": dist.world_size, "threads_per_process": torch.get_num_threads(), "seconds": elapsed,
              "img_per_s": args.batch * args.steps / elapsed}
    if dist.enabled:
        from lcs.train.distributed import shutdown_distributed

        shutdown_distributed(dist)
    return result


def main() -> None:
    keep_freed_memory()  # what the lcs CLI runs with (lcs.alloc)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpreresnet20")
    ap.add_argument("--method", default="lcs_l")
    ap.add_argument("--batch", type=int, default=128, help="global batch (both runs)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--json", default="benchmarks/results/ddp_throughput.json")
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # set when torchrun re-invokes this script
    args = ap.parse_args()

    if args.worker:  # one of the torchrun processes: rank 0 writes its timing to the given file
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(args, 1, tmp)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.worker).write_text(json.dumps(r))
        return

    with tempfile.TemporaryDirectory() as tmp:
        single = measure(args, 2, str(Path(tmp) / "single"))
        print(f"1 process x 2 threads: {single['img_per_s']:.1f} img/s", flush=True)
        report = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--model", args.model, "--method", args.method, "--batch", str(args.batch), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--worker", str(report)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ddp = json.loads(report.read_text())
    print(f"2 processes x 1 thread (DDP, gloo): {ddp['img_per_s']:.1f} img/s")
    ratio = ddp["img_per_s"] / single["img_per_s"]
    print(f"ratio 2-process / 1-process: {ratio:.2f}")
    result = {"benchmark": "ddp_throughput", "model": args.model, "method": args.method, "global_batch": args.batch,
              "steps": args.steps, "warmup_steps": args.warmup, "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(), "single": single, "ddp": ddp,
              "ratio_ddp_vs_single": ratio, "note": args.note}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
