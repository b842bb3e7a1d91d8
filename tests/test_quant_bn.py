"""Quantization with BatchNorm: each BN that reads a quantizing conv's output is folded into the
conv's weight before quantizing (QAT folding), and merged into the conv's bias on export."""

import copy

import pytest
import torch
from torch import nn

import lcs
from lcs.deploy.artifact import describe_artifact
from lcs.deploy.runtime import Runtime, save_subspace
from lcs.layers.quant import bn_fold_scale, layer_quants, set_activation_quant
from lcs.regimes import QuantizedConfig

ARCH = {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "bn"}}
META = {"arch": ARCH, "regime": "quantized"}


def _warm_bn(model: nn.Module, steps: int = 4) -> None:
    """A few training-mode passes so running statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    model.eval()


def _bn_sub(geometry: str = "line", act: bool = True, **config) -> lcs.Subspace:
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", **ARCH["kwargs"]), QuantizedConfig(geometry=geometry, **config))
    set_activation_quant(sub.model, act)
    for a in (1.0, 0.0, 0.5):
        sub.set_alpha(a)
        _warm_bn(sub.model, 2)
    return sub


def test_folds_exactly_the_bns_that_read_a_quantizing_conv():
    sub = _bn_sub()
    folds = sub.model.lcs_bn_folds
    assert len(folds) == 12  # conv1 → norm2 and conv2 → norm3 in each of the 6 bottleneck blocks
    for conv, bn in folds.items():
        assert conv in sub.compressed and isinstance(sub.model.get_submodule(bn), nn.BatchNorm2d)
        assert sub.model.get_submodule(conv).parametrizations.weight[-1].fold is sub.model.get_submodule(bn)
    # BNs that read a residual sum (or the dense stem) are not folded
    unfolded = {fqn for fqn, m in sub.model.named_modules() if isinstance(m, nn.BatchNorm2d)} - set(folds.values())
    assert unfolded and all(fqn.endswith("norm1") or fqn == "norm" for fqn in unfolded)


def test_at_16_bits_the_folded_network_equals_the_float_network():
    """Folding changes where the scale is applied, not what the network computes (eval mode)."""
    torch.manual_seed(0)
    model = lcs.models.create("cpreresnet20", **ARCH["kwargs"])
    _warm_bn(model)
    with torch.no_grad():
        for m in model.modules():  # non-trivial affine parameters
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ref = copy.deepcopy(model).eval()
    sub = lcs.convert(model, QuantizedConfig(geometry="point", b_min=15, b_max=16))
    sub.model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = ref(x)
        assert torch.allclose(sub.model(x), want, rtol=1e-3, atol=1e-3)
        assert torch.allclose(lcs.materialize(sub, 1.0)(x), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_folded_export_equals_subspace_and_is_on_the_grid(tmp_path, bits):
    sub = _bn_sub()
    a = sub.config.alpha_of(bits)
    plain = lcs.materialize(sub, a)
    folds = sub.model.lcs_bn_folds
    for conv, bn in folds.items():
        assert isinstance(plain.get_submodule(bn), nn.Identity)
        assert plain.get_submodule(conv).bias is not None
        assert len(torch.unique(plain.get_submodule(conv).weight)) <= 2**bits  # the folded weight is quantized
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 19 - len(folds)
    x = torch.randn(3, 3, 16, 16)
    with sub.at(a), torch.no_grad():
        ref = sub.model(x)
        assert torch.allclose(plain(x), ref, atol=1e-5)
    path = tmp_path / "q.safetensors"
    lcs.save_compressed(plain, path, {**META, "alpha": a})
    assert describe_artifact(path)["bn_folded"] == folds
    loaded = lcs.load_compressed(path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref, atol=1e-5)
    for conv in folds:  # stored as packed codes, bit for bit
        assert describe_artifact(path)["tensors"][f"{conv}.weight"]["encoding"] in ("packed_int", "sparse_int")
        assert torch.equal(loaded.get_submodule(conv).weight, plain.get_submodule(conv).weight)


def test_runtime_folds_like_materialize(tmp_path):
    sub = _bn_sub()
    path = tmp_path / "sub.safetensors"
    save_subspace(sub, path, ARCH)
    rt = Runtime.load(path)
    x = torch.randn(2, 3, 16, 16)
    for a in (0.0, 0.5, 1.0):
        rt.set_alpha(a)
        with sub.at(a), torch.no_grad():
            ref = sub.model(x)
        assert torch.allclose(rt(x), ref, atol=1e-5)
        assert not any(isinstance(rt.network.get_submodule(bn), nn.BatchNorm2d)
                       for bn in sub.model.lcs_bn_folds.values())
    # the template and the subspace keep their BNs: folding replaced modules only in the served copy
    template = rt._baker.template
    assert all(isinstance(template.get_submodule(bn), nn.BatchNorm2d) for bn in sub.model.lcs_bn_folds.values())


def test_training_step_updates_bn_and_tracks_unfolded_statistics():
    """In training the BN still normalizes with batch statistics of the *unfolded* conv output, so
    its running mean converges to the mean of conv(x, θ), not of conv(x, θ·s)."""
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", **ARCH["kwargs"]), QuantizedConfig(geometry="point",
                                                                                          b_min=15, b_max=16))
    conv_fqn, bn_fqn = next(iter(sub.model.lcs_bn_folds.items()))
    bn = sub.model.get_submodule(bn_fqn)
    with torch.no_grad():
        bn.weight.fill_(3.0)  # s far from 1: a missing unscale would show
    seen = []
    sub.model.get_submodule(conv_fqn).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    sub.model.train()
    bn.momentum = 1.0  # running stats = the last batch's
    x = torch.randn(16, 3, 16, 16)
    s = bn_fold_scale(bn).detach().view(1, -1, 1, 1)  # from the running variance before this step
    loss = sub.model(x).logsumexp(1).mean()
    loss.backward()
    unfolded = seen[0] / s
    assert torch.allclose(bn.running_mean, unfolded.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
    plist = sub.model.get_submodule(bn_fqn).parametrizations if hasattr(bn, "parametrizations") else None
    assert plist is None  # a point: plain parameters
    assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()
    assert sub.model.get_submodule(conv_fqn).parametrizations.weight.original.grad.abs().sum() > 0


def test_bn_quantized_run_trains_from_the_cli(tmp_path, capsys):
    from lcs.cli import main

    out = tmp_path / "run"
    assert main(["train", "--regime", "quantized", "--method", "lcs_l", "--epochs", "1", "--no-progress",
                 "--val-fraction", "0.5", "--set", "model.norm=bn", "--set", "data.batch_size=128",
                 "--set", "method.warmup=0.5", "--set", "run.threads=1", "--out", str(out)]) == 0
    assert main(["export", str(out), "--alpha", "0", "--out", str(tmp_path / "a.safetensors")]) == 0
    header = describe_artifact(tmp_path / "a.safetensors")
    assert len(header["bn_folded"]) == 12
    loaded = lcs.load_compressed(tmp_path / "a.safetensors")
    assert all(lq.bits == 3 for lq in layer_quants(loaded).values())


def test_each_bit_width_keeps_its_own_bn_statistics(tmp_path):
    """BN statistics per bit width: a batch at 3 bits updates only the 3-bit row; eval at 3 bits
    uses it; the exported 3-bit network carries exactly that row; the state dict holds all rows."""
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", **ARCH["kwargs"]), QuantizedConfig())
    bn = sub.model.get_submodule("blocks.0.norm1")  # not folded: reads the stem's output
    assert bn.lcs_running_mean.shape == (6, bn.num_features)
    keys = sub.model.state_dict().keys()
    assert "blocks.0.norm1.lcs_running_mean" in keys and "blocks.0.norm1.running_mean" not in keys
    sub.model.train()
    with torch.no_grad(), sub.at(sub.config.alpha_of(3)):
        sub.model(torch.randn(16, 3, 16, 16) * 3 + 1)
    moved = (bn.lcs_running_mean != 0).any(1)
    assert moved.tolist() == [True, False, False, False, False, False]  # only the 3-bit row
    sub.model.eval()
    x = torch.randn(2, 3, 16, 16)
    for bits in (3, 8):
        a = sub.config.alpha_of(bits)
        with sub.at(a), torch.no_grad():
            ref = sub.model(x)
            assert torch.equal(bn.running_mean, bn.lcs_running_mean[bits - 3])
        plain = lcs.materialize(sub, a)
        assert torch.equal(plain.get_submodule("blocks.0.norm1").running_mean, bn.lcs_running_mean[bits - 3])
        assert "blocks.0.norm1.running_mean" in plain.state_dict()
        assert not any(k.endswith("lcs_running_mean") for k in plain.state_dict())
        with torch.no_grad():
            assert torch.allclose(plain(x), ref, atol=1e-5)
    # the subspace artifact round-trips every row
    save_subspace(sub, tmp_path / "s.safetensors", ARCH)
    rt = Runtime.load(tmp_path / "s.safetensors")
    rt.set_alpha(sub.config.alpha_of(3))
    with sub.at(sub.config.alpha_of(3)), torch.no_grad():
        assert torch.allclose(rt(x), sub.model(x), atol=1e-5)


def test_target_baseline_keeps_one_set_of_bn_statistics():
    from lcs.train.config import load_config

    cfg = load_config(None, ["method.regime=quantized", "model.norm=bn", "method.name=target", "method.target=4"])
    assert cfg.regime_config().bn_stats_per_bits is False
    sub = lcs.convert(lcs.models.create("cpreresnet20", **ARCH["kwargs"]), cfg.regime_config())
    assert "blocks.0.norm1.running_mean" in sub.model.state_dict()
    assert load_config(None, ["method.regime=quantized", "model.norm=bn"]).regime_config().bn_stats_per_bits
