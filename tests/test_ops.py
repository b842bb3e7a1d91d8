import math

import pytest
import torch

from lcs.ops import cos2, num_kept, topk_mask, topk_sparsify


def _reference_kept(n: int, density: float) -> int:
    # SPEC: zero the floor((1-d) n) smallest; decimal arithmetic avoids float surprises.
    from fractions import Fraction

    return n - math.floor((1 - Fraction(str(density))) * n)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 4608])
@pytest.mark.parametrize("density", [0.025, 0.05, 0.1, 0.3, 0.5, 0.9, 0.95, 1.0])
def test_num_kept_matches_exact_arithmetic(n, density):
    assert num_kept(n, density) == _reference_kept(n, density)


@pytest.mark.parametrize("density", [0.025, 0.1, 0.5, 0.75, 0.975])
def test_topk_count_exact_and_keeps_largest(density):
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    out = topk_sparsify(w, density)
    k = num_kept(w.numel(), density)
    assert int((out != 0).sum()) == k
    # slow reference: full sort of magnitudes
    thresh = w.abs().flatten().sort(descending=True).values[k - 1]
    kept = out != 0
    assert torch.all(w.abs()[kept] >= thresh)
    assert torch.all(w.abs()[~kept] <= thresh)
    assert torch.equal(out[kept], w[kept])


def test_topk_count_exact_with_ties():
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, -0.5, 0.5, 2.0, 0.0, 0.0])
    for k in range(0, 11):
        mask = topk_mask(w, k)
        assert int(mask.sum()) == k
    # All equal magnitudes: still exactly k survive.
    w = torch.ones(1000)
    assert int((topk_sparsify(w, 0.1) != 0).sum()) == 100


def test_topk_gradient_flows_only_to_kept():
    w = torch.randn(50, requires_grad=True)
    out = topk_sparsify(w, 0.2)
    out.sum().backward()
    assert torch.equal(w.grad, (out != 0).float())


def test_cos2_matches_hand_computation():
    a1, b1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    a2, b2 = torch.tensor([[2.0]]), torch.tensor([[0.0]])
    # concatenated: a = (1, 0, 2), b = (1, 1, 0): dot 1, |a|^2 5, |b|^2 2 -> cos^2 = 1/10
    assert float(cos2([(a1, b1), (a2, b2)])) == pytest.approx(0.1)
    assert float(cos2([(a1, a1)])) == pytest.approx(1.0)
    assert float(cos2([(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]))])) == pytest.approx(0.0)


@pytest.mark.parametrize("density", [0.0001, 0.025, 0.5, 0.5001, 0.9, 0.999])
def test_topk_no_grad_path_equals_masked_weight(density):
    # A deploy-time switch (no grad) skips the mask; the values must be those training computes.
    torch.manual_seed(1)
    w = torch.randn(32, 16, 3, 3)
    w[0, 0] = 0.25  # ties across the threshold's neighbourhood
    k = num_kept(w.numel(), density)
    with torch.no_grad():
        fast = topk_sparsify(w, density)
    reference = w * topk_mask(w, k)
    assert torch.equal(fast, reference)
    assert int((fast != 0).sum()) == k
    assert fast.shape == w.shape
