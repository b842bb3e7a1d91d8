"""One equality matrix: every registered model × regime × geometry × norm, with non-zero biases and
random norm statistics. At each α the subspace, ``materialize``, the compressed artifact
(``save_compressed``/``load_compressed``), ``Runtime.set_alpha`` on the subspace artifact and (for
one α per case, slow) ONNX under onnxruntime must compute the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lcs
from lcs.deploy.artifact import load_compressed, save_compressed
from lcs.deploy.runtime import Runtime, save_subspace

SMALL = ("cpreresnet20",)  # the others (11-20 M parameters) run with `make test-slow`
# The norms each regime accepts (structured needs per-channel norms) and its regime configs.
CASES = {
    "unstructured": [("gn", {}), ("bn", {"bn_stats_bins": 4})],
    "structured": [("ln", {}), ("bn", {}), ("bn", {"bn_stats_bins": 3})],
    "quantized": [("gn", {}), ("bn", {})],
    "sparse_quantized": [("gn", {}), ("bn", {})],
}
CONFIGS = {"unstructured": lcs.UnstructuredConfig, "structured": lcs.StructuredConfig,
           "quantized": lcs.QuantizedConfig, "sparse_quantized": lcs.SparseQuantizedConfig}
FRACTIONS = (0.0, 0.45, 1.0)  # of the subspace's α range


def _randomize(model: nn.Module) -> None:
    """Non-zero biases (wherever the architecture has them), random norm affine parameters and
    running statistics."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.data.uniform_(-0.3, 0.3, generator=g)
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


def _randomize_level_stats(model: nn.Module) -> None:
    """Per-level BN statistics: make every row differ, so that picking the wrong row shows."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if hasattr(m, "lcs_running_mean"):
            m.lcs_running_mean.uniform_(-0.3, 0.3, generator=g)
            m.lcs_running_var.uniform_(0.5, 2.0, generator=g)


def _build(name: str, regime: str, geometry: str, norm: str, extra: dict) -> lcs.Subspace:
    torch.manual_seed(0)
    model = lcs.models.create(name, num_classes=10, norm=norm)
    _randomize(model)
    sub = lcs.convert(model, CONFIGS[regime](geometry=geometry, **extra))
    _randomize_level_stats(sub.model)
    sub.input_shape = (3, 32, 32)
    return sub.model.eval() and sub


def _matrix(name: str) -> list:
    return [pytest.param(name, regime, geometry, norm, extra,
                         id=f"{name}-{regime}-{geometry}-{norm}" + "".join(f"-{k}{v}" for k, v in extra.items()))
            for regime, norms in CASES.items() for geometry in ("line", "point") for norm, extra in norms]


PARAMS = [p for name in lcs.models.list_models() for p in _matrix(name)]
PARAMS = [p if p.values[0] in SMALL else pytest.param(*p.values, id=p.id, marks=pytest.mark.slow) for p in PARAMS]


@pytest.mark.parametrize("name,regime,geometry,norm,extra", PARAMS)
def test_every_path_computes_the_same_function(name, regime, geometry, norm, extra, tmp_path):
    sub = _build(name, regime, geometry, norm, extra)
    arch = {"name": name, "kwargs": {"num_classes": 10, "norm": norm}}
    sub_file = tmp_path / "sub.safetensors"
    save_subspace(sub, sub_file, arch)
    rt = Runtime.load(sub_file)
    x = torch.randn(2, 3, 32, 32)
    outs = []
    lo, hi = sub.alpha_range
    points = [lo + f * (hi - lo) for f in FRACTIONS]
    if geometry == "point" and len(sub.config.level_names) > 1:  # any combination of the levels
        points += [{"density": 0.1, "bits": 4}, {"density": 0.5, "bits": 3}]
    for a in points:
        with sub.at(a), torch.no_grad():
            ref = sub.model(x)
        plain = lcs.materialize(sub, a)
        with torch.no_grad():
            got = {"materialize": plain(x)}
        f = tmp_path / f"a{a}.safetensors"
        save_compressed(plain, f, {"arch": arch})  # no regime hint: the file's shapes say it is slim
        with torch.no_grad():
            got["load_compressed"] = load_compressed(f)(x)
            got["load_compressed(model=)"] = load_compressed(f, model=lcs.models.create(name, **arch["kwargs"]))(x)
        rt.move(a)
        got["Runtime"] = rt(x)
        tol = 1e-4 * max(1.0, float(ref.abs().max()))
        for path, y in got.items():
            assert torch.allclose(y, ref, atol=tol, rtol=1e-4), f"{path} at α={a}: {(y - ref).abs().max():.3g}"
        outs.append(ref)
    assert not torch.allclose(outs[0], outs[-1], atol=1e-4)  # α really changes the network


def test_quantized_bn_with_conv_bias_trains_what_it_exports():
    """Issue 13 defect 1: at 16 bits a quantized subspace with BN folded into biased convs must compute
    the float model (it differed by 0.128 while the export differed by 3e-4)."""
    for geometry in ("point", "line"):
        torch.manual_seed(0)
        model = lcs.models.create("vgg19_cifar", norm="bn")
        _randomize(model)
        ref = __import__("copy").deepcopy(model).eval()
        sub = lcs.convert(model, lcs.QuantizedConfig(geometry=geometry, b_min=16, b_max=16, line_init="copy"))
        sub.model.eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            want, got, shipped = ref(x), sub.model(x), lcs.materialize(sub, 1.0)(x)
        assert torch.allclose(got, want, atol=1e-4), (geometry, (got - want).abs().max())
        assert torch.allclose(shipped, got, atol=1e-4), (geometry, (shipped - got).abs().max())


@pytest.mark.parametrize("name", sorted(__import__("lcs.regimes", fromlist=["REGISTRY"]).REGISTRY))
def test_every_registered_regime_is_complete(name):
    """A half-added regime fails here, not in a user's hands: its record holds everything the CLI,
    the loop, the evaluation and this matrix ask of a regime, and every piece works."""
    from lcs.eval.evaluate import default_grid
    from lcs.regimes import REGISTRY, Regime, record_of, regime_from_dict, regime_to_dict
    from lcs.train.config import load_config
    from lcs.train.methods import build_method

    rec = REGISTRY[name]
    assert isinstance(rec, Regime) and rec.name == name and rec.config.regime == name
    assert rec.config.level_names and rec.methods, "levels and methods"
    assert name in CASES, "not in the equality matrix"
    for geometry in ("line", "point"):
        config = rec.config(geometry=geometry)
        assert record_of(config) is rec
        assert regime_from_dict(regime_to_dict(config)) == config
        assert set(config.levels_max) == set(config.level_names)
        lo, hi = config.alpha_range
        for a in (lo, (lo + hi) / 2, hi):  # α ↔ the primary level, both ways
            levels = config.levels(a)
            assert set(levels) == set(config.level_names)
            assert config.levels(config.alpha_of(levels[config.level_name]))[config.level_name] == levels[
                config.level_name]
            assert config.check_levels(levels) == levels
        grid = default_grid(config)
        assert grid
        for point in grid:
            if isinstance(point, dict):
                assert geometry == "point" and config.check_levels(point)
            else:
                assert lo - 1e-9 <= point <= hi + 1e-9
    for method, spec in rec.methods.items():
        extra = [f"method.target={4 if 'bits' in rec.config.level_names else 0.5}"] if spec.sampler == "target" else []
        cfg = load_config(None, [f"method.regime={name}", f"method.name={method}", *extra])
        assert cfg.model.norm is not None and (rec.norms is None or cfg.model.norm in rec.norms)
        built = build_method(cfg.method, name, method, cfg.regime_config(), total_steps=10)
        points = built.sampler(0, torch.Generator().manual_seed(0))
        assert points and built.geometry == cfg.regime_config().geometry
        assert (built.phase_start is not None) == spec.phase and (not spec.phase or rec.phase is not None)


@pytest.mark.slow
@pytest.mark.parametrize("name,regime,geometry,norm,extra", _matrix("cpreresnet20"))
def test_onnx_computes_the_subspace_function(name, regime, geometry, norm, extra, tmp_path):
    """The last column of the matrix: onnxruntime on the exported file, at the middle of the range
    (30-40 s of export each, hence slow; tests/test_onnx.py covers every regime in the fast suite)."""
    pytest.importorskip("onnxruntime")
    from lcs.deploy.onnx import export_onnx, run_onnx

    sub = _build(name, regime, geometry, norm, extra)
    lo, hi = sub.alpha_range
    a = lo + 0.45 * (hi - lo)
    with sub.at(a), torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        ref = sub.model(x)
    export_onnx(lcs.materialize(sub, a), tmp_path / "n.onnx", (3, 32, 32))
    got = torch.as_tensor(run_onnx(tmp_path / "n.onnx", x))
    assert torch.allclose(got, ref, atol=1e-3 * max(1.0, float(ref.abs().max())))
