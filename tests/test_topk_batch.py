"""One compiled TopK for many tensors (``lcs.layers.topk_batch``): the same kept entries as the
per-tensor ``topk_sparsify`` of training, against a full sort, and where the kernel steps aside."""

import pytest
import torch

import lcs
from lcs.deploy.bake import Baker
from lcs.layers import topk_batch
from lcs.layers.topk_batch import topk_sparsify_many
from lcs.ops import num_kept, topk_sparsify

needs_kernel = pytest.mark.skipif(topk_batch._kernel() is None, reason="numba is not installed")

SIZES = [(1,), (2,), (7,), (100,), (33, 5), (64, 16, 1, 1), (16, 16, 3, 3), (64, 64, 3, 3)]
DENSITIES = [0.025, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()) \
        and torch.equal(a.isnan(), b.isnan())


@needs_kernel
@pytest.mark.parametrize("density", DENSITIES)
def test_equals_per_tensor_topk_and_a_full_sort(density):
    torch.manual_seed(int(density * 1000))
    ws = [torch.randn(s) * 10.0 ** torch.randint(-6, 3, ()).item() for s in SIZES]
    out = topk_sparsify_many(ws, [density] * len(ws))
    for w, o in zip(ws, out, strict=True):
        assert _same(o, topk_sparsify(w, density))
        k = num_kept(w.numel(), density)
        assert int((o != 0).sum()) == k  # count exact
        mags = w.abs().flatten().sort(descending=True).values  # slow reference
        kept = o != 0
        assert torch.all(w.abs()[kept] >= mags[k - 1]) and torch.equal(o[kept], w[kept])
        assert not torch.any(o[~kept].signbit())  # dropped entries are +0.0, as torch's path writes


@needs_kernel
def test_each_tensor_takes_its_own_density():
    torch.manual_seed(1)
    ws = [torch.randn(40, 9) for _ in range(5)]
    ds = [0.05, 1.0, 0.5, 0.0125, 0.3]
    for w, d, o in zip(ws, ds, topk_sparsify_many(ws, ds), strict=True):
        assert _same(o, topk_sparsify(w, d))
    assert topk_sparsify_many(ws[1:2], [1.0])[0] is ws[1]  # kept whole: returned as it is, like topk_sparsify


@needs_kernel
def test_ties_nonfinite_and_other_dtypes_equal_the_training_path():
    torch.manual_seed(2)
    tied = torch.randint(-3, 4, (500,)).float()  # equal magnitudes straddle the k-th place
    spaced = torch.cat([torch.full((10,), 5.0), torch.randn(90) * 0.1])  # ties above the k-th place only
    nan = torch.tensor([1.0, float("nan"), 2.0, -4.0, 0.5])
    inf = torch.tensor([1.0, float("inf"), -3.0, 0.25])
    negzero = torch.tensor([-0.0, 0.0, -0.0, 1.0, -2.0])
    double = torch.randn(300, dtype=torch.float64)
    ws = [tied, spaced, nan, inf, negzero, double]
    for d in (0.1, 0.4, 0.6):
        for w, o in zip(ws, topk_sparsify_many(ws, [d] * len(ws)), strict=True):
            assert _same(o, topk_sparsify(w, d)), (w, d)


def test_without_numba_the_result_is_the_same(monkeypatch):
    torch.manual_seed(3)
    ws = [torch.randn(s) for s in SIZES]
    want = topk_sparsify_many(ws, [0.2] * len(ws))
    monkeypatch.setattr(topk_batch, "_kernel", lambda: None)
    for w, a, b in zip(ws, want, topk_sparsify_many(ws, [0.2] * len(ws)), strict=True):
        assert _same(a, b) and _same(b, topk_sparsify(w, 0.2))


@pytest.mark.parametrize("regime", ["unstructured", "sparse_quantized"])
def test_a_bake_selects_every_layer_in_one_call_and_equals_the_subspace(monkeypatch, regime):
    torch.manual_seed(4)
    model = lcs.models.create("cpreresnet20", num_classes=10, norm="gn")
    config = lcs.UnstructuredConfig(d_min=0.025) if regime == "unstructured" else lcs.SparseQuantizedConfig()
    sub = lcs.convert(model, config)
    sub.model.eval()
    calls = []
    real = topk_batch.topk_sparsify_many
    monkeypatch.setattr(topk_batch, "topk_sparsify_many", lambda ws, ds: calls.append(len(ws)) or real(ws, ds))
    baker = Baker(sub)
    calls.clear()  # the Baker's warm-up call
    x = torch.randn(2, 3, 32, 32)
    for alpha in (0.1, 0.55):
        net = baker.network(alpha)
        sub.move(alpha)
        with torch.no_grad():
            assert torch.allclose(net(x), sub.model(x), atol=1e-5, rtol=1e-5)
    assert calls == [len(sub.compressed)] * 2
