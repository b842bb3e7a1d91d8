"""BatchNorm running statistics keyed by the compression level (switchable BN).

One set of running statistics cannot be right for every point of a subspace: the activations of
a 3-bit or a 2.5 %-dense network are not distributed like the dense network's. Slimmable networks
keep one BN per width; here every BatchNorm with running statistics keeps one row per *level
bin* (``lcs_running_mean``/``lcs_running_var`` of shape (rows, C)), and the bin of the current
level picks the row: its ``running_mean``/``running_var`` are views of that row, so BatchNorm's
own in-place updates land there. A plain network at α carries only its own row
(``freeze_bn_stats``), so deployment needs no recalibration and nothing lcs-specific.

The regime says how many rows and which row a point falls in (``RegimeConfig.stats_rows`` /
``stats_row(alpha, levels)``): one per bit width for quantization, log-spaced bins of α for
unstructured sparsity (on a line α also moves the weights, so the bin follows α, not only the
density: keyed by density, a line's dense end shared its statistics with every α of the warm-up
and scored 0.17 after 2 CIFAR-10 epochs). Deploy side: imports only torch.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["prepare_bn_stats", "select_bn_stats", "freeze_bn_stats", "has_bn_stats", "ROW_BUFFERS"]

_STATS = ("running_mean", "running_var")
ROW_BUFFERS = tuple(f"lcs_{name}" for name in _STATS)  # the (rows, C) buffers in a state dict
_KEY = "lcs_bn_rows"


def select_bn_stats(bn: nn.Module, *args: Any) -> None:
    """Point a BN's ``running_mean``/``running_var`` at the row of the current level (views).
    A forward pre-hook (and called by folding quantizers before their conv runs); a no-op for BNs
    without per-level statistics."""
    owner = bn.__dict__.get(_KEY)
    if owner is None:
        return
    state, config = owner
    row = config.stats_row(state.alpha, state.levels)
    for name in _STATS:
        bn._buffers[name] = bn._buffers[f"lcs_{name}"][row]


def prepare_bn_stats(model: nn.Module, state: Any, config: Any) -> int:
    """Give every BatchNorm with running statistics ``config.stats_rows`` sets of them, saved in
    the state dict in place of ``running_mean``/``running_var``. Returns how many BNs."""
    n = 0
    rows = config.stats_rows
    for m in model.modules():
        if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats):
            continue
        for name in _STATS:
            m.register_buffer(f"lcs_{name}", getattr(m, name).detach().repeat(rows, 1))
        m._non_persistent_buffers_set = m._non_persistent_buffers_set | set(_STATS)
        m.__dict__[_KEY] = (state, config)
        m.register_forward_pre_hook(select_bn_stats, prepend=True)  # before a folding BN's unscaling
        select_bn_stats(m)
        n += 1
    return n


def has_bn_stats(model: nn.Module) -> bool:
    return any(_KEY in m.__dict__ for m in model.modules())


def freeze_bn_stats(model: nn.Module, alpha: float | None = None, levels: dict | None = None) -> nn.Module:
    """Give each BN with per-level statistics the plain ``running_mean``/``running_var`` of the row
    for (``alpha``, ``levels``) (default: its state's current ones) and drop the others, in place,
    replacing dicts rather than mutating them (``Runtime``'s copies share them with their template)."""
    for m in model.modules():
        owner = m.__dict__.get(_KEY)
        if owner is None:
            continue
        state, config = owner
        row = config.stats_row(state.alpha if alpha is None else alpha, state.levels if levels is None else levels)
        m._buffers = {k: (m._buffers[f"lcs_{k}"][row].clone() if k in _STATS else v)
                      for k, v in m._buffers.items() if not k.startswith("lcs_")}
        m._non_persistent_buffers_set = m._non_persistent_buffers_set - set(_STATS)
        del m.__dict__[_KEY]
    return model
