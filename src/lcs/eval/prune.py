"""The LEC baseline (network slimming, Liu et al. 2017): after dense training with an L1 penalty on
norm scales, keep the channels whose |γ| clears one global threshold and build the physically
slim network, with no fine-tuning.

Which channels can go is read off the model's graph (``torch.fx``): a norm is prunable when it
normalizes the output of a conv that nothing else reads, and its output reaches only convs
(through ReLUs). Pruning channel c then removes the producer's output channel c, the norm's
channel c and every consumer's input channel c. Norms on residual streams are left whole.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import LcsError
from ..graph import is_plain_conv, norms_after_convs, trace
from ..subspace import NORM_TYPES, Subspace

__all__ = ["PrunableNorm", "prunable_norms", "prune_by_norm_scale", "sweep_keep"]


@dataclass(frozen=True)
class PrunableNorm:
    norm: str
    producer: str
    consumers: tuple[str, ...]


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def prunable_norms(model: nn.Module) -> list[PrunableNorm]:
    """The norm layers whose channels can be removed physically (see the module docstring)."""
    graph, modules = trace(model, "LEC pruning")
    found = []
    for producer, node in norms_after_convs(graph, modules, NORM_TYPES):
        consumers, frontier, ok = [], list(node.users), True
        while frontier and ok:
            user = frontier.pop()
            if _is_relu(user, modules):
                frontier.extend(user.users)
            elif is_plain_conv(user, modules):
                consumers.append(user.target)
            else:
                ok = False
        if ok and consumers:
            found.append(PrunableNorm(node.target, producer.target, tuple(consumers)))
    return found


def _keep_sets(model: nn.Module, prunable: list[PrunableNorm], keep: float) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    scales = {p.norm: modules[p.norm].weight.detach().abs() for p in prunable}
    everything = torch.cat(list(scales.values()))
    n_keep = max(1, math.ceil(keep * everything.numel()))
    threshold = torch.topk(everything, n_keep).values.min()
    sets = {}
    for name, s in scales.items():
        idx = torch.nonzero(s >= threshold).flatten()
        sets[name] = idx if idx.numel() else s.argmax().view(1)  # never an empty layer
    return sets


@torch.no_grad()
def prune_by_norm_scale(model: nn.Module, keep: float) -> tuple[nn.Module, dict[str, int]]:
    """A physically slim copy of a plain ``model`` keeping the fraction ``keep`` of the prunable
    channels, chosen by |γ| with one global threshold; returns (model, channels kept per norm)."""
    if not (0.0 < keep <= 1.0):
        raise LcsError(f"keep must be in (0, 1], got {keep}")
    prunable = prunable_norms(model)
    if not prunable:
        raise LcsError("no prunable norm found: LEC needs conv → norm → (ReLU) → conv chains")
    slim = copy.deepcopy(model)
    modules = dict(slim.named_modules())
    sets = _keep_sets(slim, prunable, keep)
    for p in prunable:
        idx = sets[p.norm]
        conv, norm = modules[p.producer], modules[p.norm]
        conv.weight = nn.Parameter(conv.weight[idx].clone())
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[idx].clone())
        conv.out_channels = len(idx)
        for name in ("weight", "bias"):
            if getattr(norm, name, None) is not None:
                setattr(norm, name, nn.Parameter(getattr(norm, name)[idx].clone()))
        for name in ("running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                setattr(norm, name, getattr(norm, name)[idx].clone())
        if isinstance(norm, nn.GroupNorm):
            if norm.num_groups not in (1, norm.num_channels):
                raise LcsError(f"cannot prune {p.norm}: GroupNorm with {norm.num_groups} groups")
            norm.num_groups = 1 if norm.num_groups == 1 else len(idx)
            norm.num_channels = len(idx)
        else:
            norm.num_features = len(idx)
        for c in p.consumers:
            consumer = modules[c]
            consumer.weight = nn.Parameter(consumer.weight[:, idx].clone())
            consumer.in_channels = len(idx)
    return slim.eval(), {p.norm: len(sets[p.norm]) for p in prunable}


def sweep_keep(sub: Subspace, keeps: list[float], data, device: torch.device, meta: dict[str, Any],
               latency_batches: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """LEC evaluation: one record per kept fraction, measured on the physically pruned network."""
    from ..deploy.bake import materialize
    from .evaluate import measure_network

    full = materialize(sub, sub.alpha_range[1], (3, data.image_size, data.image_size)).cpu()
    full_params = sum(p.numel() for p in full.parameters())
    records = []
    for keep in keeps:
        slim, _ = prune_by_norm_scale(full, keep)
        record = {"keep": keep, **measure_network(slim.to(device), data, device, {**meta, "keep": keep},
                                                  latency_batches)}
        record["param_reduction"] = 1.0 - record["params"] / full_params
        records.append(record)
    return records
