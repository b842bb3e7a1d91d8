"""The regime plug-in design (issue 16): the sparsity × bits regime end to end, the record-driven
subspace file, and the package's import graph."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import lcs
from lcs.cli import main
from lcs.deploy.artifact import describe_artifact, information_limit_bytes, network_meta
from lcs.deploy.runtime import Runtime, save_subspace
from lcs.regimes import SparseQuantizedConfig

ARCH = {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "gn"}}
SRC = Path(lcs.__file__).parent


def _point_sub() -> lcs.Subspace:
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), SparseQuantizedConfig(geometry="point"))
    return sub.model.eval() and sub


def test_levels_are_named_and_validated():
    sub = _point_sub()
    assert sub.set_levels(density=0.1, bits=4) == {"density": 0.1, "bits": 4}
    w = sub.model.get_submodule(sub.compressed[0]).weight
    nonzero = int((w != 0).sum())
    assert nonzero <= round(0.1 * w.numel())  # TopK first: quantization only adds zeros
    assert len(torch.unique(w)) <= 2**4  # then 4-bit codes: zero stays exact
    assert sub.set_levels(bits=8) == {"density": 0.1, "bits": 8}  # the other level keeps its value
    with pytest.raises(lcs.LcsError, match="whole number"):
        sub.set_levels(bits=4.5)
    with pytest.raises(lcs.LcsError, match="density"):
        sub.set_levels(density=0.001)
    with pytest.raises(lcs.LcsError, match="unknown level"):
        sub.set_levels(width=0.5)
    line = lcs.convert(lcs.models.create("cpreresnet20"), SparseQuantizedConfig())
    with pytest.raises(lcs.LcsError, match="point subspace"):
        line.set_levels(density=0.1)
    assert line.config.levels(0.0) == {"density": 0.025, "bits": 3}
    assert line.config.levels(1.0) == {"density": 1.0, "bits": 8}  # both rise with α


def test_export_at_levels_is_near_the_information_limit_and_serves(tmp_path):
    sub = _point_sub()
    x = torch.randn(2, 3, 32, 32)
    point = {"density": 0.1, "bits": 4}
    with sub.at(point), torch.no_grad():
        want = sub.model(x)
    plain = lcs.materialize(sub, point)
    path = tmp_path / "net.safetensors"
    size = lcs.save_compressed(plain, path, network_meta(ARCH, "sparse_quantized", "lcs_p", sub.alpha, point))
    assert size <= 1.10 * information_limit_bytes(plain)
    info = describe_artifact(path)
    assert {info["tensors"][f"{fqn}.weight"]["encoding"] for fqn in sub.compressed} == {"sparse_int"}
    with torch.no_grad():
        assert torch.allclose(lcs.load_compressed(path)(x), want, atol=1e-5)
    sub_file = tmp_path / "sub.safetensors"
    save_subspace(sub, sub_file, ARCH)
    rt = Runtime.load(sub_file)
    assert rt.set_levels(**point) == point
    assert torch.allclose(rt(x), want, atol=1e-5)


def test_subspace_files_load_without_drawing_an_initialization(tmp_path):
    """The stored tensors are assigned to a model built on the meta device: the global RNG is
    untouched, and a file from a newer lcs is refused by its version."""
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10, norm="bn"),
                      lcs.QuantizedConfig(geometry="line"))
    path = tmp_path / "sub.safetensors"
    save_subspace(sub, path, {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "bn"}})
    state = torch.random.get_rng_state()
    loaded, header = lcs.load_subspace(path)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert header["version"] == 2 and header["decisions"]["bn_folds"] == sub.decisions["bn_folds"]
    assert loaded.decisions == sub.decisions  # reused, not re-derived by tracing
    from lcs.files import load_tensors, save_tensors

    tensors, meta = load_tensors(path)
    save_tensors(tensors, path, {"lcs": json.dumps({**header, "version": 99})})
    with pytest.raises(lcs.LcsError, match="version 99"):
        lcs.load_subspace(path)


def test_sparse_quantized_trains_evaluates_and_exports_from_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--regime", "sparse_quantized", "--method", "lcs_p", "--data", "digits", "--epochs", "1",
                 "--out", str(run), "--no-progress", "--set", "data.batch_size=128"]) == 0
    grid = "density=0.1,bits=4;density=1,bits=4;density=0.1,bits=8;density=1,bits=8"
    assert main(["eval", str(run), "--grid", grid, "--latency-batch", "", "--no-progress"]) == 0
    records = json.loads((run / "eval.json").read_text())["records"]
    assert [(r["density"], r["bits"]) for r in records] == [(0.1, 4), (1.0, 4), (0.1, 8), (1.0, 8)]
    assert records[0]["bytes"] < records[1]["bytes"] and records[0]["bytes"] < records[2]["bytes"]
    assert (run / "eval_heatmap.png").stat().st_size > 0
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--levels", "density=0.1,bits=4", "--out", str(out)]) == 0
    assert "density=0.1, bits=4" in capsys.readouterr().out
    assert main(["export", str(run), "--levels", "density=0.1,bits=4.5", "--out", str(out)]) == 2


def _module_imports(path: Path) -> set[str]:
    """The lcs modules a module imports at import time (top-level statements only)."""
    package = list(path.relative_to(SRC.parent).parts[:-1])  # the package a module (or __init__) is in
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            target = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.update([target] + [f"{target}.{a.name}" for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lcs"):
            found.add(node.module)
    return found


def test_the_package_has_no_import_circles():
    modules = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {name: {t for t in _module_imports(path) if t in modules and t != name} for name, path in modules.items()}
    # a package's __init__ re-exporting its own modules is not a circle through the package
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
    assert {"lcs.deploy.bake", "lcs.deploy.subspace_file"} <= graph["lcs.deploy.runtime"]  # the graph is real
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_a_method_brings_its_own_warmup_default():
    from lcs.train.config import load_config

    assert load_config(None, ["method.regime=sparse_quantized", "method.name=lcs_p"]).method.warmup == 0.5
    assert load_config(None, ["method.regime=unstructured", "method.name=lcs_p"]).method.warmup == 0.8
    assert load_config(None, ["method.regime=sparse_quantized", "method.name=lcs_p",
                              "method.warmup=0.2"]).method.warmup == 0.2


def test_profile_takes_level_cells(tmp_path):
    """`lcs profile` on a point subspace of two levels, with a grid of level cells."""
    sub = _point_sub()
    path = tmp_path / "sub.safetensors"
    save_subspace(sub, path, ARCH, {"input_shape": [3, 16, 16]})
    out = tmp_path / "prof" / "p.json"  # a folder that does not exist yet
    assert main(["profile", str(path), "--batch", "1", "--grid", "density=0.1,bits=4;density=1,bits=8",
                 "--json", str(out), "--no-progress"]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["density"], r["bits"]) for r in records] == [(0.1, 4), (1.0, 8)]
    assert records[0]["bytes"] < records[1]["bytes"] and "alpha" not in records[0]
    assert (tmp_path / "prof" / "p_latency.png").stat().st_size > 0


def test_busy_machine_warning_names_level_cells(capsys):
    """Records of level cells have no α: the busy-machine warning names their levels instead."""
    from lcs.cli import _warn_if_busy

    _warn_if_busy([{"density": 0.1, "bits": 4, "latency_ms_b1": 1.0, "p90_ms_b1": 5.0},
                   {"alpha": 0.5, "latency_ms_b1": 1.0, "p90_ms_b1": 5.0}], (1,))
    err = capsys.readouterr().err
    assert "b1 at 0.1/4" in err and "b1 at α=0.5" in err
