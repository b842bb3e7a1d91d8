"""The ``lcs`` command: train → eval → export, plus plot. Errors are one line, never a traceback
(set LCS_DEBUG=1 to see it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import LcsError

__all__ = ["main"]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LcsError(f"--grid expects comma-separated numbers, got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import apply_overrides, config_from_dict, load_config
    from .train import Trainer

    overrides = list(args.set or [])
    for key, value in (("method.regime", args.regime), ("method.name", args.method), ("model.name", args.model),
                       ("data.name", args.data), ("data.root", args.data_root), ("optim.epochs", args.epochs),
                       ("run.seed", args.seed), ("data.val_fraction", args.val_fraction)):
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
        if (out / "checkpoints").exists():
            raise LcsError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
        cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, out, resume=args.resume)
    records = trainer.fit()
    if records:
        last = records[-1]
        print(f"trained {cfg.method.regime}/{cfg.method.name} for {last['epoch']} epochs: "
              f"val acc {last['val_acc_hi']:.4f} at the accurate end, {last['val_acc_lo']:.4f} at the "
              f"efficient end; run in {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import DEFAULT_GRIDS, sweep
    from .report import format_table, plot_runs
    from .run import arch_meta, load_run, open_data, resolve_device

    cfg, sub, _ = load_run(args.run)
    data = open_data(cfg, root=args.data_root, name=args.data)
    if data.num_classes != cfg.model.num_classes:
        raise LcsError(f"the evaluation data has {data.num_classes} classes, the run {cfg.model.num_classes}")
    grid = _floats(args.grid) if args.grid else DEFAULT_GRIDS[cfg.method.regime]
    if cfg.method.name == "target" and not args.grid:
        grid = [cfg.method.target]
    device = resolve_device(cfg.run.device)
    sub.model.to(device)
    meta = {"arch": arch_meta(cfg), "regime": cfg.method.regime, "method": cfg.method.name}
    records = sweep(sub, grid, data, device, meta)
    print(format_table(records))
    run = Path(args.run)
    json_path = Path(args.json) if args.json else run / "eval.json"
    payload = {"run": str(run), "regime": cfg.method.regime, "method": cfg.method.name, "records": records}
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, json_path)
    plot_path = json_path.with_suffix(".png")
    plot_runs([(f"{cfg.method.name} ({cfg.method.regime})", records)], plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .report import plot_runs

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
    plot_runs(runs, args.out, x=args.x)
    print(f"wrote {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .artifact import save_compressed
    from .materialize import materialize
    from .run import arch_meta, load_run

    cfg, sub, _ = load_run(args.run)
    level = sub.set_alpha(args.alpha)
    plain = materialize(sub, args.alpha)
    meta = {"arch": arch_meta(cfg), "regime": cfg.method.regime, "method": cfg.method.name,
            "alpha": args.alpha, sub.config.level_name: level}
    size = save_compressed(plain, args.out, meta)
    dense = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    print(f"wrote {args.out}: {size:,} bytes ({size / dense:.1%} of the dense float32 weights), "
          f"α={args.alpha:g}, {sub.config.level_name}={level:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcs", description="Learning Compressible Subspaces: train once, "
                                "choose the compression level at inference time.")
    sp = p.add_subparsers(dest="command", required=True)

    t = sp.add_parser("train", help="train a compressible subspace")
    t.add_argument("--regime", help="unstructured")
    t.add_argument("--method", help="lcs_l | lcs_p | target")
    t.add_argument("--model", help="a registered model name (default cpreresnet20)")
    t.add_argument("--data", help="digits | cifar10 | folder")
    t.add_argument("--data-root", help="dataset folder for cifar10/folder")
    t.add_argument("--val-fraction", type=float, help="validation split carved from the training data")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--config", help="YAML file with sections data/model/method/optim/run")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=0.1")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)

    e = sp.add_parser("eval", help="sweep a trained subspace over α")
    e.add_argument("run")
    e.add_argument("--grid", help="comma-separated α values (default: the regime's grid)")
    e.add_argument("--data", help="evaluate on other data (default: the run's)")
    e.add_argument("--data-root")
    e.add_argument("--json", help="output JSON (default RUN/eval.json; the plot goes next to it)")
    e.set_defaults(fn=_cmd_eval)

    pl = sp.add_parser("plot", help="overlay the eval curves of several runs")
    pl.add_argument("runs", nargs="+", help="run directories or eval JSON files")
    pl.add_argument("--out", required=True)
    pl.add_argument("--x", default="sparsity", choices=["sparsity", "overall_sparsity", "bytes", "macs"])
    pl.set_defaults(fn=_cmd_plot)

    x = sp.add_parser("export", help="write the compressed network at α as a standalone artifact")
    x.add_argument("run")
    x.add_argument("--alpha", type=float, required=True)
    x.add_argument("--out", required=True)
    x.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("lcs: interrupted", file=sys.stderr)
        return 130
    except (LcsError, OSError, RuntimeError, ValueError, KeyError) as e:
        if os.environ.get("LCS_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lcs: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
