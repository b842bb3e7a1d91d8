"""Quantization: fake quantization, observers, packed export, Runtime, methods and the CLI."""

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

import lcs
import lcs.codec
import lcs.deploy.artifact
from lcs.cli import main
from lcs.codec import pack_ints, unpack_ints
from lcs.deploy.artifact import artifact_bytes, describe_artifact
from lcs.deploy.runtime import Runtime, save_subspace
from lcs.errors import LcsError
from lcs.layers.quant import (
    LayerQuant,
    affine_qparams,
    attach_layer_quant,
    fake_quantize,
    layer_quants,
    set_activation_quant,
)
from lcs.regimes import QuantizedConfig, regime_from_dict, regime_to_dict
from lcs.train.config import load_config
from lcs.train.loop import Trainer
from lcs.train.methods import ChoiceSampler
from lcs.train.run import load_run

ARCH = {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "gn"}}
META = {"arch": ARCH, "regime": "quantized"}


# -- the regime --------------------------------------------------------------------------------------
def test_bins_map_alpha_to_bits():
    q = QuantizedConfig()
    assert [q.level(k / 6) for k in range(7)] == [3, 3, 4, 5, 6, 7, 8]  # upper edges k/6 → 3..8
    assert q.level(0.01) == 3 and q.level(0.17) == 4 and q.level(0.99) == 8
    assert [q.level(q.alpha_of(b)) for b in range(3, 9)] == list(range(3, 9))
    assert q.level_max == 8 and q.alpha_range == (0.0, 1.0)
    assert QuantizedConfig(b_min=4, b_max=4).level(0.3) == 4
    assert regime_from_dict(regime_to_dict(QuantizedConfig(b_min=2, b_max=16))) == QuantizedConfig(b_min=2, b_max=16)


def test_a_quantized_line_serves_each_bin_from_its_trained_edge():
    line = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), QuantizedConfig(geometry="line"))
    assert line.set_alpha(0.0) == 3 and line.alpha == pytest.approx(1 / 6)  # α = 0 is in the 3-bit bin
    assert line.set_alpha(0.2) == 4 and line.alpha == pytest.approx(2 / 6)
    assert line.set_alpha(1.0) == 8 and line.alpha == 1.0
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), line.at(0.01):
        low = line.model(x)
    with torch.no_grad(), line.at(1 / 6):
        assert torch.equal(line.model(x), low)  # one network per bit width
    point = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), QuantizedConfig(geometry="point"))
    assert point.set_alpha(0.2) == 4 and point.alpha == 0.2


@pytest.mark.parametrize("kwargs, match", [({"b_min": 1}, "b_min.*2, 16"), ({"b_max": 17}, "b_max.*2, 16"),
                                           ({"b_min": 6, "b_max": 5}, "empty"), ({"b_min": 3.5}, "whole number")])
def test_bad_bit_ranges_are_clear_errors(kwargs, match):
    with pytest.raises(LcsError, match=match):
        QuantizedConfig(**kwargs)


def test_config_keys_and_errors():
    cfg = load_config(None, ["method.regime=quantized", "method.b_min=2", "method.b_max=4"])
    assert cfg.model.norm == "gn" and cfg.regime_config() == QuantizedConfig(b_min=2, b_max=4)
    with pytest.raises(LcsError, match="b_max"):
        load_config(None, ["method.regime=quantized", "method.b_max=20"])
    with pytest.raises(LcsError, match="empty"):
        load_config(None, ["method.regime=quantized", "method.b_min=8", "method.b_max=4"])
    with pytest.raises(LcsError, match="target bit width|target level"):
        load_config(None, ["method.regime=quantized", "method.name=target"])
    with pytest.raises(LcsError, match="outside"):
        load_config(None, ["method.regime=quantized", "method.name=target", "method.target=9"])
    with pytest.raises(LcsError, match="method.target=4.5 .*whole number of bits"):
        load_config(None, ["method.regime=quantized", "method.name=target", "method.target=4.5"])
    with pytest.raises(LcsError, match="method.d_min"):  # regime fields are named as config keys
        load_config(None, ["method.d_min=0"])


# -- fake quantization -------------------------------------------------------------------------------
def _codes(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    return w / scale + zp


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_weights_are_on_the_grid(bits):
    torch.manual_seed(bits)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), QuantizedConfig(b_min=2, b_max=8))
    with torch.no_grad():  # a weight with exact zeros, and one with only positive values
        sub.model.blocks[0].conv1.parametrizations.weight.original0[:, :4] = 0
        sub.model.blocks[0].conv1.parametrizations.weight.original1[:, :4] = 0
        for name in ("original0", "original1"):
            p = getattr(sub.model.blocks[1].conv2.parametrizations.weight, name)
            p.copy_(p.abs() + 0.01)
    sub.set_alpha(sub.config.alpha_of(bits))
    for fqn, w in sub.compressed_weights():
        w = w.detach()
        pre = sub.model.get_submodule(fqn).parametrizations.weight[0](
            *[getattr(sub.model.get_submodule(fqn).parametrizations.weight, n) for n in ("original0", "original1")])
        scale, zp = affine_qparams(pre.min(), pre.max(), bits)
        codes = _codes(w, scale, zp)
        assert len(torch.unique(w)) <= 2**bits
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # every value is an integer code
        assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
        assert ((pre - w).abs() <= scale / 2 + 1e-6).all()  # rounding error at most half a step
    zeroed = sub.model.blocks[0].conv1.weight.detach()[:, :4]
    assert torch.equal(zeroed, torch.zeros_like(zeroed))  # zero is exactly representable
    positive = sub.model.blocks[1].conv2.weight.detach()
    assert positive.min() >= 0  # the range [0, max] includes 0 and stays non-negative


def test_straight_through_gradient():
    x = torch.linspace(-2.0, 3.0, 501, requires_grad=True)
    scale, zp = affine_qparams(torch.tensor(-1.0), torch.tensor(1.0), 4)
    y = fake_quantize(x, scale, zp, 4)
    y.backward(torch.ones_like(y))
    lo, hi = (0 - zp) * scale, (15 - zp) * scale  # the representable range
    inside = (x.detach() > lo + scale) & (x.detach() < hi - scale)
    outside = (x.detach() < lo - scale) | (x.detach() > hi + scale)
    assert inside.sum() > 100 and outside.sum() > 100
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))
    # the weights' own range always holds them: the weight gradient is the identity
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    fq = lcs.layers.quant.FakeQuant(lcs.layers.parametrizations.SubspaceState(levels={"bits": 3}))
    g = torch.randn_like(w)
    fq(w).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bits", [2, 5, 8, 16])
def test_fake_quantize_equals_torch_kernel(bits):
    x = (3 * torch.randn(4, 8, 5, 5)).requires_grad_()
    scale, zp = affine_qparams(torch.tensor(-2.0), torch.tensor(1.5), bits)
    g = torch.randn_like(x)
    ours = fake_quantize(x, scale, zp, bits)
    (gx,) = torch.autograd.grad(ours, x, g)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2**bits - 1)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(ours, ref) and torch.equal(gx, gr)
    assert 0 < int((gx == 0).sum()) < x.numel()  # some values were clamped


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("kind", ["normal", "tiny", "positive", "negative", "zero", "huge"])
def test_the_bakes_scalar_fake_quantization_equals_the_training_path_bit_for_bit(bits, kind):
    from lcs.layers.quant import fake_quantize_values, scalar_qparams, weight_qparams

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=g)
    w = {"normal": w, "tiny": w * 1e-7, "positive": w.abs() + 0.3, "negative": -w.abs() - 0.01,
         "zero": torch.zeros_like(w), "huge": w * 1e6}[kind]
    scale, zp = weight_qparams(w, bits)
    lo, hi = torch.aminmax(w)
    s, z = scalar_qparams(float(lo), float(hi), bits)
    assert torch.equal(torch.tensor(s, dtype=torch.float32), scale) and z == int(zp)
    assert torch.equal(fake_quantize_values(w, s, z, bits), fake_quantize(w, scale, zp, bits))


def test_observer_updates_in_training_and_freezes_in_eval():
    conv = torch.nn.Conv2d(2, 2, 1)
    lq = attach_layer_quant(conv, bits=4)
    x1, x2 = torch.randn(2, 2, 4, 4), 3 * torch.randn(2, 2, 4, 4)
    conv.train()
    conv(x1)  # inactive: nothing observed, input untouched
    assert not bool(lq.act_observed) and float(lq.act_hi) == 0.0
    lq.set_active(True)
    conv(x1)
    assert float(lq.act_lo) == float(x1.min()) and float(lq.act_hi) == float(x1.max())  # the first batch sets it
    conv(x2)
    assert float(lq.act_lo) == pytest.approx(0.9 * float(x1.min()) + 0.1 * float(x2.min()), rel=1e-6)
    assert float(lq.act_hi) == pytest.approx(0.9 * float(x1.max()) + 0.1 * float(x2.max()), rel=1e-6)
    frozen = (lq.act_lo.clone(), lq.act_hi.clone())
    conv.eval()
    inputs = []
    conv.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))  # runs after the quantizer's hook
    conv(10 * x2)
    assert torch.equal(lq.act_lo, frozen[0]) and torch.equal(lq.act_hi, frozen[1])
    seen = inputs[0]
    step = float(affine_qparams(*frozen, 4)[0])
    assert len(torch.unique(seen)) <= 16  # quantized to 4 bits over the frozen range, and clamped to it:
    assert float(frozen[0]) - step / 2 <= float(seen.min()) and float(seen.max()) <= float(frozen[1]) + step / 2
    assert float((10 * x2).max()) > float(frozen[1]) + step
    # the state travels in state_dict, switch included
    fresh = torch.nn.Conv2d(2, 2, 1)
    attach_layer_quant(fresh, bits=4)
    fresh.load_state_dict(conv.state_dict())
    assert fresh.lcs_quant.active and torch.equal(fresh.lcs_quant.act_hi, frozen[1])


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_unpack_ints_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 1003):
        codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int32)
        codes[0] = 2**bits - 1
        packed = pack_ints(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_ints(packed, bits, n), codes)
    with pytest.raises(LcsError, match="codes must lie"):
        pack_ints(torch.tensor([2**bits]), bits)


def test_pack_ints_across_chunks(monkeypatch):
    monkeypatch.setattr(lcs.codec, "_CHUNK", 16)
    codes = torch.randint(0, 8, (101,), dtype=torch.int32)
    packed = pack_ints(codes, 3)
    assert packed.numel() == math.ceil(101 * 3 / 8)
    assert torch.equal(unpack_ints(packed, 3, 101), codes)
    monkeypatch.undo()
    assert torch.equal(unpack_ints(packed, 3, 101), codes)  # the layout does not depend on the chunk size


# -- subspace, export, Runtime -----------------------------------------------------------------------
def _trained_quant_sub(geometry: str = "line") -> lcs.Subspace:
    """A converted subspace whose activation observers have seen a few training batches."""
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), QuantizedConfig(geometry=geometry))
    set_activation_quant(sub.model, True)
    sub.model.train()
    with torch.no_grad():
        for a in (1.0, 0.0, 0.5):
            sub.set_alpha(a)
            sub.model(torch.randn(8, 3, 16, 16))
    sub.model.eval()
    return sub


def test_export_equals_fake_quantized_subspace_and_is_packed(tmp_path):
    sub = _trained_quant_sub()
    assert all(bool(lq.act_observed) for lq in layer_quants(sub.model).values())
    x = torch.randn(3, 3, 16, 16)
    sizes = {}
    for bits in (3, 4, 8):
        a = sub.config.alpha_of(bits)
        path = tmp_path / f"q{bits}.safetensors"
        sizes[bits] = lcs.save_compressed(lcs.materialize(sub, a), path, {**META, "alpha": a})
        assert sizes[bits] == artifact_bytes(lcs.materialize(sub, a), META | {"alpha": a})
        loaded = lcs.load_compressed(path, kernels="dense")
        with sub.at(a), torch.no_grad():
            ref = sub.model(x)
            assert torch.allclose(loaded(x), ref, atol=1e-5)  # the artifact is the network, exactly
            # on the kernels a device runs (int8 chains where they win): equal up to rounding ties
            fast = lcs.load_compressed(path)(x)
            assert (fast - ref).abs().max() <= 1e-2 * ref.abs().max()
            assert torch.equal(fast.argmax(1), ref.argmax(1))
        header = describe_artifact(path)
        assert header["quant"] == {fqn: bits for fqn in sub.compressed}
        for fqn in sub.compressed:
            info = header["tensors"][f"{fqn}.weight"]
            assert info["encoding"] in ("packed_int", "sparse_int") and info["bits"] == bits
            w = loaded.get_submodule(fqn).weight
            assert len(torch.unique(w)) <= 2**bits
            with sub.at(a):
                assert torch.equal(w, sub.model.get_submodule(fqn).weight.detach())  # bit for bit
        with safe_open(str(path), "pt") as f:
            packed = f.get_tensor("bits").numel()  # every layer's codes (and positions, where sparse_int won)
        n = sum(sub.model.get_submodule(fqn).weight.numel() for fqn in sub.compressed)
        assert packed <= n * bits / 8 + len(sub.compressed)  # at most b/32 of float32
        # saving the loaded network again gives the same file
        assert lcs.save_compressed(loaded, tmp_path / "again.safetensors", {**META, "alpha": a}) == sizes[bits]
    n = sum(sub.model.get_submodule(fqn).weight.numel() for fqn in sub.compressed)
    assert sizes[8] - sizes[3] >= n * 5 / 8 - 200  # the codes shrink by 5 bits each at least (3-bit zeros: more)


@pytest.mark.parametrize("geometry", ["line", "point"])
def test_runtime_equals_subspace(tmp_path, geometry):
    sub = _trained_quant_sub(geometry)
    path = tmp_path / "sub.safetensors"
    save_subspace(sub, path, ARCH)
    rt = Runtime.load(path)
    assert rt.level_name == "bits" and rt.level == 8
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    for a in (0.0, 0.3, 0.5, 0.9, 1.0):
        bits = rt.set_alpha(a)
        assert bits == sub.config.level(a)
        with sub.at(a), torch.no_grad():
            ref = sub.model(x)
        outs[bits] = rt(x)
        assert torch.allclose(outs[bits], ref, atol=1e-5)
    assert not torch.allclose(outs[3], outs[8], atol=1e-3)
    rt.set_alpha(0.0)
    net3 = rt.network
    rt.set_alpha(1.0)
    assert all(lq.bits == 3 for lq in layer_quants(net3).values())  # an old network keeps its bits
    assert all(lq.bits == 8 and lq.active for lq in layer_quants(rt.network).values())
    # the served network is packed like the exported one (what `lcs profile` reports as bytes)
    assert artifact_bytes(rt.network, META) == artifact_bytes(lcs.materialize(sub, 1.0), META)


def test_materialized_network_survives_deepcopy_and_has_no_subspace_state():
    sub = _trained_quant_sub()
    plain = lcs.materialize(sub, 0.0)
    clone = copy.deepcopy(plain)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(clone(x), plain(x))
    lqs = layer_quants(plain)
    assert set(lqs) == set(sub.compressed)
    assert all(isinstance(lq, LayerQuant) and lq.bits == 3 and lq.state is None for lq in lqs.values())
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())


# -- methods and training ----------------------------------------------------------------------------
def test_choice_sampler_draws_every_bin_edge_uniformly():
    edges = tuple(QuantizedConfig().alpha_of(b) for b in range(3, 9))
    s = ChoiceSampler(edges)
    draws = [s(i, torch.Generator().manual_seed(i))[0] for i in range(3000)]
    counts = {e: draws.count(e) for e in edges}
    assert set(draws) == set(edges) and all(400 < c < 600 for c in counts.values())


FAST = ["method.regime=quantized", "data.batch_size=32", "optim.epochs=2", "optim.warmup_epochs=0.5",
        "method.warmup=0.5", "run.progress=false"]


@pytest.mark.parametrize("method, extra", [("lcs_l", []), ("lcs_p", []), ("target", ["method.target=4"])])
def test_each_quantized_method_trains(tmp_path, tiny_digits, method, extra):
    cfg = load_config(None, FAST + [f"method.name={method}"] + extra)
    trainer = Trainer(cfg, tmp_path / method, data=tiny_digits)
    assert trainer.method.phase_start == 6  # half of 2 epochs × 6 steps
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x = lcs.data.normalize(tiny_digits.train.images[:16], tiny_digits.mean, tiny_digits.std)
    y = tiny_digits.train.labels[:16]
    r = trainer.train_step(x, y, step=0)
    assert not any(lq.active for lq in layer_quants(trainer.model).values())  # activations wait for the warm-up
    expected = {"lcs_l": QuantizedConfig().level(r["alphas"][0]), "lcs_p": 8, "target": 4}[method]
    assert r["levels"] == [expected] and torch.isfinite(torch.tensor(r["loss"]))
    if method == "lcs_l":
        assert 0.0 <= r["cos2"] <= 1.0
    assert trainer.train_step(x, y, step=6)["levels"][0] in range(3, 9)
    assert all(lq.active for lq in layer_quants(trainer.model).values())
    levels = {trainer.method.schedule(trainer.sub.config.level(a), s)
              for s in range(6, 200) for a in trainer.method.sampler(s, torch.Generator().manual_seed(s))}
    assert levels == ({4} if method == "target" else set(range(3, 9)))
    records = trainer.fit()
    assert records[-1]["train_loss"] > 0 and 0 <= records[-1]["val_acc_lo"] <= 1
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lcs_quant" not in k)
    assert any(k.endswith("lcs_quant.act_hi") and float(v) > 0 for k, v in after.items())  # observers saw data


CLI_FAST = ["--epochs", "1", "--no-progress", "--val-fraction", "0.5", "--set", "data.batch_size=128",
            "--set", "optim.warmup_epochs=0.2", "--set", "method.warmup=0.5", "--set", "optim.lr=0.025",
            "--set", "run.threads=1"]


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "q"
    assert main(["train", "--regime", "quantized", "--method", "lcs_l", "--data", "digits", "--out", str(out),
                 *CLI_FAST]) == 0
    return out


def test_cli_eval_reports_bits_and_packed_bytes(quant_run, capsys):
    assert main(["eval", str(quant_run), "--latency-batch", ""]) == 0
    assert "bits" in capsys.readouterr().out
    recs = json.loads((quant_run / "eval.json").read_text())["records"]
    assert [r["bits"] for r in recs] == [3, 4, 5, 6, 7, 8]
    assert all(a["bytes"] < b["bytes"] for a, b in zip(recs, recs[1:], strict=False))
    assert (quant_run / "eval.png").is_file()


def test_cli_export_is_packed_and_equal(quant_run, tmp_path, capsys):
    path = tmp_path / "q4.safetensors"
    a = QuantizedConfig().alpha_of(4)
    assert main(["export", str(quant_run), "--alpha", str(a), "--out", str(path)]) == 0
    assert "bits=4" in capsys.readouterr().out
    plain = lcs.load_compressed(path)
    _, sub, _ = load_run(quant_run)
    assert all(lq.active for lq in layer_quants(sub.model).values())  # the run got past its warm-up
    x = torch.randn(3, 3, 16, 16)
    with sub.at(a), torch.no_grad():
        assert torch.allclose(plain(x), sub.model(x), atol=1e-5)
    assert describe_artifact(path)["tensors"]["blocks.0.conv2.weight"]["encoding"] in ("packed_int", "sparse_int")
