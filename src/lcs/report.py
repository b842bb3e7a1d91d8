"""Tables and plots of sweep records (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "plot_runs"]

_COLUMNS = [("alpha", "α", "{:.3f}"), ("density", "density", "{:.3f}"), ("accuracy", "accuracy", "{:.4f}"),
            ("loss", "loss", "{:.3f}"), ("sparsity", "sparsity", "{:.3f}"),
            ("overall_sparsity", "overall", "{:.3f}"), ("nonzero_params", "nonzero", "{:,}"),
            ("macs", "MACs", "{:,}"), ("bytes", "bytes", "{:,}")]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the columns present in ``records``."""
    cols = [c for c in _COLUMNS if records and c[0] in records[0]]
    rows = [[fmt.format(r[key]) for key, _, fmt in cols] for r in records]
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
    ax.set_xlabel({"sparsity": "sparsity of compressed layers", "bytes": "artifact bytes"}.get(x, x))
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy vs compression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
