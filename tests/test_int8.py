"""Integer kernels for quantized networks: exact weight codes, the int8 conv against a float
reference of the same codes, chains found in the dataflow, and whole networks that compute what
the float-simulated network computes (up to rounding ties)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lcs
from lcs.graph import conv_chains, trace
from lcs.layers import int8
from lcs.layers.kernels import KernelChooser, accelerate, dense_kernels, int8_layer_count, kernel_report
from lcs.layers.quant import affine_qparams, attach_layer_quant, fake_quantize_values, set_activation_quant

needs_int8 = pytest.mark.skipif(not int8.available(), reason="no x86 int8 engine in this torch build, or a CPU "
                                "without exact u8·s8 sums (VNNI / AMX)")


class Prefer(KernelChooser):
    """Picks ``kernel`` wherever it can run, else dense: decisions that do not depend on timing."""

    def __init__(self, kernel: str):
        super().__init__(path="")
        self.kernel = kernel

    def decide(self, layer, x, **_):
        return self.kernel if self.kernel in self.candidates(layer) else "dense"


def _on_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` fake-quantized on its own b-bit grid (as a quantized lcs layer stores it), and the grid."""
    scale, zp = affine_qparams(*torch.aminmax(w), bits)
    return fake_quantize_values(w, float(scale), int(zp), bits), scale, zp


def _quantized_conv(cin, cout, k, bits, gen, stride=1, padding=0, bias=True) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    w, scale, zp = _on_grid(torch.randn(conv.weight.shape, generator=gen) * 0.2, bits)
    conv.weight.data = w
    if bias:
        conv.bias.data = torch.randn(cout, generator=gen) * 0.1
    lq = attach_layer_quant(conv, bits=bits)
    lq.set_weight_qparams(scale, zp)
    return conv


@needs_int8
@pytest.mark.parametrize("bits", [3, 4, 7, 8])
def test_packed_weight_is_the_exact_grid(bits):
    g = torch.Generator().manual_seed(bits)
    conv = _quantized_conv(8, 6, 3, bits, g, padding=1)
    packed = int8.pack_weight(conv, conv.lcs_quant)
    assert packed is not None
    wq, b = torch.ops.quantized.conv2d_unpack(packed)
    assert torch.equal(wq.dequantize(), conv.weight.detach())
    assert torch.equal(b, conv.bias.detach())


@needs_int8
def test_weight_off_the_grid_is_not_packed():
    g = torch.Generator().manual_seed(0)
    conv = _quantized_conv(4, 4, 1, 4, g)
    conv.weight.data[0, 0, 0, 0] += 1e-3  # no longer on the recorded grid: nothing is re-rounded silently
    assert int8.pack_weight(conv, conv.lcs_quant) is None


@needs_int8
@pytest.mark.parametrize("bits_in,bits_out", [(8, 8), (4, 3), (3, 5)])
@pytest.mark.parametrize("stride", [1, 2])
def test_int8_conv_codes_equal_the_float_reference(bits_in, bits_out, stride):
    g = torch.Generator().manual_seed(bits_in * 10 + bits_out + stride)
    conv = _quantized_conv(16, 12, 3, 8 if bits_in == 8 else 5, g, stride=stride, padding=1)
    x = torch.randn(2, 16, 9, 9, generator=g)
    s_in, z_in = affine_qparams(torch.tensor(-1.5), torch.tensor(2.0), bits_in)
    s_out, z_out = affine_qparams(torch.tensor(-0.5), torch.tensor(3.0), bits_out)
    grid_in = int8.Grid(float(s_in), int(z_in), bits_in)
    grid_out = int8.Grid(float(s_out), int(z_out), bits_out)
    q = int8.quantize_input(x, grid_in)
    xq = fake_quantize_values(x, grid_in.scale, grid_in.zero_point, bits_in)  # what the float network reads
    assert torch.allclose(q.dequantize(), xq, atol=1e-6)
    y = int8.int8_conv2d(q, int8.pack_weight(conv, conv.lcs_quant), grid_out)
    with torch.no_grad():
        ref = torch.round(conv(xq) / grid_out.scale) + grid_out.zero_point  # the hook is a no-op on grid values
    ref = ref.clamp(0, grid_out.qmax)
    codes = y.int_repr().float()
    assert codes.max() <= grid_out.qmax
    off = (codes - ref).abs()
    assert off.max() <= 1  # a rounding tie (or the int32 bias) moves a code by one at most
    assert (off > 0).float().mean() < 1e-3


def _chain_model() -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.relu, self.skip = nn.ReLU(), nn.Identity()

        def forward(self, x):
            y = self.b(self.skip(self.relu(self.a(x))))  # a → ReLU → identity → b: a chain
            z = torch.relu(y)
            return self.c(z) + z  # b's ReLU is read twice: no chain into c

    return Net()


def test_conv_chains_follow_single_reader_relus_and_identities():
    net = _chain_model()
    graph, modules = trace(net, "test")
    assert [(a.target, b.target) for a, b in conv_chains(graph, modules)] == [("a", "b")]


def _quantized_network(seed: int = 0):
    torch.manual_seed(seed)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10, norm="bn"), lcs.QuantizedConfig())
    set_activation_quant(sub.model, True)
    sub.model.train()
    with torch.no_grad():
        for a in (0.0, 0.5, 1.0):  # observe activation ranges at several bit widths
            sub.set_alpha(a)
            sub.model(torch.randn(8, 3, 32, 32))
    sub.model.eval()
    return sub


@needs_int8
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 16])
def test_int8_network_computes_the_float_network(alpha, batch):
    sub = _quantized_network()
    plain = lcs.materialize(sub, alpha)
    fast = copy.deepcopy(plain)
    accelerate(fast, sub.compressed, chooser=Prefer("int8"))
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref, out = plain(x), fast(x)
    # rounding ties move single codes by one step: far below the logits' scale, same predictions
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert torch.equal(out.argmax(1), ref.argmax(1))
    report = kernel_report(fast)
    on_int8 = {fqn for fqn, d in report.items() if d.get(batch) == "int8"}
    # the convs that hand their output to the next conv (1×1 → 3×3 → 1×1); never one before an add
    assert on_int8 == {f"blocks.{i}.{c}" for i in range(6) for c in ("conv1", "conv2")}
    assert int8_layer_count(fast, batch) == 12


@needs_int8
def test_int8_network_copies_trains_dense_and_undoes():
    sub = _quantized_network(1)
    plain = lcs.materialize(sub, 0.5)
    fast = copy.deepcopy(plain)
    accelerate(fast, sub.compressed, chooser=Prefer("int8"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = fast(x)
        assert torch.equal(copy.deepcopy(fast)(x), out)  # a copy packs its own weights, same codes
    y = fast(x)  # autograd: the float kernels with the layers' own fake quantization
    assert torch.allclose(y, plain(x), atol=1e-6)
    assert fast._forward_pre_hooks and out.is_contiguous()  # fed channels-last, hands back the usual layout
    dense_kernels(fast)
    assert not any(m.__dict__.get("lcs_deferred") for m in fast.modules())  # the hooks quantize again
    assert not fast._forward_pre_hooks and not fast._forward_hooks
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), atol=1e-6)


@needs_int8
def test_float_choice_on_a_chain_reads_codes_from_the_conv_before():
    """A consumer left on the float kernel dequantizes the codes it receives: the same values."""
    sub = _quantized_network(2)
    plain = lcs.materialize(sub, 1.0)

    class ProducersOnly(Prefer):
        def decide(self, layer, x, **_):
            return "int8" if "int8" in self.candidates(layer) and not x.is_quantized else "dense"

    fast = copy.deepcopy(plain)
    accelerate(fast, sub.compressed, chooser=ProducersOnly("int8"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = plain(x), fast(x)
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
    report = kernel_report(fast)
    assert report["blocks.0.conv1"][2] == "int8" and report["blocks.0.conv2"][2] == "dense"


def test_no_int8_kernel_where_the_cpu_sums_inexactly(monkeypatch):
    """Without VNNI / AMX the int8 kernels saturate their int16 pair sums: float kernels run instead."""
    monkeypatch.setattr(int8, "_exact_pair_sums", lambda: False)
    assert not int8.available()
    sub = _quantized_network()
    plain = lcs.materialize(sub, 1.0)
    fast = copy.deepcopy(plain)
    accelerate(fast, sub.compressed, chooser=Prefer("int8"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), atol=1e-5)
    assert not any(d.get(2) == "int8" for d in kernel_report(fast).values())


def test_unquantized_layers_get_no_int8_kernel():
    plain = lcs.models.create("cpreresnet20", num_classes=10, norm="bn").eval()
    accelerate(plain, chooser=Prefer("int8"))
    assert int8_layer_count(plain, 1) is None


@needs_int8
def test_loaded_quantized_artifact_runs_its_chains_on_int8(tmp_path):
    """``load_compressed`` freezes the activation grids before choosing kernels: the loaded network
    offers the int8 kernel on its chains and computes what the dense-kernel load computes."""
    sub = _quantized_network(3)
    path = tmp_path / "q.safetensors"
    meta = {"arch": {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "bn"}}, "regime": "quantized"}
    lcs.save_compressed(lcs.materialize(sub, 0.5), path, meta)
    fast, dense = lcs.load_compressed(path), lcs.load_compressed(path, kernels="dense")
    assert fast.blocks[0].conv1.int8_weight() is not None
    fast.blocks[0].conv1.lcs_chooser = fast.blocks[0].conv2.lcs_chooser = Prefer("int8")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = dense(x), fast(x)
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert kernel_report(fast)["blocks.0.conv1"][3] == "int8"


@needs_int8
def test_baked_int8_networks_leave_their_template_alone():
    """``Baker`` networks share their template's hook dicts: the channels-last hooks go in a dict of
    their own, so a later dense-kernel bake has none and computes the float network."""
    sub = _quantized_network(4)
    fast = lcs.materialize(sub, 0.5, kernels="auto")
    dense = lcs.materialize(sub, 0.5)
    assert fast._forward_pre_hooks and not dense._forward_pre_hooks
    assert not any(m.__dict__.get("lcs_deferred") for m in dense.modules())
