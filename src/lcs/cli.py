"""The ``lcs`` command: train → eval → export, plus plot. Errors are one line, never a traceback
(set LCS_DEBUG=1 to see it)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .alloc import keep_freed_memory
from .errors import LcsError
from .files import write_json

__all__ = ["main"]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LcsError(f"--grid expects comma-separated numbers, got {text!r}") from None


def _levels(text: str) -> dict[str, float]:
    """``density=0.1,bits=4`` → {"density": 0.1, "bits": 4.0}."""
    out = {}
    for part in (p for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError(part)
            out[name.strip()] = float(value)
        except ValueError:
            raise LcsError(f"expected name=value pairs like density=0.1,bits=4, got {text!r}") from None
    return out


def _points(text: str) -> list:
    """A --grid: α values (``0.1,0.5,1``), or on a point subspace of several levels, level cells
    separated by ``;`` (``density=0.1,bits=4;density=0.5,bits=8``)."""
    if "=" in text:
        return [_levels(cell) for cell in text.split(";") if cell.strip()]
    return _floats(text)


def _point_of(args: argparse.Namespace):
    if args.levels:
        if args.alpha is not None:
            raise LcsError("give --alpha or --levels, not both")
        return _levels(args.levels)
    return args.alpha


_RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "eval.json", "eval.png", "eval_bn_stats.png",
              "eval_heatmap.png")


def _run_files(out: Path) -> list[str]:
    """The files of an earlier lcs run in ``out`` (what ``--overwrite`` removes; nothing else is touched)."""
    return [name for name in _RUN_FILES if (out / name).exists()]


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import apply_overrides, config_from_dict, load_config
    from .train.loop import Trainer

    overrides = list(args.set or [])
    for key, value in (("method.regime", args.regime), ("method.name", args.method), ("model.name", args.model),
                       ("data.name", args.data), ("data.root", args.data_root), ("optim.epochs", args.epochs),
                       ("run.seed", args.seed), ("data.val_fraction", args.val_fraction),
                       ("run.device", args.device), ("run.amp", args.amp), ("data.workers", args.workers),
                       ("model.init", args.init)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_progress:
        overrides.append("run.progress=false")
    out = Path(args.out)
    if args.resume:
        import yaml

        if not (out / "config.yaml").is_file():
            raise LcsError(f"--resume: {out} has no config.yaml to resume from")
        cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
        cfg = apply_overrides(cfg, overrides).validate()
    else:
        cfg = load_config(args.config, overrides)
        earlier = _run_files(out)
        if earlier and not args.overwrite:
            what = "a run" if (out / "checkpoints").exists() else f"an earlier run's files ({', '.join(earlier[:3])})"
            raise LcsError(f"{out} already holds {what}: pass --resume to continue it, --overwrite to replace it, "
                           f"or choose another --out")
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    from .train.distributed import shutdown_distributed

    trainer = Trainer(cfg, out, resume=args.resume)
    try:
        records = trainer.fit()
    finally:
        shutdown_distributed(trainer.dist)
    if records:
        last = records[-1]
        lo, hi = trainer.val_range
        acc = (f"val acc {last['val_acc_hi']:.4f} at the accurate end, {last['val_acc_lo']:.4f} at the efficient end"
               if lo != hi else f"val acc {last['val_acc_hi']:.4f} at its α = {hi:g}")
        print(f"trained {cfg.method.regime}/{cfg.method.name} for {last['epoch']} epochs: {acc}; run in {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.evaluate import default_grid, sweep
    from .eval.report import format_table, plot_bn_gaps, plot_runs
    from .regimes import record_of
    from .train.config import apply_overrides
    from .train.run import arch_meta, load_run, open_data, resolve_device

    cfg, sub, state = load_run(args.run)
    for key, value in (("run.device", args.device), ("data.workers", args.workers)):
        if value is not None:  # where and how to evaluate, not what was trained: the run's config is kept
            cfg = apply_overrides(cfg, [f"{key}={value}"]).validate()
    # Another data set takes its own root (or none, for digits); the run's own data keeps its root.
    data = open_data(cfg, root=args.data_root if args.data else None, name=args.data)
    if data.num_classes != cfg.model.num_classes:
        raise LcsError(f"the evaluation data has {data.num_classes} classes, the run {cfg.model.num_classes}")
    record = record_of(sub.config)
    grid = _points(args.grid) if args.grid else default_grid(sub.config)
    if record.methods[cfg.method.name].sampler == "target" and not args.grid:  # one network: the target's α
        grid = [sub.config.alpha_of(cfg.method.target)]
    device = resolve_device(cfg.run.device)
    sub.model.to(device)
    meta = {"arch": arch_meta(cfg), "regime": cfg.method.regime, "method": cfg.method.name}
    latency = tuple(int(b) for b in _floats(args.latency_batch)) if args.latency_batch else ()
    if record.methods[cfg.method.name].sweep == "keep":  # LEC: one network pruned to fractions of its channels
        from .eval.prune import sweep_keep

        keeps = _floats(args.keep) if args.keep else [sub.config.level(a) for a in default_grid(sub.config)]
        records = sweep_keep(sub, keeps, data, device, meta, latency)
    else:
        if not args.no_progress:
            print(f"evaluating {len(grid)} α on {len(data.val):,} validation images ...", file=sys.stderr, flush=True)
        records = sweep(sub, grid, data, device, meta, latency, progress=not args.no_progress)
    print(format_table(records))
    _warn_if_busy(records, latency)
    run = Path(args.run)
    json_path = Path(args.json) if args.json else run / "eval.json"
    payload = {"run": str(run), "regime": cfg.method.regime, "method": cfg.method.name,
               "provenance": _provenance(cfg, data, state), "records": records}
    write_json(json_path, payload)
    plot_path = json_path.with_suffix(".png")
    plot_runs([(f"{cfg.method.name} ({cfg.method.regime})", records)], plot_path, x=record.plot_axis)
    written = [json_path, plot_path]
    if len(sub.config.level_names) == 2 and any(isinstance(a, dict) for a in grid):  # a grid of two levels
        from .eval.report import plot_heatmap

        heat_path = json_path.with_name(json_path.stem + "_heatmap.png")
        plot_heatmap(records, *sub.config.level_names, heat_path,
                     title=f"{cfg.method.name} ({cfg.method.regime}): accuracy and bytes per cell")
        written.append(heat_path)
    if any("bn_gaps" in r for r in records):
        bn_path = json_path.with_name(json_path.stem + "_bn_stats.png")
        plot_bn_gaps([(cfg.method.name, records)], bn_path)
        written.append(bn_path)
        print("BatchNorm running statistics vs true batch statistics (mean |gap| over layers): "
              + ", ".join(f"{sub.config.level_name} {r.get(sub.config.level_name, r.get('keep', 1.0)):.3g}: "
                          f"mean {r['bn_mean_gap']:.3f} var {r['bn_var_gap']:.3f}" for r in records))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _machine_provenance() -> dict:
    """Versions, machine, threads and date: what every measurement file records."""
    import datetime
    import platform

    import torch

    from . import __version__

    return {"lcs": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _provenance(cfg, data, state: dict) -> dict:
    """Where an eval's figures come from: the machine, seed, training length, data and split."""
    from .train.run import split_seed

    return {**_machine_provenance(), "seed": cfg.run.seed, "split_seed": split_seed(cfg),
            "epochs": state.get("epoch"), "step": state.get("step"),
            "data": cfg.data.name, "train_images": len(data.train), "val_images": len(data.val)}


def _warn_if_busy(records: list[dict], batches) -> None:
    """Latency spread that says another process took the CPU: a p90 over twice its median."""
    from .eval.report import point_label

    busy = [f"b{b} at {'α=' if 'alpha' in r else ''}{point_label(r)} "
            f"(median {r[f'latency_ms_b{b}']:.2f} ms, p90 {r[f'p90_ms_b{b}']:.2f} ms)"
            for r in records for b in batches
            if f"p90_ms_b{b}" in r and r[f"p90_ms_b{b}"] > 2 * r[f"latency_ms_b{b}"]]
    if busy:
        print(f"warning: the machine looked busy while timing {', '.join(busy[:3])}"
              f"{' and more' if len(busy) > 3 else ''}: latency figures are unreliable; rerun on a quiet machine",
              file=sys.stderr)


def _shared_axis(runs: list) -> str:
    """An x axis every run has in the same sense: its own level when all runs share a regime,
    else the artifact's bytes (a structured run has no sparsity, a quantized one no width)."""
    records = [r for _, recs in runs for r in recs]
    if all("width" in r or "keep" in r for r in records):
        return "params"
    if all("bits" in r for r in records):
        return "bits"
    if all("density" in r for r in records):
        return "sparsity"
    return "bytes"


def _run_method(run: str) -> str | None:
    """The method a run directory's config.yaml names (None when it cannot be read)."""
    import yaml

    try:
        return (yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}).get("method", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _cmd_plot(args: argparse.Namespace) -> int:
    from .eval.report import plot_epochs, plot_runs

    if args.epochs:
        if args.x:
            raise LcsError("--epochs plots accuracy per epoch: drop --x")
        curves = []
        for spec in args.runs:
            run, _, shift = spec.partition("@")  # RUN@N: epochs shifted by N (a run seeded from another's model)
            if shift and not shift.isdigit():
                raise LcsError(f"--epochs takes RUN or RUN@EPOCHS, got {spec!r}")
            path = Path(run) / "metrics.jsonl"
            if not path.is_file():
                raise LcsError(f"{path} not found: --epochs takes run directories")
            try:
                records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            except json.JSONDecodeError as e:
                raise LcsError(f"{path} is not an lcs metrics file ({e})") from None
            if _run_method(run) == "target":  # one network: it has no efficient end
                records = [{k: v for k, v in r.items() if not k.startswith("val_acc_lo")} for r in records]
            if shift:
                records = [{**r, "epoch": r["epoch"] + int(shift)} for r in records if "epoch" in r]
            curves.append((Path(run).name + (f" (from epoch {shift})" if shift else ""), records))
        plot_epochs(curves, args.out)
        print(f"wrote {args.out}")
        return 0
    runs = []
    for run in args.runs:
        path = Path(run) / "eval.json" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise LcsError(f"{path} not found: run `lcs eval {run}` first")
        try:
            payload = json.loads(path.read_text())
            runs.append((payload.get("label") or f"{payload['method']} ({Path(payload['run']).name})",
                         payload["records"]))
        except (json.JSONDecodeError, KeyError) as e:
            raise LcsError(f"{path} is not an lcs eval file ({e})") from None
    x = args.x or _shared_axis(runs)
    plot_runs(runs, args.out, x=x)
    print(f"wrote {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .train.run import arch_meta, load_run, split_seed

    cfg, sub, _ = load_run(args.run)
    meta = {"arch": arch_meta(cfg), "regime": cfg.method.regime, "method": cfg.method.name}
    if args.subspace:
        from .deploy.runtime import save_subspace

        if args.alpha is not None or args.format != "safetensors":
            raise LcsError("--subspace writes the whole subspace as safetensors: drop --alpha/--format")
        shape = [3, cfg.data.image_size, cfg.data.image_size]
        data_info = {k: getattr(cfg.data, k) for k in ("name", "root", "val_fraction", "image_size")}
        size = save_subspace(sub, args.out, meta["arch"], {"method": cfg.method.name, "input_shape": shape,
                                                            "data": {**data_info, "seed": split_seed(cfg)}})
        print(f"wrote {args.out}: {size:,} bytes, the whole {cfg.method.regime} subspace "
              f"({sub.config.geometry}), α in [{sub.alpha_range[0]:g}, {sub.alpha_range[1]:g}]")
        return 0
    if args.alpha is None and not args.levels:
        raise LcsError("export needs --alpha A (or --levels density=0.1,bits=4 on a point subspace, or --subspace for "
                       "the whole subspace)")
    from . import models
    from .deploy.artifact import dense_float32_bytes, network_meta
    from .deploy.bake import materialize

    point = _point_of(args)
    levels = sub.move(point)
    plain = materialize(sub, point)
    dense = dense_float32_bytes(models.create(meta["arch"]["name"], **meta["arch"]["kwargs"]))
    if args.format == "onnx":
        from .deploy.onnx import export_onnx

        if not args.no_progress:
            print("exporting to ONNX (torch.export + onnxscript: about half a minute) ...", file=sys.stderr,
                  flush=True)
        size = export_onnx(plain, args.out, (3, cfg.data.image_size, cfg.data.image_size))
        from .regimes import record_of

        note = record_of(sub.config).notes.get("onnx", "")
    else:
        from .deploy.artifact import save_compressed

        size = save_compressed(plain, args.out, network_meta(meta["arch"], cfg.method.regime, cfg.method.name,
                                                             sub.alpha, levels))
        note = ""
    print(f"wrote {args.out}: {size:,} bytes ({size / dense:.1%} of the full dense float32 network's {dense:,}{note}), "
          f"α={sub.alpha:g}, " + ", ".join(f"{k}={v:g}" for k, v in levels.items()))
    return 0


_PROFILE_COLUMNS = [("alpha", "α", "{:.3f}"), ("density", "density", "{:.3f}"), ("width", "width", "{:.3f}"),
                    ("bits", "bits", "{:d}"),
                    ("switch_ms", "switch ms", "{:.2f}"),
                    ("cached_switch_ms", "return ms", "{:.3f}"),
                    ("first_batch_ms", "1st batch ms", "{:.2f}")]


def _cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from .deploy.runtime import Runtime
    from .eval.evaluate import default_grid
    from .eval.report import format_table, plot_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime.load(args.file)
    batches = [int(b) for b in _floats(args.batch)]
    if not batches or min(batches) < 1:
        raise LcsError(f"--batch expects positive integers, got {args.batch!r}")
    grid = _points(args.grid) if args.grid else default_grid(rt.config)
    shape = tuple(rt.header.get("input_shape", (3, 32, 32)))
    data = None
    if args.data:
        from .data import load_data
        from .train.run import cache_dir

        info = rt.header.get("data", {})  # the training run's split, so accuracy is on held-out images
        data = load_data(args.data, args.data_root, val_fraction=info.get("val_fraction", 0.1),
                         seed=info.get("seed", 0), image_size=shape[-1], cache_dir=cache_dir())
    from .deploy.profile import profile_runtime, thread_counts

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(grid), desc="profile", unit="α", dynamic_ncols=True, leave=False)
    try:
        records = profile_runtime(rt, grid, batches, shape, data=data,
                                  threads=thread_counts() if args.per_thread else (),
                                  progress=(lambda rec: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    _warn_if_busy(records, batches)
    cols = list(_PROFILE_COLUMNS)
    for b in batches:
        cols += [(f"latency_ms_b{b}", f"b{b} ms", "{:.2f}"), (f"p90_ms_b{b}", f"b{b} p90", "{:.2f}"),
                 (f"sparse_layers_b{b}", f"b{b} sparse", "{:d}"), (f"int8_layers_b{b}", f"b{b} int8", "{:d}"),
                 (f"layout_b{b}", f"b{b} layout", "{}")]
    cols += [("nonzero_params", "nonzero", "{:,}"), ("macs", "MACs", "{:,}"), ("bytes", "bytes", "{:,}"),
             ("accuracy", "accuracy", "{:.4f}")]
    print(format_table(records, cols))
    out = Path(args.json)
    payload = {"file": str(args.file), "regime": rt.regime, "batches": batches, "threads": torch.get_num_threads(),
               "provenance": _machine_provenance(), "records": records}
    write_json(out, payload)
    lat, acc = out.with_name(out.stem + "_latency.png"), out.with_name(out.stem + "_accuracy.png")
    plot_profile(records, batches, lat, acc if data is not None else None, title=f"{rt.regime}: latency vs α")
    print(f"wrote {out}, {lat}" + (f", {acc}" if data is not None else ""))
    from .regimes import record_of

    if record_of(rt.config).notes.get("profile"):
        print(record_of(rt.config).notes["profile"])
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from .deploy.adapt import run_scenario, timeline
    from .deploy.profile import profile_runtime, quick_grid, thread_counts
    from .deploy.runtime import Runtime
    from .eval.report import plot_adapt

    if args.budget_ms <= 0 or args.seconds <= 0 or not (0 <= args.load_at < args.seconds):
        raise LcsError("need --budget-ms > 0, --seconds > 0 and 0 <= --load-at < --seconds")
    rt = Runtime.load(args.file)
    shape = tuple(rt.header.get("input_shape", (3, 32, 32)))
    if args.profile:
        try:
            records = json.loads(Path(args.profile).read_text())["records"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise LcsError(f"cannot read profile {args.profile}: {e}") from None
    else:
        print("profiling (no --profile given) ...")
        records = profile_runtime(rt, quick_grid(rt.alpha_range), [args.batch], shape, repeats=10,
                                  threads=thread_counts())
    rt.tune(sorted({float(r["alpha"]) for r in records}), [args.batch], shape)  # no request pays for a measurement
    result = run_scenario(rt, records, args.budget_ms, args.seconds, args.load_at, args.batch, shape)
    print(timeline(result, step_s=max(0.5, args.seconds / 20)))
    for name, s in result["summary"].items():
        print(f"{name:>10}: {s['requests']} requests, {s['over_budget']:.1%} over the {args.budget_ms:g} ms budget "
              f"({s['over_budget_under_load']:.1%} under load), mean α {s['mean_alpha']:.3f}")
    infeasible = result["summary"]["controller"]["infeasible_requests"]
    if infeasible:
        print(f"note: for {infeasible} requests no α met the budget at the measured load "
              f"(the controller served the most efficient α)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "adapt.json", result, indent=None)
    plot_adapt(result, out / "adapt.png")
    print(f"wrote {out / 'adapt.json'} and {out / 'adapt.png'}")
    return 0


def _records():
    from .regimes import REGISTRY

    return list(REGISTRY.items())


def _regime_names() -> list[str]:
    return [name for name, _ in _records()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcs", description="Learning Compressible Subspaces: train once, "
                                "choose the compression level at inference time.")
    sp = p.add_subparsers(dest="command", required=True)

    t = sp.add_parser("train", help="train a compressible subspace")
    t.add_argument("--regime", help=" | ".join(_regime_names()))
    t.add_argument("--method", help="; ".join(f"{name}: {' | '.join(rec.methods)}" for name, rec in _records()))
    t.add_argument("--model", help="a registered model name (default cpreresnet20)")
    t.add_argument("--data", help="digits | cifar10 | folder")
    t.add_argument("--data-root", help="dataset folder for cifar10/folder")
    t.add_argument("--val-fraction", type=float, help="validation split carved from the training data")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu | cuda | cuda:N | auto (run.device; default cpu)")
    t.add_argument("--amp", help="none | bf16: bfloat16 autocast for forward + loss (run.amp; default none)")
    t.add_argument("--workers", type=int, help="DataLoader worker processes per process for streamed folders "
                   "(data.workers)")
    t.add_argument("--init", help="a trained plain model (safetensors state dict or `lcs export` file) that seeds "
                   "the subspace (model.init)")
    t.add_argument("--config", help="YAML file with sections data/model/method/optim/run")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=0.1")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    t.set_defaults(fn=_cmd_train)

    e = sp.add_parser("eval", help="sweep a trained subspace over α")
    e.add_argument("run")
    e.add_argument("--grid", help="comma-separated α values, or level cells like 'density=0.1,bits=4;density=0.5,"
                   "bits=8' on a point subspace of several levels (default: the regime's grid)")
    e.add_argument("--data", help="evaluate on other data (default: the run's)")
    e.add_argument("--data-root")
    e.add_argument("--json", help="output JSON (default RUN/eval.json; the plot goes next to it)")
    e.add_argument("--latency-batch", default="1,64",
                   help="batch sizes whose CPU latency is measured per α ('' to skip)")
    e.add_argument("--keep", help="LEC runs: comma-separated fractions of channels kept (default 0.25..1.0)")
    e.add_argument("--device", help="cpu | cuda | cuda:N | auto (default: the run's run.device)")
    e.add_argument("--workers", type=int, help="DataLoader worker processes for streamed folders")
    e.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    e.set_defaults(fn=_cmd_eval)

    pl = sp.add_parser("plot", help="overlay the eval curves (or, with --epochs, the training curves) of several runs")
    pl.add_argument("runs", nargs="+", help="run directories or eval JSON files")
    pl.add_argument("--out", required=True)
    pl.add_argument("--x", choices=["sparsity", "overall_sparsity", "bytes", "macs", "params", "width", "bits"],
                    help="x axis (default: params for structured runs, sparsity otherwise)")
    pl.add_argument("--epochs", action="store_true",
                    help="validation accuracy per epoch at both ends, from each run's metrics.jsonl "
                         "(RUN@N shifts a run's epochs by N, e.g. one started from another run's model)")
    pl.set_defaults(fn=_cmd_plot)

    x = sp.add_parser("export", help="write the compressed network at α (or the whole subspace)")
    x.add_argument("run")
    x.add_argument("--alpha", type=float)
    x.add_argument("--levels", help="a point subspace's levels instead of α, e.g. density=0.1,bits=4")
    x.add_argument("--subspace", action="store_true", help="write the whole subspace for lcs.Runtime")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "onnx"])
    x.add_argument("--out", required=True)
    x.add_argument("--no-progress", action="store_true", help="no status lines")
    x.set_defaults(fn=_cmd_export)

    pr = sp.add_parser("profile", help="measure latency, switch time, size (and accuracy) per α on this machine")
    pr.add_argument("file", help="a subspace artifact (lcs export RUN --subspace)")
    pr.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    pr.add_argument("--grid", help="comma-separated α values")
    pr.add_argument("--data", help="measure accuracy on this data set too")
    pr.add_argument("--data-root")
    pr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    pr.add_argument("--per-thread", action="store_true",
                    help="also time each batch at 1, 2, 4, ... threads (what lcs adapt's thread governor uses)")
    pr.add_argument("--json", required=True, help="output JSON; plots go next to it")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(fn=_cmd_profile)

    ad = sp.add_parser("adapt", help="serve under a latency budget while a competing process starts")
    ad.add_argument("file", help="a subspace artifact")
    ad.add_argument("--budget-ms", type=float, required=True)
    ad.add_argument("--seconds", type=float, default=20.0, help="length of each of the two runs")
    ad.add_argument("--load-at", type=float, default=8.0, help="when the competitor starts")
    ad.add_argument("--batch", type=int, default=1)
    ad.add_argument("--profile", help="a profile JSON from lcs profile (default: a quick profile first)")
    ad.add_argument("--out", default="runs/adapt", help="output folder for adapt.json and adapt.png")
    ad.set_defaults(fn=_cmd_adapt)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # 1.7x faster CPU training steps here (lcs.alloc)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("lcs: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; LCS_DEBUG=1 shows the traceback
        if os.environ.get("LCS_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not isinstance(e, (LcsError, OSError)):
            msg = f"{type(e).__name__}: {msg} (unexpected; rerun with LCS_DEBUG=1 for the traceback)"
        print(f"lcs: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
