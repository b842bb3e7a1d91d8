"""Tables and plots of sweep records (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["point_label", "format_table", "plot_runs", "plot_heatmap", "plot_bn_gaps", "plot_profile", "plot_adapt"]

_COLUMNS = [("alpha", "α", "{:.3f}"), ("density", "density", "{:.3f}"), ("width", "width", "{:.3f}"),
            ("bits", "bits", "{:d}"), ("keep", "keep", "{:.3f}"), ("accuracy", "accuracy", "{:.4f}"),
            ("loss", "loss", "{:.3f}"), ("sparsity", "sparsity", "{:.3f}"),
            ("overall_sparsity", "overall", "{:.3f}"), ("params", "params", "{:,}"),
            ("nonzero_params", "nonzero", "{:,}"), ("macs", "MACs", "{:,}"), ("bytes", "bytes", "{:,}"),
            ("bytes_pct", "% dense", "{:.1f}"),
            ("int8_accuracy", "int8 acc", "{:.4f}"),
            ("latency_ms_b1", "b1 ms", "{:.2f}"), ("sparse_layers_b1", "b1 sparse", "{:d}"),
            ("int8_layers_b1", "b1 int8", "{:d}"), ("layout_b1", "b1 layout", "{}"),
            ("latency_ms_b64", "b64 ms", "{:.1f}"), ("sparse_layers_b64", "b64 sparse", "{:d}"),
            ("int8_layers_b64", "b64 int8", "{:d}"), ("layout_b64", "b64 layout", "{}"),
            ("bn_mean_gap", "BN μ gap", "{:.3f}"), ("bn_var_gap", "BN σ² gap", "{:.3f}")]


def format_table(records: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] | None = None) -> str:
    """A fixed-width table of the (key, title, format) columns present in any of ``records`` ("—"
    where a record has no value)."""
    cols = [c for c in (columns or _COLUMNS) if any(c[0] in r for r in records)]
    rows = [[fmt.format(r[key]) if key in r else "—" for key, _, fmt in cols] for r in records]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (_, title, _) in enumerate(cols)]
    lines = ["  ".join(title.rjust(w) for (_, title, _), w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def plot_runs(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | os.PathLike,
              x: str = "sparsity", title: str | None = None) -> None:
    """Accuracy vs ``x`` (default: sparsity of the compressed layers), one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, records in runs:
        pts = sorted((r[x], r["accuracy"]) for r in records)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=label)
    ax.set_xlabel({"sparsity": "sparsity of compressed layers", "bytes": "artifact bytes", "bits": "bits",
                   "params": "parameters of the compressed network"}.get(x, x))
    if x in ("params", "bytes", "macs"):
        from matplotlib.ticker import EngFormatter, LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=12))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 100k, 1M: no colliding long tick labels
        ax.xaxis.set_minor_formatter(EngFormatter(sep=""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy vs compression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def epoch_curves(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """From a run's ``metrics.jsonl`` records: the validation accuracy per epoch at the accurate
    (``hi``) and efficient (``lo``) end, and ``hi_bn`` / ``lo_bn`` for a final BatchNorm pass (the
    statistics re-estimated after the last step, ``method.bn_final_batches``), when there was one."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        tag = "" if "train_loss" in r else "_bn" if "bn_final_batches" in r else None
        if tag is None:
            continue
        for end in ("hi", "lo"):
            if f"val_acc_{end}" in r:
                curves.setdefault(end + tag, []).append((int(r["epoch"]), float(r[f"val_acc_{end}"])))
    return curves


def plot_epochs(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | os.PathLike,
                title: str | None = None) -> None:
    """Validation accuracy vs epoch, one colour per run: the accurate end solid, the efficient end
    dashed, a final BatchNorm pass as a star at its epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.6, 4.4), dpi=120)  # wide: the legend sits outside, over no curve
    for i, (label, records) in enumerate(runs):
        color = f"C{i % 10}"
        curves = epoch_curves(records)
        for end, style in (("hi", "-"), ("lo", "--")):
            pts = curves.get(end, [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, color=color,
                        label=f"{label}, {'accurate' if end == 'hi' else 'efficient'} end")
            for ep, acc in curves.get(end + "_bn", [])[-1:]:
                ax.plot([ep], [acc], marker="*", ms=10, color=color, linestyle="none")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or "validation accuracy per epoch (★: BN statistics re-estimated)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmap(records: Sequence[dict[str, Any]], x: str, y: str, path: str | os.PathLike,
                 title: str = "") -> None:
    """Accuracy over a grid of two levels (e.g. density × bits), one cell per record, each cell
    labelled with its accuracy and its artifact's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted({r[x] for r in records})
    ys = sorted({r[y] for r in records})
    acc = [[float("nan")] * len(xs) for _ in ys]
    size = [[None] * len(xs) for _ in ys]
    for r in records:
        i, j = ys.index(r[y]), xs.index(r[x])
        acc[i][j], size[i][j] = r["accuracy"], r.get("bytes")
    fig, ax = plt.subplots(figsize=(1.1 * len(xs) + 2.5, 0.8 * len(ys) + 1.8), dpi=120)
    im = ax.imshow(acc, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if size[i][j] is None:
                continue
            label = f"{acc[i][j]:.3f}\n{size[i][j] / 1e3:.0f} kB"
            ax.text(j, i, label, ha="center", va="center", fontsize=7,
                    color="white" if acc[i][j] < 0.6 else "black")
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    fig.colorbar(im, ax=ax, label="validation accuracy")
    ax.set_title(title or f"accuracy over {x} × {y}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bn_gaps(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | os.PathLike) -> None:
    """Mean |running − true batch statistic| of BatchNorm layers vs width, for mean and variance:
    why the LCS defaults keep no running statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120)
    for label, records in runs:
        recs = [r for r in records if "bn_mean_gap" in r]
        xs = [r.get("width", r.get("keep", 1.0)) for r in recs]
        for ax, key in zip(axes, ("bn_mean_gap", "bn_var_gap"), strict=True):
            ax.plot(xs, [r[key] for r in recs], marker="o", ms=4, label=label)
    for ax, what in zip(axes, ("mean", "variance"), strict=True):
        ax.set_xlabel("width factor")
        ax.set_ylabel(f"mean |running − batch| {what}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("BatchNorm statistics are right at one width only")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_profile(records: Sequence[dict[str, Any]], batches: Sequence[int], path_latency: str | os.PathLike,
                 path_accuracy: str | os.PathLike | None = None, title: str = "") -> None:
    """Latency (median, p90 as error bar) vs α per batch size (vs the artifact's bytes for points
    given as levels, which have no α); accuracy vs latency when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_alpha = all("alpha" in r for r in records)
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), dpi=120, squeeze=False)
    alphas = [r["alpha"] if by_alpha else r["bytes"] for r in records]
    for ax, b in zip(axes[0], batches, strict=True):
        med = [r[f"latency_ms_b{b}"] for r in records]
        p90 = [r[f"p90_ms_b{b}"] for r in records]
        ax.errorbar(alphas, med, yerr=[[0] * len(med), [p - m for p, m in zip(p90, med, strict=True)]],
                    marker="o", ms=4, capsize=3)
        ax.set_xlabel("α" if by_alpha else "artifact bytes")
        ax.set_ylabel(f"latency at batch {b} (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    heading = title or "latency vs α (median, p90)"
    fig.suptitle(heading if by_alpha else heading.replace("vs α", "vs bytes"))
    fig.tight_layout()
    fig.savefig(path_latency)
    plt.close(fig)
    if path_accuracy is not None and records and "accuracy" in records[0]:
        # one panel per batch size (their latencies differ by orders of magnitude), points joined in
        # latency order so the line reads as the accuracy a latency buys
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), dpi=120, squeeze=False)
        for ax, b in zip(axes[0], batches, strict=True):
            pts = sorted((r[f"latency_ms_b{b}"], r["accuracy"], point_label(r)) for r in records)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4)
            for lat, acc, label in pts:
                ax.annotate(label, (lat, acc), textcoords="offset points", xytext=(3, 3), fontsize=6)
            ax.set_xlabel(f"latency at batch {b} (ms)")
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
        fig.suptitle("accuracy vs latency (labels: α, or the levels)")
        fig.tight_layout()
        fig.savefig(path_accuracy)
        plt.close(fig)


def point_label(r: dict[str, Any]) -> str:
    """A record's point as text: its α, or (points given as levels, which have none) its levels."""
    if "alpha" in r:
        return f"{r['alpha']:g}"
    return "/".join(f"{r[k]:g}" for k in ("density", "width", "bits") if k in r)


def plot_adapt(result: dict[str, Any], path: str | os.PathLike) -> None:
    """α and latency over time, controller vs fixed α, with the budget and the load start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_l) = plt.subplots(2, 1, figsize=(7.5, 5.2), dpi=120, sharex=True)
    for name, trace in result["traces"].items():
        t = [r["t"] for r in trace]
        ax_a.step(t, [r["alpha"] for r in trace], where="post", label=name)
        ax_l.plot(t, [r["latency_ms"] for r in trace], lw=0.8, label=name)
    for ax in (ax_a, ax_l):
        ax.axvline(result["load_at"], color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
    ax_l.axhline(result["budget_ms"], color="red", ls="--", lw=1.2, label=f"budget {result['budget_ms']:g} ms")
    ax_l.set_yscale("log")  # a loaded request can be 10× the budget: a linear axis hides the budget line
    ax_a.set_ylabel("α")
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_xlabel("seconds (competing process starts at the dotted line)")
    ax_a.legend(loc="lower left")
    ax_l.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
