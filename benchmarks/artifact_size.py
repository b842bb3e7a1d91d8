"""How close each regime's exported artifact comes to the information limit of what it holds.

For cPreResNet20 at several levels of every regime: the artifact's bytes (header, names and all,
exactly what ``lcs export`` writes) against ``information_limit_bytes`` (nonzero values at their
width, b bits for integer-coded weights, plus n·H(nnz/n) for their positions; nothing for names)
and against the full dense float32 network. Seeded random initialization: the encoders, not the
training, are measured. Writes benchmarks/results/artifact_size.json.

    python benchmarks/artifact_size.py [--norm gn] [--out benchmarks/results/artifact_size.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lcs
from lcs.deploy.artifact import artifact_bytes, dense_float32_bytes, information_limit_bytes, network_meta
from lcs.files import write_json

POINTS = {
    "unstructured": [0.025, 0.1, 0.5, 1.0],
    "quantized": [{"bits": 3}, {"bits": 4}, {"bits": 8}],
    "sparse_quantized": [{"density": 0.025, "bits": 3}, {"density": 0.1, "bits": 4}, {"density": 0.5, "bits": 8}],
    "structured": [0.0, 1.0],
}
GEOMETRY = {"unstructured": "line", "quantized": "point", "sparse_quantized": "point", "structured": "line"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--norm", default="gn", help="gn | bn (structured always uses ln)")
    ap.add_argument("--out", default="benchmarks/results/artifact_size.json")
    args = ap.parse_args()
    rows = []
    for regime, points in POINTS.items():
        norm = "ln" if regime == "structured" else args.norm
        torch.manual_seed(0)
        model = lcs.models.create("cpreresnet20", num_classes=10, norm=norm)
        sub = lcs.convert(model, lcs.regimes.REGISTRY[regime].config(geometry=GEOMETRY[regime]))
        sub.input_shape = (3, 32, 32)
        sub.model.eval()
        arch = {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": norm}}
        dense = dense_float32_bytes(lcs.models.create("cpreresnet20", num_classes=10, norm=norm))
        for point in points:
            levels = sub.move(point)
            plain = lcs.materialize(sub, point)
            size = artifact_bytes(plain, network_meta(arch, regime, None, sub.alpha, levels))
            limit = information_limit_bytes(plain)
            rows.append({"regime": regime, "norm": norm, **levels, "bytes": size, "limit_bytes": round(limit),
                         "ratio": size / limit, "pct_of_dense": 100 * size / dense})
            level_text = ", ".join(f"{k}={v:g}" for k, v in levels.items())
            print(f"{regime:>17} {norm} {level_text:<24} {size:>9,} B  limit {limit:>9,.0f} B  "
                  f"{size / limit:5.3f}x  {100 * size / dense:5.1f} % of dense float32")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"model": "cpreresnet20", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
