"""Sparse kernels: CSR conv / linear and direct sparse convolution equal the dense kernels; the
per-layer choice follows the measurement, is cached, and never changes what the network computes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import lcs
from lcs.layers import direct
from lcs.layers.kernels import (
    KernelChooser,
    SparseConv2d,
    SparseLinear,
    accelerate,
    conv_columns,
    csr_conv2d,
    csr_linear,
    dense_kernels,
    kernel_report,
)


class Always(KernelChooser):
    """Picks one kernel wherever it can run (``direct`` falls back to ``csr`` on linears)."""

    def __init__(self, kernel: str):
        super().__init__(path="")
        self.kernel = kernel

    def decide(self, layer, x, **_):
        return self.kernel if self.kernel in self.candidates(layer) else "csr"

    def layout(self, *_):
        return False  # the plan of per-layer choices (NCHW), never all-dense channels-last


needs_numba = pytest.mark.skipif(not direct.available(), reason="numba is not installed")


def _sparse_weight(shape, density, gen):
    w = torch.randn(*shape, generator=gen)
    return w * (torch.rand(*shape, generator=gen) < density)


@pytest.mark.parametrize("k,stride,padding,dilation", [(1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1),
                                                       (5, 1, 2, 2), (3, 1, 0, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_csr_conv_equals_dense_conv(k, stride, padding, dilation, batch):
    g = torch.Generator().manual_seed(k * 10 + stride)
    conv = nn.Conv2d(6, 10, k, stride=stride, padding=padding, dilation=dilation)
    conv.weight.data = _sparse_weight(conv.weight.shape, 0.1, g)
    x = torch.randn(batch, 6, 13, 11, generator=g)
    csr = conv.weight.reshape(10, -1).to_sparse_csr()
    with torch.no_grad():
        assert torch.allclose(csr_conv2d(x, csr, conv, conv.bias), conv(x), atol=1e-5)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (3, 1, 0, 1),
                                                       ((3, 5), (2, 1), (1, 2), 1), (3, 1, 2, 2)])
def test_conv_columns_equal_unfold_exactly(k, stride, padding, dilation):
    conv = nn.Conv2d(5, 4, k, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 5, 17, 12)
    expected = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(conv_columns(x, conv), expected)


def test_csr_linear_equals_dense_linear():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(30, 7)
    lin.weight.data = _sparse_weight(lin.weight.shape, 0.2, g)
    x = torch.randn(4, 5, 30, generator=g)
    with torch.no_grad():
        assert torch.allclose(csr_linear(x, lin.weight.to_sparse_csr(), lin.bias), lin(x), atol=1e-5)


@pytest.mark.parametrize("alpha", [0.025, 0.1, 0.3])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kernel", ["csr", pytest.param("direct", marks=needs_numba)])
def test_accelerated_network_equals_dense_network(alpha, batch, kernel):
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), lcs.UnstructuredConfig(geometry="point"))
    sub.model.eval()
    ref = lcs.materialize(sub, alpha)
    fast = lcs.materialize(sub, alpha)
    n = accelerate(fast, sub.compressed, chooser=Always(kernel))
    assert n == len(sub.compressed)  # every compressed layer is at most 30 % dense here
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), ref(x), atol=1e-4)
    report = kernel_report(fast)
    assert set(report) == set(sub.compressed)
    assert all(d == {batch: kernel if isinstance(fast.get_submodule(f), nn.Conv2d) else "csr"}
               for f, d in report.items())
    assert fast.state_dict().keys() == ref.state_dict().keys()  # artifacts see ordinary layers
    dense_kernels(fast)
    assert not any(isinstance(m, SparseConv2d) for m in fast.modules())


def test_dense_layers_are_not_touched_and_training_stays_dense():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    with torch.no_grad():
        net[1].weight.mul_(torch.rand_like(net[1].weight) < 0.1)
    assert accelerate(net, chooser=Always("csr")) == 1  # the dense first conv stays nn.Conv2d
    assert type(net[0]) is nn.Conv2d and isinstance(net[1], SparseConv2d)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    net(x).sum().backward()  # autograd takes the dense kernel
    assert net[1].lcs_decisions == {}


def test_choice_follows_the_measurement_and_is_cached(tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    conv = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.05)
    net, net2 = nn.Sequential(conv), nn.Sequential(copy.deepcopy(conv))
    chooser = KernelChooser(path=str(path), repeats=1)
    # batch 1: csr twice as fast as dense; batch 8: dense twice as fast as csr, direct fastest of all
    tables = iter([{"dense": 2.0, "csr": 1.0, "direct": 1.5}, {"dense": 1.0, "csr": 2.0, "direct": 0.5}])
    monkeypatch.setattr(chooser, "measure", lambda layer, x, *_: {k: chooser.now[k] for k in chooser.candidates(layer)})
    real_decide = chooser.decide

    def decide(layer, x, **kw):
        chooser.now = next(tables)
        return real_decide(layer, x, **kw)

    monkeypatch.setattr(chooser, "decide", decide)
    accelerate(net, chooser=chooser)
    with torch.no_grad():
        net(torch.randn(1, 16, 8, 8))
        net(torch.randn(8, 16, 8, 8))
    best8 = "direct" if direct.available() else "dense"  # without numba only dense and csr are timed
    assert net[0].lcs_decisions == {1: "csr", 8: best8}
    table = json.loads(path.read_text())
    assert sorted(v["kernel"] for v in table.values()) == sorted(["csr", best8])
    again = KernelChooser(path=str(path))  # a new process reads the decisions instead of measuring
    monkeypatch.setattr(again, "measure", lambda layer, x, *_: pytest.fail("measured again"))
    accelerate(net2, chooser=again)
    with torch.no_grad():
        net2(torch.randn(1, 16, 8, 8))
    assert net2[0].lcs_decisions == {1: "csr"}


def test_the_kernels_take_turns_when_timed():
    """Round by round, so a load change between two kernels' turns cannot decide the choice."""

    class Logged(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def run(self, kernel, x):
            self.calls.append(kernel)
            return x

    layer, chooser = Logged(), KernelChooser(path="", repeats=3)
    kernels = ("dense", "csr", "direct")
    chooser.candidates = lambda layer: kernels
    timings = chooser.measure(layer, torch.zeros(1))
    assert layer.calls == list(kernels) * 4  # one warm-up round, then three timed rounds
    assert set(timings) == set(kernels) and all(t >= 0 for t in timings.values())


def test_a_sparse_kernel_must_beat_dense_by_the_margin():
    chooser = KernelChooser(path="", margin=0.75)
    assert chooser.choose({"dense": 1.0, "csr": 0.8, "direct": 0.9}) == "dense"  # 20 % faster: not enough
    assert chooser.choose({"dense": 1.0, "csr": 0.7, "direct": 0.5}) == "direct"
    assert chooser.choose({"dense": 1.0, "csr": 0.7}) == "csr"
    assert chooser.choose({"dense": 1.0}) == "dense"


def test_a_tie_keeps_the_dense_kernel(monkeypatch):
    chooser = KernelChooser(path="", repeats=1)
    monkeypatch.setattr(chooser, "measure", lambda layer, x, *_: dict.fromkeys(chooser.candidates(layer), 1.0))
    net = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        net[0].weight.mul_(torch.rand_like(net[0].weight) < 0.05)
    accelerate(net, chooser=chooser)
    with torch.no_grad():
        net(torch.randn(2, 64))
    assert net[0].lcs_decisions == {2: "dense"}


def test_runtime_serves_sparse_kernels_with_equal_outputs(tmp_path, monkeypatch):
    import lcs.layers.kernels as k

    monkeypatch.setattr(k, "_DEFAULT_CHOOSER", Always("csr"))
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), lcs.UnstructuredConfig())
    sub.model.eval()
    path = tmp_path / "s.safetensors"
    lcs.save_subspace(sub, path, {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "gn"}})
    rt = lcs.Runtime.load(path)
    x = torch.randn(2, 3, 32, 32)
    for a in (0.05, 0.5, 1.0):
        rt.set_alpha(a)
        with sub.at(a), torch.no_grad():
            assert torch.allclose(rt(x), sub.model(x), atol=1e-4)
        sparse = [f for f, d in rt.kernel_report().items() if d.get(2, "dense") != "dense"]
        assert (len(sparse) == len(sub.compressed)) == (a <= 0.5)  # density 1: nothing to gain, dense


def test_onnx_export_of_an_accelerated_network_uses_standard_ops(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from lcs.deploy.onnx import export_onnx, run_onnx

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                        nn.Linear(8 * 64, 4))
    with torch.no_grad():
        for m in (net[2], net[4]):
            m.weight.mul_(torch.rand_like(m.weight) < 0.1)
    accelerate(net.eval(), chooser=Always("csr"))
    export_onnx(net, tmp_path / "n.onnx", (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(run_onnx(tmp_path / "n.onnx", x)), net(x), atol=1e-5)
    assert isinstance(net[2], SparseConv2d)  # the caller's network is left as it was


@needs_numba
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 1, 0),
                                              ((3, 5), (2, 1), (1, 2)), (7, 2, 3), (3, 3, 0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_direct_conv_equals_dense_conv(k, stride, padding, batch):
    g = torch.Generator().manual_seed(7 * batch + stride if isinstance(stride, int) else 5)
    conv = nn.Conv2d(6, 10, k, stride=stride, padding=padding)
    conv.weight.data = _sparse_weight(conv.weight.shape, 0.1, g)
    x = torch.randn(batch, 6, 13, 11, generator=g)
    with torch.no_grad():
        out = direct.direct_conv2d(x, direct.DirectWeight(conv.weight, conv.stride), conv, conv.bias)
        ref = conv(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (7, 2, 3), (3, 3, 0), ((3, 5), (2, 1), (1, 2)), (2, 2, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_phase_split_equals_the_slice_copies(k, stride, padding, channels_last):
    conv = nn.Conv2d(5, 4, k, stride=stride, padding=padding)
    x = torch.randn(2, 5, 13, 11)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got, ref = direct._phase_planes(x, conv), direct._phase_planes(x, conv, compiled=False)
    assert got[1:] == ref[1:] and got[0].shape[2] > 1 and torch.equal(got[0], ref[0])


@needs_numba
def test_direct_conv_of_an_all_zero_weight_is_the_bias():
    conv = nn.Conv2d(4, 3, 3, padding=1)
    conv.weight.data.zero_()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        out = direct.direct_conv2d(x, direct.DirectWeight(conv.weight, conv.stride), conv, conv.bias)
    assert torch.equal(out, conv.bias.view(1, -1, 1, 1).expand(2, 3, 5, 5))


def test_direct_kernel_is_only_offered_where_it_applies():
    assert not direct.eligible(nn.Conv2d(4, 4, 3, groups=2))
    assert not direct.eligible(nn.Conv2d(4, 4, 3, dilation=2))
    assert not direct.eligible(nn.Conv2d(4, 4, 3, padding="same"))
    assert not direct.eligible(nn.Linear(4, 4))
    assert direct.eligible(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert KernelChooser.candidates(SparseLinear(4, 4)) == ("dense", "csr")


def test_a_cached_direct_choice_is_not_used_where_direct_cannot_run(tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.05)
    net = nn.Sequential(conv)
    x = torch.randn(2, 8, 8, 8)
    accelerate(net, chooser=KernelChooser(path=""))  # for the key: the layer's density is set here
    key = KernelChooser.key(net[0], x)
    path.write_text(json.dumps({key: {"kernel": "direct", "dense_ms": 1.0, "csr_ms": 0.7, "direct_ms": 0.1}}))
    monkeypatch.setattr(direct, "available", lambda: False)  # e.g. numba missing in this environment
    assert KernelChooser(path=str(path)).decide(net[0], x) == "csr"


@needs_numba
@pytest.mark.parametrize("k,stride,padding,ceil", [(3, 2, 1, False), (2, 2, 0, False), (2, 2, 0, True),
                                                   (3, 1, 1, False), (3, 3, 1, True), ((3, 2), (2, 1), (1, 0), False),
                                                   (4, 3, 2, True)])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (5, 7, 8)])
def test_compiled_max_pool_equals_torch_with_nan_and_inf(k, stride, padding, ceil, shape):
    from lcs.layers.pool import FastMaxPool2d

    g = torch.Generator().manual_seed(len(shape) + (k if isinstance(k, int) else 9))
    x = torch.randn(*shape, generator=g)
    x.view(-1)[[3, 40]] = float("nan")  # propagates, as in torch
    x.view(-1)[[7, 60]] = float("-inf")
    x.view(-1)[-1] = float("inf")
    pool = FastMaxPool2d(k, stride, padding, ceil_mode=ceil)
    with torch.no_grad():
        out = pool(x)
    ref = nn.functional.max_pool2d(x, k, stride, padding, ceil_mode=ceil)
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())


@needs_numba
def test_accelerate_pools_with_the_compiled_kernel_at_every_density_and_dense_kernels_undoes_it():
    from lcs.layers.pool import FastMaxPool2d

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        nn.MaxPool2d(2, return_indices=False, dilation=2)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
        accelerate(net, chooser=Always("dense"))  # a dense conv: nothing sparse, the pool still swapped
        assert type(net[2]) is FastMaxPool2d and type(net[3]) is nn.MaxPool2d  # dilated: torch's
        from lcs.layers.pool import eligible

        assert not eligible(nn.MaxPool2d(2, padding=2))  # torch refuses it: its error, not our guess
        assert torch.equal(net(x), ref)
        y = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)  # torch's path
        assert torch.equal(net[2](y), nn.functional.max_pool2d(y, 3, 2, 1))
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        net(xg).sum().backward()  # autograd takes torch's pool
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    dense_kernels(net)
    assert type(net[2]) is nn.MaxPool2d


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, affine=False), nn.ReLU(),
                        nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            if m.affine:
                m.weight.data.uniform_(0.5, 2)
                m.bias.data.uniform_(-1, 1)
        if isinstance(m, nn.Conv2d):
            m.weight.data *= torch.rand_like(m.weight) < 0.1
    net[6].weight.data = torch.randn_like(net[6].weight)  # dense: folds its BN, runs on the dense kernel only
    return net.eval()


@pytest.mark.parametrize("kernel", ["csr", pytest.param("direct", marks=needs_numba), "dense"])
def test_batchnorm_folded_into_sparse_convs_computes_the_same_and_keeps_the_state_dict(kernel):
    from lcs.layers.kernels import FoldedBatchNorm2d, kernel_plan

    net = _bn_net()
    assert kernel_plan(net).folds == {"0": "1", "3": "4", "6": "7"}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        ref = net(x)
        accelerate(net, chooser=Always(kernel))
        out = net(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert [type(net[i]) for i in (1, 4, 7)] == [FoldedBatchNorm2d] * 3
    assert set(kernel_report(net)) == {"0", "3"}  # the dense conv has no choice to report
    assert net[6].__dict__["lcs_decisions"] == {}  # and was never measured
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    twin = copy.deepcopy(net)  # a copy folds into its own norms, not the original's
    assert twin[0].__dict__["lcs_fold"] is twin[1] and twin[1] is not net[1]
    with torch.no_grad():
        assert torch.allclose(twin(x), ref, atol=1e-5)
    net.train()  # batch statistics: the folded weights no longer hold, every conv runs dense + its BN
    plain = dense_kernels(copy.deepcopy(net)).train()
    assert type(plain[1]) is nn.BatchNorm2d and "lcs_fold" not in plain[0].__dict__
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), atol=1e-5)


def test_a_folded_conv_on_the_dense_kernel_runs_one_conv_with_the_folded_weights(monkeypatch):
    """At inference the dense kernel of a folded conv computes with W·s and the shifted bias: the norm's
    pass over the output is gone there too; in training mode the conv and its norm run as they are."""
    net = _bn_net()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = net(x)
        accelerate(net, chooser=Always("dense"))
        calls = []
        real = nn.BatchNorm2d.forward
        monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, y: calls.append(self) or real(self, y))
        out = net(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert calls == []  # every norm folded, also the one after the dense conv (net[6])
    net.train()
    net(x)
    assert calls == [net[1], net[4], net[7]]  # batch statistics: every norm runs


def test_a_model_that_cannot_be_traced_is_accelerated_without_folding():
    import lcs.layers.kernels as K
    from lcs.layers.kernels import kernel_plan

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    net = Branchy().eval()
    net.conv.weight.data *= torch.rand_like(net.conv.weight) < 0.1
    assert kernel_plan(net) == K.KernelPlan({})
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        ref = net(x)
        assert accelerate(net, chooser=Always("csr")) == 1
        assert torch.allclose(net(x), ref, atol=1e-5) and type(net.bn) is nn.BatchNorm2d


def test_accelerate_traces_once_where_a_conv_may_fold_and_not_with_a_plan(monkeypatch):
    import lcs.layers.kernels as K

    traced = []
    real = K.kernel_plan
    monkeypatch.setattr(K, "kernel_plan", lambda net: traced.append(net) or real(net))
    dense = _bn_net()
    for m in dense.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = torch.randn_like(m.weight)  # every conv dense: they fold their norms all the same
    assert accelerate(dense, chooser=Always("csr")) == 0 and len(traced) == 1
    assert all(type(dense[i]) is K.FoldedBatchNorm2d for i in (1, 4, 7)) and kernel_report(dense) == {}
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = dense_kernels(copy.deepcopy(dense))(x)  # outputs in the hundreds: float32 folding error scales with them
        assert torch.allclose(dense(x), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    plan = real(_bn_net())
    assert accelerate(_bn_net(), chooser=Always("csr"), plan=plan) == 2 and len(traced) == 1  # given: not traced
    assert accelerate(nn.Sequential(nn.Linear(4, 4)), chooser=Always("csr")) == 0 and len(traced) == 1  # no conv


@needs_numba
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (1, 2, 0), (3, 1, 0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_direct_conv_adds_a_residual_in_its_pass(k, stride, padding, batch):
    g = torch.Generator().manual_seed(3 * batch + k)
    conv = nn.Conv2d(6, 10, k, stride=stride, padding=padding)
    conv.weight.data = _sparse_weight(conv.weight.shape, 0.1, g)
    x = torch.randn(batch, 6, 13, 11, generator=g)
    with torch.no_grad():
        ref = conv(x)
        residual = torch.randn(ref.shape, generator=g)
        w = direct.DirectWeight(conv.weight, conv.stride)
        out = direct.direct_conv2d(x, w, conv, conv.bias, residual)
        broadcast = direct.direct_conv2d(x, w, conv, conv.bias, residual[:1, :, :1])  # torch's add, broadcasting
    assert torch.allclose(out, ref + residual, atol=1e-5)
    assert torch.allclose(broadcast, ref + residual[:1, :, :1], atol=1e-5)


class _Block(nn.Module):
    """A residual block whose add reads a conv's BatchNorm (ResNet18's layout) and one whose add reads
    the conv itself (cPreResNet20's), plus an add nothing can fuse (both operands from one conv)."""

    def __init__(self, norm_last: bool):
        super().__init__()
        self.norm_last = norm_last
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return (self.bn2(y) if self.norm_last else y) + x


def _residual_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(True), _Block(False), nn.Conv2d(8, 8, 1))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data *= torch.rand_like(m.weight) < 0.1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("kernel", [pytest.param("direct", marks=needs_numba), "csr", "dense"])
@pytest.mark.parametrize("batch", [1, 4])
def test_residual_adds_are_fused_into_sparse_convs_and_compute_the_same(kernel, batch):
    from lcs.layers.kernels import kernel_plan

    net = _residual_net()
    plan = kernel_plan(net)
    # conv2 adds the residual; conv1 applies the ReLU after its folded norm
    assert {k: v[1] for k, v in plan.forwards.items()} == {"1": {"1.conv1", "1.conv2"}, "2": {"2.conv1", "2.conv2"}}
    x = torch.randn(batch, 3, 9, 9)
    with torch.no_grad():
        ref = net(x)
        accelerate(net, chooser=Always(kernel))
        net(x)  # first use builds the folded weights (with adds of their own)
        calls = []
        real, real_ = torch.Tensor.__add__, torch.Tensor.add_
        torch.Tensor.__add__ = lambda a, b: calls.append(1) or real(a, b)
        torch.Tensor.add_ = lambda a, b: calls.append(1) or real_(a, b)
        try:
            out = net(x)
        finally:
            torch.Tensor.__add__, torch.Tensor.add_ = real, real_
    assert torch.allclose(out, ref, atol=1e-5)
    assert (calls == []) == (kernel == "direct")  # the direct kernel adds in its pass; the others add after
    assert "forward" in net[1].__dict__ and "forward" in net[2].__dict__ and "forward" not in net.__dict__
    twin = copy.deepcopy(net)  # the copy runs its own blocks
    assert twin[1].forward.__self__ is twin[1]
    with torch.no_grad():
        assert torch.allclose(twin(x), ref, atol=1e-5)
    net.train()  # autograd: the modules and the add as the model wrote them
    assert torch.allclose(net(x), dense_kernels(copy.deepcopy(net))(x), atol=1e-5)
    dense_kernels(net)
    assert not any("forward" in m.__dict__ or "lcs_fused" in m.__dict__ for m in net.modules())


def test_a_block_keeps_its_own_forward_where_its_fused_conv_stays_dense():
    net = _residual_net()
    for conv in (net[2].conv1, net[2].conv2):  # the block's fused convs dense, with no norm to fold: unchanged
        conv.weight.data = torch.randn_like(conv.weight)
    net[2].bn1 = nn.GroupNorm(2, 8)
    accelerate(net, chooser=Always("csr"))
    assert "forward" in net[1].__dict__ and "forward" not in net[2].__dict__


@needs_numba
def test_the_first_compiled_kernel_call_keeps_torchs_thread_count():
    """numba's OpenMP layer starts inside torch's libgomp and sets its thread count to every core;
    a count lowered before (a ThreadGovernor under contention) must survive. A fresh process: the
    layer starts once per process."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch import nn\n"
        "from lcs.layers import direct\n"
        "conv = nn.Conv2d(16, 16, 1, bias=False)\n"
        "w = direct.DirectWeight(conv.weight.detach(), conv.stride)\n"
        "x = torch.randn(1, 16, 8, 8)\n"
        "torch.set_num_threads(1)\n"
        "y = direct.direct_conv2d(x, w, conv, None)\n"
        "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
        "assert torch.allclose(y, conv(x), atol=1e-5)\n"
        "if __import__('os').cpu_count() >= 2:  # a raised count is kept too\n"
        "    torch.set_num_threads(2)\n"
        "    direct.direct_conv2d(x, w, conv, None)\n"
        "    assert torch.get_num_threads() == 2\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_numba
@pytest.mark.parametrize("k,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_direct_conv_applies_the_norm_and_relu_before_it_and_the_relu_after_it(k, stride, batch, with_residual):
    g = torch.Generator().manual_seed(7 * batch + k + stride)
    conv = nn.Conv2d(12, 10, k, stride=stride, padding=0)  # unpadded: the prologue's precondition
    conv.weight.data = _sparse_weight(conv.weight.shape, 0.3, g)  # > 8 nonzeros per output: both loops
    bn = nn.BatchNorm2d(12).eval()
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.3, 2, generator=g)
    bn.weight.data.uniform_(-1, 1.5, generator=g)  # negative scales too: the ReLU sits after the affine map
    bn.bias.data.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(batch, 12, 13, 11, generator=g)
    with torch.no_grad():
        ref = conv(torch.relu(bn(x)))
        residual = torch.randn(ref.shape, generator=g) if with_residual else None
        ref = torch.relu(ref + residual if with_residual else ref)
        w = direct.DirectWeight(conv.weight, conv.stride)
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        t = bn.bias - bn.running_mean * s
        chan = torch.from_numpy(w.chan)
        out = direct.direct_conv2d(x, w, conv, conv.bias, residual,
                                   prologue=(s[chan].numpy(), t[chan].numpy()), relu=True)
    assert (out >= 0).all()
    assert torch.allclose(out, ref, atol=1e-5)
    padded = nn.Conv2d(12, 10, 3, padding=1)
    with pytest.raises(ValueError, match="unpadded"):
        direct.direct_conv2d(x, direct.DirectWeight(padded.weight, (1, 1)), padded, None,
                             prologue=(s[chan].numpy(), t[chan].numpy()))


def _fusions(net: nn.Module) -> dict[str, tuple]:
    from lcs.graph import conv_fusions, trace

    graph, modules = trace(net, "test")
    name = lambda n: n.target if n is not None else None  # noqa: E731
    return {f.conv.target: (name(f.pre_norm), name(f.norm), f.residual is not None, f.relu)
            for f in conv_fusions(graph, modules, (nn.BatchNorm2d,))}


def test_conv_fusions_find_the_pre_activation_and_post_activation_chains():
    pre = _fusions(lcs.models.create("cpreresnet20", num_classes=10, norm="bn").blocks[0])
    # norm1 → ReLU → conv1 (1×1): read by conv1; the 3×3 conv2 is padded: its ReLU is conv1's epilogue
    assert pre["conv1"] == ("norm1", "norm2", False, True)
    assert pre["conv2"] == (None, "norm3", False, True)
    assert pre["conv3"] == (None, None, True, False)  # conv3 adds the shortcut conv's output
    assert "shortcut" not in pre
    post = _fusions(lcs.models.create("resnet18", num_classes=10, norm="bn").layer2[0])
    assert post["conv1"] == (None, "bn1", False, True)
    assert post["conv2"] == (None, "bn2", True, True)  # relu(bn2(conv2(y)) + identity)


@pytest.mark.parametrize("kernel", [pytest.param("direct", marks=needs_numba), "csr", "dense"])
@pytest.mark.parametrize("batch", [1, 5])
def test_a_pre_activation_network_on_fused_kernels_equals_the_dense_network(kernel, batch):
    torch.manual_seed(batch)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10, norm="bn"),
                      lcs.UnstructuredConfig(geometry="point", d_min=0.05))
    for m in sub.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    sub.model.eval()
    net = lcs.materialize(sub, 0.05, kernels="dense")
    x = torch.randn(batch, 3, 32, 32)
    norm_calls = []
    with torch.no_grad():
        ref = net(x)
        fast = copy.deepcopy(net)
        accelerate(fast, chooser=Always(kernel))
        fast(x)
        hook = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: norm_calls.append(m) if type(m) is nn.BatchNorm2d else None)
        try:
            out = fast(x)
        finally:
            hook.remove()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert out.argmax(1).tolist() == ref.argmax(1).tolist()
    # norm2 / norm3 fold into the convs; each block's norm1 is computed by the direct kernel as conv1
    # reads its input (the other kernels run it as a module first); the last norm reads no conv
    norm1s = [b.norm1 for b in fast.blocks] if kernel != "direct" else []
    assert norm_calls == [*norm1s, fast.norm]


@pytest.mark.parametrize("winner", ["channels_last", "nchw"])
def test_a_dense_network_runs_in_the_layout_that_measured_faster_and_remembers_it(tmp_path, monkeypatch, winner):
    from lcs.layers import kernels as K

    timings = {"channels_last": 1.0, "nchw": 2.0} if winner == "channels_last" else {"channels_last": 1.0, "nchw": 1.02}
    measured = []
    monkeypatch.setattr(K._Layout, "_measure", lambda self, module, x: measured.append(x.shape) or dict(timings))
    torch.manual_seed(0)
    net = lcs.models.create("cpreresnet20", num_classes=10, norm="bn").eval()
    seen = []
    net.stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        chooser = KernelChooser(path=str(tmp_path / "kernels.json"))
        assert accelerate(net, chooser=chooser) == 0  # nothing sparse: the layout is the only choice
        seen.clear()
        out = net(x)
        net(x)
    assert measured == [x.shape]  # once per input shape
    # channels-last must win by 5 %: 1.0 against 1.02 keeps the default layout
    assert seen == ([False, False] if winner == "channels_last" else [True, True])
    assert out.is_contiguous() and torch.allclose(out, ref, atol=1e-5)
    assert K.layout_report(net) == {tuple(x.shape): winner}
    twin = copy.deepcopy(net)  # a copy keeps the decisions and shares the cache
    with torch.no_grad():
        assert torch.allclose(twin(x), ref, atol=1e-5)
    again = lcs.models.create("cpreresnet20", num_classes=10, norm="bn").eval()
    accelerate(again, chooser=KernelChooser(path=str(tmp_path / "kernels.json")))  # a new process: read, not measured
    with torch.no_grad():
        again(x)
    assert measured == [x.shape] and K.layout_report(again) == {tuple(x.shape): winner}
    dense_kernels(net)
    assert K.layout_report(net) is None and not net._forward_pre_hooks


def test_the_layout_is_not_measured_in_training_nor_where_it_is_fixed(monkeypatch):
    from lcs.layers import kernels as K

    monkeypatch.setattr(K._Layout, "_measure", lambda *a: pytest.fail("measured"))
    net = lcs.models.create("cpreresnet20", num_classes=10, norm="bn")
    accelerate(net, chooser=KernelChooser(path=""))
    net.train()
    net(torch.randn(2, 3, 16, 16))  # training, with autograd: the input as given
    assert K.layout_report(net) == {}
    fixed = lcs.models.create("cpreresnet20", num_classes=10, norm="bn").eval()
    accelerate(fixed, chooser=KernelChooser(path=""), channels_last=False)
    assert K.layout_report(fixed) is None and not fixed._forward_pre_hooks


class _PlanChooser(Always):
    """Per-layer csr / direct, and the whole-plan choice taken from ``winner`` after a real measurement."""

    def __init__(self, kernel: str, winner: str):
        super().__init__(kernel)
        self.winner, self.timings = winner, []

    def layout(self, signature, x, measure):
        self.timings.append(measure())
        return self.winner == "channels_last"


@pytest.mark.parametrize("winner", ["channels_last", "nchw"])
@pytest.mark.parametrize("kernel", [pytest.param("direct", marks=needs_numba), "csr"])
def test_a_network_with_sparse_layers_runs_the_plan_that_measured_faster(winner, kernel):
    """Either every layer on its own kernel in NCHW, or all dense channels-last: same outputs."""
    from lcs.layers import kernels as K

    net = _residual_net()
    x = torch.randn(3, 3, 9, 9)
    sparse_inputs = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda m, a: sparse_inputs.append(a[0].is_contiguous()))
    with torch.no_grad():
        ref = net(x)
        chooser = _PlanChooser(kernel, winner)
        n = accelerate(net, chooser=chooser)
        assert n == 6 and K.layout_report(net) == {}
        out = net(x)
        sparse_inputs.clear()
        again = net(x)
    (timings,) = chooser.timings  # measured once for this shape, both plans timed
    assert set(timings) == {"nchw", "channels_last"} and all(0 < t < math.inf for t in timings.values())
    assert K.layout_report(net) == {tuple(x.shape): winner}
    assert K.layout_at(net, 3) == winner and K.layout_at(net, 5) == "nchw"  # batch 5: not decided yet
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(again, ref, atol=1e-5) and out.is_contiguous()
    report = kernel_report(net)
    want = "dense" if winner == "channels_last" else kernel
    assert report and all(d == {3: want} for d in report.values()), report
    # all-dense plan: the convs read channels-last activations; own plan: NCHW planes
    assert sparse_inputs and all(c == (winner == "nchw") for c in sparse_inputs[1:])
    twin = copy.deepcopy(net)  # the copy's hook sets the copy's layers, not the original's
    hook = next(h for h in twin._forward_pre_hooks.values() if isinstance(h, K._Layout))
    assert {id(m) for m in hook.sparse} == {id(m) for m in twin.modules() if isinstance(m, K._SparseMixin)}
    with torch.no_grad():
        assert torch.allclose(twin(x), ref, atol=1e-5)


def test_finishing_steps_write_in_place_only_into_fresh_outputs():
    """The add and ReLUs after a kernel reuse its fresh output; never an input, never under autograd."""
    from lcs.layers.kernels import _finish, _relu_fresh

    y, res = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    want = torch.relu(y + res)
    out = _finish(y, res, relu=True)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, want)  # written into the kernel's output
    x = torch.randn(2, 4, 3, 3)
    kept = x.clone()
    assert torch.equal(_relu_fresh(x, x), torch.relu(kept)) and torch.equal(x, kept)  # a pass-through norm
    g = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = _finish(g * 1, res, relu=True)
    out.sum().backward()
    assert torch.equal(g.grad, ((g + res) > 0).float())  # autograd: out of place, the gradient intact
    bcast = torch.randn(1, 4, 1, 1)
    assert torch.allclose(_finish(torch.ones(2, 4, 3, 3), bcast, relu=False), 1 + bcast.expand(2, 4, 3, 3))


def test_the_dense_kernel_reads_a_channels_last_weight_for_channels_last_inputs_and_follows_weight_changes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
    net[1].running_var.uniform_(0.5, 2.0)
    ref = copy.deepcopy(net)
    accelerate(net, chooser=Always("dense"), channels_last=True)
    x = torch.randn(2, 4, 7, 7)
    folded = net[0]
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)
        copy_ = folded.__dict__["lcs_effective_cl"][2]
        assert copy_.is_contiguous(memory_format=torch.channels_last) and not copy_.is_contiguous()
        assert torch.equal(copy_, folded.effective()[0])
        assert torch.equal(folded._dense_weight(x.contiguous())[0], folded.effective()[0])  # NCHW: as built
        plain = net[3]  # no norm after it: accelerate leaves it an nn.Conv2d
        assert type(plain) is nn.Conv2d
    sparse = nn.Conv2d(6, 5, 1)
    sparse.__class__ = SparseConv2d
    sparse.__dict__.update(lcs_density=1.0, lcs_decisions={}, lcs_chooser=None)
    xc = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = sparse.run("dense", xc)
        sparse.weight.mul_(2)  # changed in place: the channels-last copy follows
        second = sparse.run("dense", xc)
        want = torch.nn.functional.conv2d(xc.contiguous(), sparse.weight, sparse.bias)
    assert torch.allclose(second, want, atol=1e-5) and not torch.allclose(first, second)
