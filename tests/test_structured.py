"""Structured sparsity: width-following layers, the physically slim network, and its loaders."""

import copy

import pytest
import torch
from torch import nn

import lcs
from lcs.deploy.artifact import load_compressed, save_compressed
from lcs.deploy.bake import materialize, strip_parametrizations
from lcs.deploy.runtime import Runtime, save_subspace
from lcs.errors import LcsError
from lcs.layers.slim import is_slim, width_channels
from lcs.regimes import StructuredConfig

SHAPE = (3, 16, 16)


def _subspace(norm: str = "ln", geometry: str = "line", **kw) -> lcs.Subspace:
    sub = lcs.convert(lcs.models.create("cpreresnet20", norm=norm), StructuredConfig(geometry=geometry, **kw))
    sub.input_shape = SHAPE
    return sub


def _shake(sub: lcs.Subspace) -> None:
    """Move every tensor (and BN statistics) away from its init, so equalities are not trivial."""
    with torch.no_grad():
        for p in sub.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sub.model.train()
    for a in (1.0, 0.0, 0.6):
        sub.set_alpha(a)
        sub.model(torch.randn(8, *SHAPE))
    sub.model.eval()


def test_width_channels_rounds_half_up_and_keeps_one():
    assert [width_channels(16, w) for w in (0.25, 0.375, 0.5, 1.0)] == [4, 6, 8, 16]
    assert width_channels(10, 0.25) == 3  # 2.5 rounds up
    assert width_channels(3, 0.1) == 1


def test_config_validation():
    assert StructuredConfig().level(0.0) == 0.25 and StructuredConfig().level(1.0) == 1.0
    assert StructuredConfig().alpha_of(0.625) == pytest.approx(0.5)
    for bad in (dict(w_min=0.0), dict(w_min=0.8, w_max=0.5), dict(w_max=1.5), dict(line_scope="convs")):
        with pytest.raises(LcsError):
            StructuredConfig(**bad)
    with pytest.raises(LcsError, match="outside"):
        StructuredConfig().alpha_of(0.1)


def test_width_that_leaves_zero_channels_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 1, 1), nn.Conv2d(1, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(LcsError, match="zero channels"):
        lcs.convert(model, StructuredConfig(w_min=0.25))


def test_groupnorm_with_groups_is_rejected():
    with pytest.raises(LcsError, match="GroupNorm"):
        lcs.convert(lcs.models.create("cpreresnet20", norm="gn"), StructuredConfig())


def _masked_reference(sub: lcs.Subspace, alpha: float) -> nn.Module:
    """The slow, obvious reference: the full-width network with every channel beyond the width
    zeroed (conv output rows, norm scale and shift). With per-channel norms (InstanceNorm, and
    BatchNorm in eval mode) a zeroed channel stays exactly zero, so this must equal the slim net."""
    width = sub.config.level(alpha)
    with sub.at(alpha):
        ref = strip_parametrizations(copy.deepcopy(sub.model))  # θ(α) baked in, still slim layers ...
    next(m for m in ref.modules() if is_slim(m)).lcs_slim.state.level = 1.0  # ... now all at full width
    state = ref.state_dict()
    for fqn, m in sub.model.named_modules():
        if fqn in sub.compressed:
            c_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            k = width_channels(c_out, width)
            state[f"{fqn}.weight"][k:] = 0
            if f"{fqn}.bias" in state:
                state[f"{fqn}.bias"][k:] = 0
    ref.load_state_dict(state)
    # norms: zero the scale/shift of the channels their (masked) input does not have
    counts = {}
    def count_live_channels(fqn: str):
        return lambda mod, inp, out: counts.__setitem__(fqn, int((inp[0].abs().sum((0, 2, 3)) > 0).sum()))

    hooks = [m.register_forward_hook(count_live_channels(fqn))
             for fqn, m in ref.named_modules() if isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d))]
    with torch.no_grad():
        ref(torch.randn(2, *SHAPE))
    for h in hooks:
        h.remove()
    for fqn, m in ref.named_modules():
        if fqn in counts:
            with torch.no_grad():
                m.weight[counts[fqn]:] = 0
                m.bias[counts[fqn]:] = 0
    return ref.eval()


@pytest.mark.parametrize("norm", ["in", "bn"])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_slim_forward_equals_masked_full_network(norm, alpha):
    sub = _subspace(norm, geometry="line")
    _shake(sub)
    x = torch.randn(4, *SHAPE)
    sub.set_alpha(alpha)
    with torch.no_grad():
        slim_out = sub.model(x)
        ref_out = _masked_reference(sub, alpha)(x)
    assert torch.allclose(slim_out, ref_out, atol=1e-5)


def _formula_params(width: float, num_classes: int = 10) -> int:
    """cPreResNet20 at width w: stem 3→c(16), bottlenecks, final norm, 1×1 conv classifier; every
    norm holds 2 parameters per channel."""
    def c(n: int) -> int:
        return width_channels(n, width)

    total = 3 * c(16) * 9
    inplanes = 16
    for stage, planes in enumerate((16, 32, 64)):
        for i in range(2):
            out = 4 * planes
            total += 2 * c(inplanes) + c(inplanes) * c(planes) + 2 * c(planes) + c(planes) * c(planes) * 9
            total += 2 * c(planes) + c(planes) * c(out)
            if (stage > 0 and i == 0) or inplanes != out:
                total += c(inplanes) * c(out)
            inplanes = out
    return total + 2 * c(256) + c(256) * num_classes + num_classes


@pytest.mark.parametrize("geometry", ["line", "point"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_materialized_network_is_physically_slim_and_equal(geometry, alpha):
    sub = _subspace("ln", geometry)
    _shake(sub)
    x = torch.randn(3, *SHAPE)
    sub.set_alpha(alpha)
    with torch.no_grad():
        expected = sub.model(x)
    plain = materialize(sub, alpha)
    assert not any(is_slim(m) or hasattr(m, "parametrizations") for m in plain.modules())
    assert type(plain.blocks[0].conv1) is nn.Conv2d
    assert sum(p.numel() for p in plain.parameters()) == _formula_params(sub.config.level(alpha))
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-5)


def test_compressed_artifact_round_trip(tmp_path):
    sub = _subspace("bn", "point")
    _shake(sub)
    x = torch.randn(2, *SHAPE)
    sub.set_alpha(0.0)
    with torch.no_grad():
        expected = sub.model(x)
    plain = materialize(sub, 0.0)
    arch = {"name": "cpreresnet20", "kwargs": {"norm": "bn"}}
    size = save_compressed(plain, tmp_path / "w.safetensors", {"arch": arch, "regime": "structured"})
    full_bytes = sum(t.numel() * 4 for t in lcs.models.create("cpreresnet20", norm="bn").state_dict().values())
    assert size < 0.15 * full_bytes  # width 0.25: about 1/16 of the weights
    loaded = load_compressed(tmp_path / "w.safetensors")
    assert loaded.blocks[5].conv2.weight.shape == (16, 16, 3, 3)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5)


@pytest.mark.parametrize("geometry", ["line", "point"])
def test_runtime_switches_between_slim_networks(tmp_path, geometry):
    sub = _subspace("ln", geometry)
    _shake(sub)
    arch = {"name": "cpreresnet20", "kwargs": {"norm": "ln"}}
    save_subspace(sub, tmp_path / "s.safetensors", arch, {"input_shape": list(SHAPE)})
    rt = Runtime.load(tmp_path / "s.safetensors")
    x = torch.randn(2, *SHAPE)
    for a in (0.0, 0.8, 1.0, 0.0):
        width = rt.set_alpha(a)
        sub.set_alpha(a)
        with torch.no_grad():
            assert torch.allclose(rt(x), sub.model(x), atol=1e-5)
        conv = rt.network.blocks[4].conv2
        assert type(conv) is nn.Conv2d and conv.weight.shape[0] == width_channels(64, width)


def test_line_scope_and_regularized_pairs():
    norm_only = _subspace("ln", "line")
    assert norm_only.lines and all(isinstance(norm_only.model.get_submodule(f), nn.GroupNorm)
                                   for f, _ in norm_only.lines)
    assert len(norm_only.regularized_pairs()) == len(norm_only.lines)  # every norm tensor
    everything = _subspace("ln", "line", line_scope="all")
    conv_lines = {f for f, n in everything.lines if n == "weight" and f in everything.compressed}
    assert conv_lines == set(everything.compressed)
    assert len(everything.regularized_pairs()) > len(norm_only.regularized_pairs())


def test_batchnorm_slice_updates_only_active_statistics():
    sub = _subspace("bn", "point")
    bn = sub.model.blocks[0].norm2
    before = bn.running_mean.clone()
    sub.model.train()
    sub.set_alpha(0.0)
    sub.model(torch.randn(8, *SHAPE))
    k = width_channels(16, 0.25)
    assert not torch.equal(bn.running_mean[:k], before[:k])
    assert torch.equal(bn.running_mean[k:], before[k:])
