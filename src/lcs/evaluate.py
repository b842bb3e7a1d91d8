"""Sweep a trained subspace over α: accuracy and what each compressed network really costs."""

from __future__ import annotations

from typing import Any

import torch

from .artifact import artifact_bytes
from .materialize import materialize
from .stats import count_macs, count_params, sparsity
from .subspace import Subspace

__all__ = ["DEFAULT_GRIDS", "sweep", "evaluate_point"]

DEFAULT_GRIDS = {
    "unstructured": [0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0],
}


def evaluate_point(sub: Subspace, alpha: float, data, device: torch.device, meta: dict[str, Any]) -> dict[str, Any]:
    """One record: the network at α is materialized (a plain model) and measured.

    Accuracy is computed on that plain model, so it is the accuracy of what ``lcs export`` ships.
    """
    from .train import evaluate_accuracy

    level = sub.set_alpha(alpha)
    plain = materialize(sub, alpha).to(device)
    acc, loss = evaluate_accuracy(plain, data, device)
    compressed = dict(plain.named_modules())
    comp_weights = [compressed[fqn].weight for fqn in sub.compressed]
    params, nnz = count_params(plain)
    macs, dense_macs = count_macs(plain, (3, data.image_size, data.image_size))
    return {
        "alpha": alpha,
        sub.config.level_name: level,
        "accuracy": acc,
        "loss": loss,
        "sparsity": sparsity(comp_weights),
        "overall_sparsity": 1.0 - nnz / params,
        "params": params,
        "nonzero_params": nnz,
        "macs": macs,
        "dense_macs": dense_macs,
        "bytes": artifact_bytes(plain.cpu(), {**meta, "alpha": alpha}),
    }


def sweep(sub: Subspace, grid: list[float], data, device: torch.device, meta: dict[str, Any]
          ) -> list[dict[str, Any]]:
    """Records for every α of ``grid`` (see ``evaluate_point``); the subspace's α is restored."""
    old = (sub.state.alpha, sub.state.level)
    try:
        return [evaluate_point(sub, a, data, device, meta) for a in grid]
    finally:
        sub.state.alpha, sub.state.level = old
