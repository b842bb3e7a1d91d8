"""ONNX export of materialized models: onnxruntime must reproduce PyTorch at any batch size."""

import os

import pytest
import torch
from torch import nn

import lcs
from lcs.deploy.onnx import STANDARD_DOMAINS, export_onnx, nonstandard_ops, run_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

# torch's own exporter internals warn about a deprecated pytree API; nothing lcs can act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

# One export per case (~5 s each on a loaded 2-core machine): every α and both norm kinds in the default run,
# BatchNorm with non-trivial running stats; the fourth combination only with `make test-slow`.
CASES = [
    pytest.param(("gn", 0.025), id="gn-a0.025"),
    pytest.param(("bn", 0.3), id="bn-a0.3"),
    pytest.param(("gn", 1.0), id="gn-a1.0"),
    pytest.param(("gn", 0.3), id="gn-a0.3", marks=pytest.mark.slow),
]


def _subspace(norm: str) -> lcs.Subspace:
    torch.manual_seed(0)
    model = lcs.models.create("cpreresnet20", num_classes=10, norm=norm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return lcs.convert(model, lcs.UnstructuredConfig())


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    norm, alpha = request.param
    plain = lcs.materialize(_subspace(norm), alpha)
    out_dir = tmp_path_factory.mktemp(f"onnx-{norm}-{alpha}")
    path = out_dir / "model.onnx"
    size = export_onnx(plain, path, (3, 32, 32))
    return plain, path, size


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch(exported, batch):
    plain, path, _ = exported
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
    got = run_onnx(path, x)
    assert got.shape == (batch, 10)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_single_standard_file(exported):
    _, path, size = exported
    assert sorted(os.listdir(path.parent)) == ["model.onnx"]  # no external-data sidecar, no temp file left
    assert size == path.stat().st_size
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= STANDARD_DOMAINS
    assert nonstandard_ops(model) == []
    assert {n.op_type for n in model.graph.node} >= {"Conv", "Relu"}
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"


def test_parametrized_model_is_refused(tmp_path):
    sub = _subspace("gn")
    with pytest.raises(lcs.LcsError, match=r"lcs\.materialize"):
        export_onnx(sub.model, tmp_path / "m.onnx", (3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_bad_input_shape(tmp_path):
    with pytest.raises(lcs.LcsError, match="input_shape"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "m.onnx", (32, 32))


def test_fixed_batch(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, (3, 8, 8), dynamic_batch=False)
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(path, x), model(x), atol=1e-5, rtol=0)


def test_missing_dependencies_are_one_line_errors(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(lcs.LcsError, match=r"lcs\[onnx\]"):
        run_onnx(path, torch.zeros(1))
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)
    with pytest.raises(lcs.LcsError, match=r"lcs\[onnx\]"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "x.onnx", (3, 8, 8))
    assert not (tmp_path / "x.onnx").exists()


def test_physically_slim_network_exports(tmp_path):
    sub = lcs.convert(lcs.models.create("cpreresnet20", norm="ln"), lcs.StructuredConfig(geometry="line"))
    sub.input_shape = (3, 16, 16)
    plain = lcs.materialize(sub, 0.0)
    export_onnx(plain, tmp_path / "slim.onnx", (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(run_onnx(tmp_path / "slim.onnx", x)), plain(x), atol=1e-4)
    weights = [i for i in onnx.load(str(tmp_path / "slim.onnx")).graph.initializer if i.name.endswith("conv1.weight")]
    assert weights and all(w.dims[0] <= 16 for w in weights)  # width 0.25: 4, 8 or 16 output channels


def test_quantized_network_with_folded_bn_exports(tmp_path):
    """A 4-bit network (BN folded into the quantized convs, activations fake-quantized by their
    observers) runs in onnxruntime as in PyTorch: Round is round-half-to-even in both."""
    from lcs.layers.quant import set_activation_quant

    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", norm="bn"), lcs.QuantizedConfig())
    set_activation_quant(sub.model, True)
    sub.model.train()
    with torch.no_grad():
        for _ in range(3):
            sub.model(torch.randn(8, 3, 16, 16))
    plain = lcs.materialize(sub, sub.config.alpha_of(4))
    export_onnx(plain, tmp_path / "q.onnx", (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(run_onnx(tmp_path / "q.onnx", x)), plain(x), atol=1e-4)


def _quantized_plain(bits: int) -> nn.Module:
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", norm="gn"), lcs.QuantizedConfig())
    return lcs.materialize(sub, sub.config.alpha_of(bits))


def test_quantized_weights_are_stored_as_uint8_codes(tmp_path, monkeypatch):
    """Every quantized conv's weight is a uint8 initializer behind a DequantizeLinear that gives back
    exactly the float weight; the file is much smaller than with float weights."""
    from lcs.layers.quant import layer_quants

    plain = _quantized_plain(4)
    size = export_onnx(plain, tmp_path / "q.onnx", (3, 16, 16))
    model = onnx.load(tmp_path / "q.onnx")
    quantized = {f"{fqn}.weight" for fqn in layer_quants(plain)}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert {n.output[0] for n in dq} == quantized
    inits = {i.name: i for i in model.graph.initializer}
    assert not quantized & set(inits)  # no float copy left behind
    params = dict(plain.named_parameters())
    for node in dq:
        codes, scale, zp = (onnx.numpy_helper.to_array(inits[n]) for n in node.input)
        assert codes.dtype.name == "uint8" and codes.max() <= 15  # 4-bit codes in a byte
        w = (torch.from_numpy(codes.astype("int32")) - int(zp)).float() * float(scale)
        assert torch.equal(w, params[node.output[0]].detach())
    import lcs.deploy.onnx

    monkeypatch.setattr(lcs.deploy.onnx, "weights_as_codes", lambda *_: 0)
    float_size = export_onnx(plain, tmp_path / "f.onnx", (3, 16, 16))
    saved = 3 * sum(params[n].numel() for n in quantized)  # 4 bytes per weight become 1
    assert abs((float_size - size) - saved) < 0.01 * saved
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(tmp_path / "q.onnx", x), plain(x), atol=1e-4, rtol=0)


def test_off_grid_weight_stays_float(tmp_path):
    from lcs.deploy.onnx import weights_as_codes
    from lcs.layers.quant import layer_quants

    plain = _quantized_plain(8)
    fqn = next(iter(layer_quants(plain)))
    with torch.no_grad():
        plain.get_submodule(fqn).weight.add_(1e-3)  # no longer on its grid
    export_onnx(plain, tmp_path / "q.onnx", (3, 16, 16))
    model = onnx.load(tmp_path / "q.onnx")
    assert f"{fqn}.weight" in {i.name for i in model.graph.initializer}
    assert weights_as_codes(model, plain) == 0  # everything else was already converted


def test_sparse_quantized_network_exports(tmp_path):
    """Sparsity × bits at (0.1, 4): zeros and 4-bit codes survive export; onnxruntime computes it."""
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", norm="gn"), lcs.SparseQuantizedConfig(geometry="point"))
    plain = lcs.materialize(sub, {"density": 0.1, "bits": 4})
    export_onnx(plain, tmp_path / "sq.onnx", (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(tmp_path / "sq.onnx", x), plain(x), atol=1e-4, rtol=0)
