"""Pure tensor math: compression functions and the subspace regularizer.

Nothing here knows about modules or α; everything is unit-tested against slow references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["num_kept", "topk_mask", "topk_sparsify", "cos2"]


def num_kept(numel: int, density: float) -> int:
    """Weights kept at ``density``: all but the ⌊(1 − d)·n⌋ smallest (SPEC §1).

    The product is rounded to 9 significant decimals first so that e.g. (1 − 0.9)·100, which is
    9.999999999999998 in floating point, counts as 10 and not 9.
    """
    return numel - math.floor(round((1.0 - density) * numel, 9))


def topk_mask(weight: torch.Tensor, k: int) -> torch.Tensor:
    """A mask (same dtype as ``weight``) with exactly ``k`` ones at the largest magnitudes.

    Uses ``torch.topk`` (partial selection, not a full sort). Ties are broken by the selection,
    so the count is exact even when many magnitudes are equal. Selects whichever side is smaller.
    """
    n = weight.numel()
    if k >= n:
        return torch.ones_like(weight)
    if k <= 0:
        return torch.zeros_like(weight)
    flat = weight.detach().abs().flatten()
    if k <= n // 2:
        idx = torch.topk(flat, k, largest=True, sorted=False).indices
        mask = torch.zeros_like(flat)
        mask.index_fill_(0, idx, 1.0)
    else:
        idx = torch.topk(flat, n - k, largest=False, sorted=False).indices
        mask = torch.ones_like(flat)
        mask.index_fill_(0, idx, 0.0)
    return mask.view_as(weight)


def topk_sparsify(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``num_kept(n, density)`` largest-magnitude entries.

    The gradient flows to the kept entries only (the mask is a constant), as in the reference.
    """
    n = weight.numel()
    k = num_kept(n, density)
    if k >= n:
        return weight
    if weight.requires_grad and torch.is_grad_enabled():
        return weight * topk_mask(weight, k)
    return _topk_kept(weight, k)


def _topk_kept(weight: torch.Tensor, k: int) -> torch.Tensor:
    """``weight * topk_mask(weight, k)`` without the mask or the multiply (the same selection, so the
    same values): the no-grad path a deploy-time switch takes, one memory pass fewer per layer."""
    n = weight.numel()
    if k <= 0:
        return torch.zeros_like(weight)
    flat = weight.detach().flatten()
    if k <= n // 2:
        idx = torch.topk(flat.abs(), k, largest=True, sorted=False).indices
        return torch.zeros_like(flat).index_copy_(0, idx, flat.index_select(0, idx)).view_as(weight)
    idx = torch.topk(flat.abs(), n - k, largest=False, sorted=False).indices
    return flat.clone().index_fill_(0, idx, 0.0).view_as(weight)


def cos2(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """cos²(θ₀, θ₁) over the concatenation of all pairs, without materializing the concatenation.

    The regularizer of Wortsman et al. (2021): pushing the endpoints apart makes the line span
    genuinely different networks instead of collapsing to one point.
    """
    if not pairs:
        raise ValueError("cos2 needs at least one (θ₀, θ₁) pair")
    dot = sum((a * b).sum() for a, b in pairs)
    n0 = sum((a * a).sum() for a, _ in pairs)
    n1 = sum((b * b).sum() for _, b in pairs)
    return dot * dot / (n0 * n1).clamp_min(1e-24)
