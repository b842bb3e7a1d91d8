"""The README says what the code does: its Python example runs, its demo table is a fresh run's,
its config table has every key."""

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


def test_every_config_key_has_a_row_in_the_readme_table():
    """A key a user can set but cannot look up is a key nobody finds; a row for a key that no longer
    exists is a typo that `--set` would reject. Both directions, against the dataclasses."""
    import dataclasses

    from lcs.train.config import Config

    text = (Path(__file__).parents[1] / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `") and line.count("|") >= 4]
    documented = {key for row in rows for key in re.findall(r"`([a-z]+\.[a-z_0-9]+)`", row.split("|")[1])}
    sections = {f.name: f.default_factory() for f in dataclasses.fields(Config)}
    keys = {f"{name}.{f.name}" for name, section in sections.items() for f in dataclasses.fields(section)}
    assert not keys - documented, f"config keys missing from the README table: {sorted(keys - documented)}"
    table_keys = {k for k in documented if k.split(".")[0] in sections}
    assert not table_keys - keys, f"README rows for keys the config lacks: {sorted(table_keys - keys)}"
