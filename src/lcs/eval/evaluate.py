"""Sweep a trained subspace over α: accuracy and what each compressed network really costs."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..data import eval_batches
from ..data.base import Data
from ..deploy.artifact import artifact_bytes, dense_float32_bytes, network_meta
from ..deploy.bake import materialize
from ..deploy.profile import measure_latency, p90
from ..errors import LcsError
from ..layers.kernels import accelerate, int8_layer_count, layout_at, sparse_layer_count
from ..regimes import Point, RegimeConfig, check_alpha, record_of
from ..stats import count_macs, count_params, sparsity
from ..subspace import Subspace

__all__ = ["default_grid", "sweep", "evaluate_point", "evaluate_accuracy", "norm_stat_gaps",
           "measure_network", "check_grid"]

def default_grid(config: RegimeConfig) -> list[Point]:
    """The regime's default evaluation grid (``Regime.grid``): α values inside the subspace's range,
    or, for points of several levels, level dicts (a density × bits grid)."""
    return list(record_of(config).grid(config))


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data: Data, device: torch.device,
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


@torch.no_grad()
def norm_stat_gaps(model: torch.nn.Module, data: Data, device: torch.device, batches: int = 4,
                   batch_size: int = 256) -> dict[str, dict[str, float]]:
    """How far each BatchNorm's running statistics are from the true statistics of the data at
    the model's current width: per layer, the mean over channels of |running − batch| for the
    mean and the variance, the batch statistics pooled over ``batches`` validation batches."""
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
            x = inp[0].transpose(0, 1).flatten(1)  # C × (N·H·W)
            acc = sums.setdefault(name, [x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0]), x.new_zeros(())])
            acc[0] += x.sum(1)
            acc[1] += (x * x).sum(1)
            acc[2] += x.shape[1]
        return fn

    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    handles = [m.register_forward_hook(hook(n)) for n, m in bns]
    was_training = model.training
    model.eval()
    try:
        for i, (x, _) in enumerate(eval_batches(data, "val", batch_size, device=device)):
            if i >= batches:
                break
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    gaps = {}
    for name, m in bns:
        if name not in sums:
            continue
        s1, s2, n = sums[name]
        k = s1.shape[0]
        mean = s1 / n
        var = s2 / n - mean * mean
        gaps[name] = {"mean_gap": float((m.running_mean[:k] - mean).abs().mean()),
                      "var_gap": float((m.running_var[:k] - var).abs().mean())}
    return gaps


def measure_network(plain: torch.nn.Module, data: Data, device: torch.device, meta: dict[str, Any],
                    latency_batches: tuple[int, ...] = (), compressed: list[str] | None = None) -> dict[str, Any]:
    """Accuracy, loss, size and cost of one plain network (see ``evaluate_point``)."""
    acc, loss = evaluate_accuracy(plain, data, device)
    modules = dict(plain.named_modules())
    comp_weights = [modules[fqn].weight for fqn in (compressed or [])]
    params, nnz = count_params(plain)
    macs, dense_macs = count_macs(plain, (3, data.image_size, data.image_size))
    record: dict[str, Any] = {
        "accuracy": acc,
        "loss": loss,
        "sparsity": sparsity(comp_weights),
        "overall_sparsity": 1.0 - nnz / params,
        "params": params,
        "nonzero_params": nnz,
        "macs": macs,
        "dense_macs": dense_macs,
        "bytes": artifact_bytes(plain.cpu(), meta),
    }
    plain.to(device)
    fast = plain
    if latency_batches and device.type == "cpu" and compressed:  # time what deployment runs: the fast path
        fast = copy.deepcopy(plain)
        accelerate(fast, compressed)
    for b in latency_batches:
        x = torch.zeros(b, 3, data.image_size, data.image_size, device=device)
        times = measure_latency(fast, x, repeats=10, max_seconds=3.0)
        record[f"latency_ms_b{b}"] = statistics.median(times)
        record[f"p90_ms_b{b}"] = p90(times)
        record[f"sparse_layers_b{b}"] = sparse_layer_count(fast, b)
        if fast is not plain:
            record[f"layout_b{b}"] = layout_at(fast, b)
        n8 = int8_layer_count(fast, b)
        if n8 is not None:
            record[f"int8_layers_b{b}"] = n8
    if any(record.get(f"int8_layers_b{b}") for b in latency_batches):
        # integer kernels equal the float network only up to rounding ties: measure what ships too
        record["int8_accuracy"], _ = evaluate_accuracy(fast, data, device)
    gaps = norm_stat_gaps(plain, data, device)
    if gaps:
        record["bn_mean_gap"] = statistics.fmean(g["mean_gap"] for g in gaps.values())
        record["bn_var_gap"] = statistics.fmean(g["var_gap"] for g in gaps.values())
        record["bn_gaps"] = gaps
    return record


def evaluate_point(sub: Subspace, point: Point, data: Data, device: torch.device, meta: dict[str, Any],
                   latency_batches: tuple[int, ...] = ()) -> dict[str, Any]:
    """One record: the network at the point (an α, or a dict of levels) is materialized (a plain
    model) and measured.

    Accuracy is computed on that plain model, so it is the accuracy of what ``lcs export`` ships.
    ``latency_batches``: batch sizes whose median CPU latency (ms) is measured on the plain model.
    BatchNorm models also get the gap between running and true batch statistics (``norm_stat_gaps``).
    """
    levels = sub.move(point)
    alpha = sub.alpha
    plain = materialize(sub, point, (3, data.image_size, data.image_size)).to(device)
    header = network_meta(meta.get("arch"), sub.config.regime, meta.get("method"), alpha, levels)
    where = {"alpha": alpha} if not isinstance(point, Mapping) else {}  # a point of levels has no α of its own
    return {**where, **levels, **measure_network(plain, data, device, header, latency_batches, sub.compressed)}


def check_grid(sub: Subspace, grid: list[Point]) -> list[Point]:
    """Every point of the grid validated before anything is evaluated (a bad last value must not
    cost the whole sweep)."""
    if not grid:
        raise LcsError("the α grid is empty")
    with sub.at(sub.alpha_range[1]):
        for a in grid:
            if isinstance(a, Mapping):
                sub.set_levels(**a)
            else:
                check_alpha(a, *sub.alpha_range)
    return grid


def sweep(sub: Subspace, grid: list[Point], data: Data, device: torch.device, meta: dict[str, Any],
          latency_batches: tuple[int, ...] = (), *, progress: bool = False) -> list[dict[str, Any]]:
    """Records for every point of ``grid`` (see ``evaluate_point``); the subspace's point is
    restored. ``progress``: a tqdm bar over the grid (on stderr)."""
    check_grid(sub, grid)
    old = (sub.state.alpha, dict(sub.state.levels))
    try:
        items = grid
        if progress:
            from tqdm import tqdm

            items = tqdm(grid, desc="eval", unit="α", dynamic_ncols=True, leave=False)
        dense = dense_float32_bytes(materialize(sub, sub.alpha_range[1], (3, data.image_size, data.image_size)))
        records = [evaluate_point(sub, a, data, device, meta, latency_batches) for a in items]
        for r in records:
            r["dense_bytes"] = dense
            r["bytes_pct"] = 100.0 * r["bytes"] / dense  # of the full dense float32 network
        return records
    finally:
        sub.state.alpha, sub.state.levels = old
