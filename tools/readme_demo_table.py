"""Keep the README's `make demo` table true: render it from runs/demo/eval.json and compare or rewrite.

The demo is deterministic (seeded data split, α draws and augmentation; one CPU build of torch), so
the table holds only machine-independent columns (accuracy, loss, sizes) and must match exactly.

    python tools/readme_demo_table.py --check [runs/demo/eval.json]   # exit 1 if the README is stale
    python tools/readme_demo_table.py --write [runs/demo/eval.json]   # rewrite the README's table
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ALPHAS = (0.025, 0.1, 0.5, 1.0)
COLUMNS = [("alpha", "α", "{:.3f}"), ("density", "density", "{:.3f}"), ("accuracy", "accuracy", "{:.4f}"),
           ("loss", "loss", "{:.3f}"), ("sparsity", "sparsity", "{:.3f}"), ("overall_sparsity", "overall", "{:.3f}"),
           ("nonzero_params", "nonzero", "{:,}"), ("macs", "MACs", "{:,}"), ("bytes", "bytes", "{:,}")]
BEGIN, END = "<!-- demo-table: begin (tools/readme_demo_table.py) -->", "<!-- demo-table: end -->"


def render(eval_json: Path) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from lcs.eval.report import format_table

    records = json.loads(eval_json.read_text())["records"]
    rows = [r for r in records if any(abs(r["alpha"] - a) < 1e-9 for a in ALPHAS)]
    return f"{BEGIN}\n```\n{format_table(rows, COLUMNS)}\n```\n{END}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    p.add_argument("eval_json", nargs="?", default=str(ROOT / "runs/demo/eval.json"))
    args = p.parse_args()
    table = render(Path(args.eval_json))
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        print(f"README.md has no demo table markers ({BEGIN})", file=sys.stderr)
        return 1
    current = pattern.search(text).group(0)
    if args.write:
        README.write_text(pattern.sub(lambda m: table, text))
        print("README.md: demo table rewritten")
        return 0
    if current != table:
        print("README.md's demo table is stale: run `make readme-table` (tools/readme_demo_table.py --write)",
              file=sys.stderr)
        return 1
    print("README.md's demo table matches this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
