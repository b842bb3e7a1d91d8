"""Unstructured sparsity: per-layer magnitude TopK at density d = α on [d_min, 1] (SPEC §1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch.nn.utils import parametrize

from ..errors import LcsError
from ..layers.parametrizations import TopK
from ..layers.select import default_filter
from .base import MethodSpec, Regime, RegimeConfig, check_alpha, check_level, check_whole

__all__ = ["UnstructuredConfig", "REGIME", "DENSITY_GRID", "d_min_settings", "add_topk"]

# The default evaluation grid, in densities (SPEC §4).
DENSITY_GRID = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class UnstructuredConfig(RegimeConfig):
    """Unstructured sparsity: per-layer magnitude TopK at density d = α on [d_min, 1].

    ``bn_stats_bins``: with BatchNorm, keep that many sets of running statistics, one per
    log-spaced bin of α (plus one per endpoint on a line; ``lcs.layers.bn_stats``); 0 keeps one
    shared set (GroupNorm needs none).

    Example:
        >>> UnstructuredConfig(d_min=0.025).level(0.1)
        0.1
    """

    d_min: float = 0.025
    bn_stats_bins: int = 0

    regime: ClassVar[str] = "unstructured"
    level_names: ClassVar[tuple[str, ...]] = ("density",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.d_min <= 1.0):
            raise LcsError(f"d_min must be in (0, 1], got {self.d_min}")
        check_whole(self.bn_stats_bins, "bn_stats_bins (0: one shared set)")

    @property
    def alpha_range(self) -> tuple[float, float]:
        return (self.d_min, 1.0)

    @property
    def levels_max(self) -> dict[str, float]:
        return {"density": 1.0}

    def levels(self, alpha: float) -> dict[str, float]:
        return {"density": check_alpha(alpha, *self.alpha_range)}

    def alpha_of(self, level: float) -> float:
        return check_alpha(level, *self.alpha_range)  # α is the density

    def check_levels(self, levels: Mapping[str, float]) -> dict[str, float]:
        return {"density": check_level("density", levels["density"], self.d_min, 1.0)}

    @property
    def stats_rows(self) -> int:
        """BatchNorm statistics sets: ``bn_stats_bins`` log-spaced bins, plus, on a line, one row for
        each endpoint."""
        if not self.bn_stats_bins:
            return 0
        return self.bn_stats_bins + (2 if self.geometry == "line" else 0)

    def stats_row(self, alpha: float, levels: Mapping[str, float]) -> int:
        """The row of α on a line (α also moves the weights, so the row follows α: keyed by density,
        a line's dense end shared its statistics with every α of the warm-up and scored 0.17 after 2
        CIFAR-10 epochs), of the density on a point. A line's endpoints are networks of their own
        (LCS+L samples each a quarter of the time) and get exact rows: sharing the top bin's statistics
        with the α below it cost the dense end 15 points after 2 CIFAR-10 epochs. Interior values fall
        in n equal bins of log α over [d_min, 1], finest at low density where statistics change fastest."""
        n = self.bn_stats_bins
        a = min(max(float(alpha if self.geometry == "line" else levels["density"]), self.d_min), 1.0)
        if self.geometry == "line":
            if abs(a - 1.0) < 1e-9:
                return n + 1
            if abs(a - self.d_min) < 1e-9:
                return n
        if n <= 1 or self.d_min >= 1.0:
            return 0
        return min(n - 1, int(n * math.log(a / self.d_min) / math.log(1.0 / self.d_min)))


def d_min_settings(m: Any) -> None:
    """The ``method.d_min`` key, checked under its config name."""
    if not (0 < m.d_min <= 1):
        raise LcsError(f"method.d_min={m.d_min!r} is invalid: must be in (0, 1]")


def _settings(m: Any, method: str) -> UnstructuredConfig:
    d_min_settings(m)
    check_whole(m.bn_stats_bins, "method.bn_stats_bins (0: one shared set)")
    # the target baseline is one network at one density: one set of statistics
    return UnstructuredConfig(geometry="line" if method == "lcs_l" else "point", d_min=m.d_min,
                              line_init=m.line_init, bn_stats_bins=0 if method == "target" else m.bn_stats_bins)


def add_topk(module: Any, fqn: str, state: Any, config: UnstructuredConfig) -> None:
    parametrize.register_parametrization(module, "weight", TopK(state, "density"))


def _grid(config: RegimeConfig) -> list[float]:
    lo, hi = config.alpha_range
    return [a for a in DENSITY_GRID if lo - 1e-9 <= a <= hi + 1e-9]


REGIME = Regime(
    name="unstructured", config=UnstructuredConfig, settings=_settings, convert_layer=add_topk, grid=_grid,
    methods={
        "lcs_l": MethodSpec("line", "endpoints", "decay", ("cos2",), help="LCS+L: a line, TopK warm-up"),
        "lcs_p": MethodSpec("point", "uniform", "hold", help="LCS+P: one weight set, dense during the warm-up"),
        "target": MethodSpec("point", "target", "decay", help="one network at method.target density"),
    },
    default_filter=default_filter, encoders=("dense", "bitmap", "sparse"), plot_axis="sparsity",
    notes={"onnx": " (ONNX stores unstructured zeros densely)",
           "profile": "note: 'bN sparse' counts the layers that run on CSR kernels at batch N (chosen per layer by a "
                      "micro-benchmark on this machine, cached in $LCS_CACHE)"},
)
