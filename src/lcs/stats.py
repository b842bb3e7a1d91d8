"""Counting what a compressed network costs: parameters, nonzeros, multiply-accumulates.

Definitions (per image):
  * ``params``: every parameter entry of the network, zero or not;
  * ``nonzero_params``: parameter entries that are not exactly zero;
  * ``macs``: multiply-accumulates of Conv2d/Linear layers counting only nonzero weights
    (nnz(W) × output positions), i.e. what a sparse kernel has to do;
  * ``dense_macs``: the same with every weight counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["count_params", "count_macs", "sparsity"]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(params, nonzero_params) over all parameters."""
    total = nnz = 0
    for p in model.parameters():
        total += p.numel()
        nnz += int(torch.count_nonzero(p.detach()))
    return total, nnz


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(macs, dense_macs) of one forward pass on a single input of ``input_shape`` (C, H, W)."""
    macs = dense = 0

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs, dense
        positions = out[0, 0].numel() if isinstance(module, nn.Conv2d) else out[..., 0].numel() // out.shape[0]
        macs += int(torch.count_nonzero(module.weight)) * positions
        dense += module.weight.numel() * positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs, dense


def sparsity(weights: Iterable[torch.Tensor]) -> float:
    """Fraction of exactly-zero entries over the concatenation of ``weights``."""
    zeros = total = 0
    for w in weights:
        zeros += w.numel() - int(torch.count_nonzero(w.detach()))
        total += w.numel()
    return zeros / max(total, 1)
