"""Structured sparsity: width factor w = w_min + (w_max − w_min)·α; every compressing layer keeps
its first round(w·C_out) output channels (``lcs.layers.slim``), so narrow networks really are
smaller and faster, in training and once exported (physically slim)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import LcsError
from ..layers.select import LINEAR_TYPES, NORM_TYPES, all_but_classifier
from ..layers.slim import channel_plan, is_slim, make_slim, slim_down, width_channels
from .base import BakeContext, MethodSpec, Regime, RegimeConfig, check_alpha, check_level, check_whole

__all__ = ["StructuredConfig", "REGIME", "WIDTH_GRID"]

WIDTH_GRID = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # the default evaluation grid, in widths


@dataclass(frozen=True)
class StructuredConfig(RegimeConfig):
    """Structured sparsity: width factor w = w_min + (w_max − w_min)·α; every compressing layer
    keeps its first round(w·C_out) output channels (see ``lcs.layers.slim``).

    Args:
        w_min, w_max: the width range (default [0.25, 1.0]).
        line_scope: which tensors are lines under ``geometry="line"``: ``"norm"`` (only the norm
            affine parameters, as in the reference) or ``"all"`` (every conv/linear/norm tensor).
        bn_stats_bins: with BatchNorm, keep that many sets of running statistics, one per equal bin
            of width, plus one for each end of the range (the sandwich rule trains both ends every
            step): switchable BatchNorm, stored and exported with each width (``lcs.layers.bn_stats``);
            0 keeps one shared set (universally slimmable networks, and the US baseline always).

    Example:
        >>> StructuredConfig().level(0.5)
        0.625
    """

    w_min: float = 0.25
    w_max: float = 1.0
    line_scope: str = "norm"
    bn_stats_bins: int = 0

    regime: ClassVar[str] = "structured"
    level_names: ClassVar[tuple[str, ...]] = ("width",)
    regularize_norms: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.w_min <= self.w_max <= 1.0):
            raise LcsError(f"widths must satisfy 0 < w_min <= w_max <= 1, got w_min={self.w_min}, "
                           f"w_max={self.w_max}")
        if self.line_scope not in ("norm", "all"):
            raise LcsError(f"line_scope must be 'norm' or 'all', got {self.line_scope!r}")
        check_whole(self.bn_stats_bins, "bn_stats_bins (0: one shared set)")

    @property
    def stats_rows(self) -> int:
        """BatchNorm statistics sets: ``bn_stats_bins`` equal bins of width, plus one row per end."""
        return self.bn_stats_bins + 2 if self.bn_stats_bins else 0

    def stats_row(self, alpha: float, levels: Mapping[str, float]) -> int:
        """The row of the width: each end of the range its own (trained every step), the widths
        between in ``bn_stats_bins`` equal bins."""
        n, w = self.bn_stats_bins, float(levels["width"])
        if abs(w - self.w_max) < 1e-9:
            return n + 1
        if abs(w - self.w_min) < 1e-9:
            return n
        span = self.w_max - self.w_min
        return min(n - 1, max(0, int(n * (w - self.w_min) / span))) if span > 0 else n + 1

    @property
    def levels_max(self) -> dict[str, float]:
        return {"width": self.w_max}

    def levels(self, alpha: float) -> dict[str, float]:
        return {"width": self.w_min + (self.w_max - self.w_min) * check_alpha(alpha, *self.alpha_range)}

    def alpha_of(self, level: float) -> float:
        """The α whose width is ``level`` (for width grids)."""
        width = check_level("width", level, self.w_min, self.w_max)
        span = self.w_max - self.w_min
        return 1.0 if span == 0 else min(max((width - self.w_min) / span, 0.0), 1.0)

    def check_levels(self, levels: Mapping[str, float]) -> dict[str, float]:
        return {"width": check_level("width", levels["width"], self.w_min, self.w_max)}


def _settings(m: Any, method: str) -> StructuredConfig:
    if not (0 < m.w_min <= m.w_max <= 1):
        raise LcsError(f"method.w_min/w_max={(m.w_min, m.w_max)!r} is invalid: must be 0 < w_min <= w_max <= 1")
    if m.sandwich_random < 0:
        raise LcsError(f"method.sandwich_random={m.sandwich_random!r} is invalid: must be >= 0")
    if m.l1 < 0:
        raise LcsError(f"method.l1={m.l1!r} is invalid: must be >= 0")
    check_whole(m.bn_stats_bins, "method.bn_stats_bins (0: one shared set)")
    # the baselines keep their own BatchNorm semantics: shared across widths (US, NS) or one network (LEC)
    bins = m.bn_stats_bins if method in ("lcs_l", "lcs_p") else 0
    config = StructuredConfig(geometry="line" if method == "lcs_l" else "point", w_min=m.w_min, w_max=m.w_max,
                              line_scope=m.line_scope, line_init=m.line_init, bn_stats_bins=bins)
    if method == "ns":
        if not m.ns_widths:
            raise LcsError("method.ns_widths is empty")
        for w in m.ns_widths:
            config.alpha_of(w)
    return config


def _slim_everything(model: Any, state: Any, config: StructuredConfig, compressed: set[str],
                     decisions: dict) -> dict:
    for fqn, m in model.named_modules():
        if fqn in compressed:
            c_out = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            if math.floor(c_out * config.w_min + 0.5) < 1:
                raise LcsError(f"w_min={config.w_min:g} leaves layer {fqn!r} ({c_out} output channels) with zero "
                               f"channels: raise w_min to at least {0.5 / c_out:.3g}")
        if isinstance(m, LINEAR_TYPES + NORM_TYPES):
            make_slim(m, state, scale_out=fqn in compressed)
    return {"slim": True}


def _structured_line(module: Any, config: StructuredConfig) -> bool:
    return config.line_scope == "all" or isinstance(module, NORM_TYPES)


def _width_follows(module: Any, fqn: str, state: Any, config: StructuredConfig) -> None:
    """Nothing per layer: ``make_slim`` already made compressing layers follow the width."""


def _slim_down(net: Any, ctx: BakeContext) -> None:
    """The physically slim network at the width: the channel plan of each distinct set of channel
    counts is found once by a forward pass on zeros of the input shape, and memoized."""
    slim = [m for m in ctx.template.modules() if is_slim(m)]
    if not slim:
        return
    if ctx.input_shape is None:
        raise LcsError("a structured subspace needs its input shape to be made slim: pass input_shape=(C, H, W) "
                       "or set sub.input_shape")
    width = ctx.levels["width"]
    sizes = ctx.cache.setdefault("slim_sizes", sorted({m.out_channels if isinstance(m, torch.nn.Conv2d)
                                                       else m.out_features for m in slim if m.lcs_slim.scale_out}))
    key = ("plan", tuple(width_channels(c, width) for c in sizes))
    if key not in ctx.cache:
        param = next(ctx.template.parameters())
        ctx.cache[key] = channel_plan(ctx.template, torch.zeros(1, *ctx.input_shape, dtype=param.dtype,
                                                                device=param.device))
    slim_down(net, ctx.cache[key])


def _grid(config: RegimeConfig) -> list[float]:
    return [config.alpha_of(w) for w in WIDTH_GRID if config.w_min - 1e-9 <= w <= config.w_max + 1e-9]


REGIME = Regime(
    name="structured", config=StructuredConfig, settings=_settings, convert_layer=_width_follows, grid=_grid,
    methods={
        "lcs_l": MethodSpec("line", "sandwich", terms=("cos2",),
                            help="LCS+L: norm parameters on a line, sandwich rule"),
        "lcs_p": MethodSpec("point", "sandwich", help="LCS+P: one weight set, sandwich rule"),
        "us": MethodSpec("point", "sandwich", help="universally slimmable networks (BatchNorm)"),
        "ns": MethodSpec("point", "widths", help="slimmable networks: the fixed list method.ns_widths"),
        "lec": MethodSpec("point", "top", terms=("l1",), sweep="keep",
                          help="network slimming: L1 on norm scales, then prune"),
    },
    # One-group GroupNorm ("ln") keeps no running statistics (SPEC §2), the slimming baselines use
    # BatchNorm. Not the paper's InstanceNorm: on digits (5 epochs, dense) InstanceNorm reaches 0.41 where
    # "ln" reaches 0.90 (InstanceNorm → ReLU → global pool erases each channel's magnitude).
    default_norms={None: "ln", "us": "bn", "ns": "bn", "lec": "bn"},
    norms=("in", "ln", "bn"), prepare=_slim_everything, is_line=_structured_line,
    default_filter=all_but_classifier, finish=(_slim_down,), encoders=("dense",), plot_axis="params",
    notes={"norm": ": structured sparsity needs per-channel norms (GroupNorm's groups would change with the width)"},
)
