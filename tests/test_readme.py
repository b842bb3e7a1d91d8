"""The README's Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "runs/api-example/net.safetensors").is_file()
    assert [r["alpha"] for r in namespace["records"]] == [0.1, 1.0]


@pytest.mark.slow
def test_readme_demo_table_matches_a_fresh_demo_run(tmp_path):
    """The README's demo table is what `make demo` prints (the run is deterministic)."""
    from lcs.cli import main

    out = tmp_path / "demo"
    assert main(["train", "--regime", "unstructured", "--method", "lcs_l", "--model", "cpreresnet20", "--data",
                 "digits", "--out", str(out), "--no-progress"]) == 0
    assert main(["eval", str(out), "--latency-batch", "", "--no-progress"]) == 0
    tool = Path(__file__).parents[1] / "tools" / "readme_demo_table.py"
    done = subprocess.run([sys.executable, str(tool), "--check", str(out / "eval.json")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
