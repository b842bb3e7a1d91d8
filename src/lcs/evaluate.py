"""Sweep a trained subspace over α: accuracy and what each compressed network really costs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .artifact import artifact_bytes
from .data import eval_batches
from .materialize import materialize
from .stats import count_macs, count_params, sparsity
from .subspace import Subspace

__all__ = ["DEFAULT_GRIDS", "sweep", "evaluate_point", "evaluate_accuracy"]

DEFAULT_GRIDS = {
    "unstructured": [0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0],
}


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data, device: torch.device,
                      batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the validation split."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in eval_batches(data, "val", batch_size, device=device):
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return correct / max(total, 1), loss / max(total, 1)


def evaluate_point(sub: Subspace, alpha: float, data, device: torch.device, meta: dict[str, Any]) -> dict[str, Any]:
    """One record: the network at α is materialized (a plain model) and measured.

    Accuracy is computed on that plain model, so it is the accuracy of what ``lcs export`` ships.
    """
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
