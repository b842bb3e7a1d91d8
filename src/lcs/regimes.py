"""Compression regimes as typed configs: each maps α to a compression level γ(α).

A regime is a small frozen dataclass; ``lcs.convert`` dispatches on its type (see
``subspace.register_regime``). Structured sparsity and quantization add their own configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from .errors import LcsError

__all__ = ["RegimeConfig", "UnstructuredConfig", "StructuredConfig", "QuantizedConfig", "GEOMETRIES", "REGIMES",
           "BITS_RANGE", "check_alpha", "regime_to_dict", "regime_from_dict"]

GEOMETRIES = ("line", "point")
BITS_RANGE = (2, 16)  # what the quantized regime's fake quantization and packed export support


def check_alpha(alpha: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """α as a float inside [lo, hi] (with a 1e-9 tolerance), or a ValueError naming the range."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise LcsError(f"alpha must be a number, got {alpha!r}") from None
    if math.isnan(a):
        raise LcsError(f"alpha must be a number in [{lo:g}, {hi:g}], got NaN")
    if not (lo - 1e-9 <= a <= hi + 1e-9):
        raise LcsError(f"alpha={alpha} is outside the subspace's range [{lo:g}, {hi:g}]")
    return min(max(a, lo), hi)


@dataclass(frozen=True)
class RegimeConfig:
    """Common fields: the subspace geometry and how the second line endpoint starts.

    Args:
        geometry: ``"line"`` (LCS+L: two weight sets, θ(α) = (1−α)θ₀ + αθ₁) or ``"point"``
            (LCS+P and the target baselines: one weight set, α only sets the compression).
        line_init: ``"independent"`` (SPEC: θ₁ drawn afresh; norm scales 0.5) or ``"copy"`` (θ₁ = θ₀,
            to start a subspace from pretrained dense weights).
    """

    geometry: str = "line"
    line_init: str = "independent"

    regime: ClassVar[str] = ""
    level_name: ClassVar[str] = ""
    regularize_norms: ClassVar[bool] = False  # cos² also over norm parameters

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise LcsError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.line_init not in ("independent", "copy"):
            raise LcsError(f"line_init must be 'independent' or 'copy', got {self.line_init!r}")

    @property
    def alpha_range(self) -> tuple[float, float]:
        return (0.0, 1.0)

    @property
    def level_max(self) -> float:
        """The uncompressed level (used during warm-ups)."""
        raise NotImplementedError

    def level(self, alpha: float) -> float:
        """γ(α): the compression level at α."""
        raise NotImplementedError

    def position(self, alpha: float) -> float:
        """The point of the subspace that serves α: α itself, unless the regime says otherwise."""
        return alpha

    @property
    def stats_rows(self) -> int:
        """Sets of BatchNorm running statistics kept per level (``lcs.bn_stats``); 0: one shared set."""
        return 0

    def stats_row(self, alpha: float, level: float) -> int:
        """The statistics row that serves (α, level); regimes with ``stats_rows`` say which."""
        return 0


@dataclass(frozen=True)
class UnstructuredConfig(RegimeConfig):
    """Unstructured sparsity: per-layer magnitude TopK at density d = α on [d_min, 1].

    ``bn_stats_bins``: with BatchNorm, keep that many sets of running statistics, one per
    log-spaced bin of α (plus one per endpoint on a line; ``lcs.bn_stats``); 0 keeps one shared set
    (GroupNorm needs none).

    Example:
        >>> UnstructuredConfig(d_min=0.025).level(0.1)
        0.1
    """

    d_min: float = 0.025
    bn_stats_bins: int = 0

    regime: ClassVar[str] = "unstructured"
    level_name: ClassVar[str] = "density"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.d_min <= 1.0):
            raise LcsError(f"d_min must be in (0, 1], got {self.d_min}")
        if isinstance(self.bn_stats_bins, bool) or not isinstance(self.bn_stats_bins, int) or self.bn_stats_bins < 0:
            raise LcsError(f"bn_stats_bins must be a whole number >= 0 (0: one shared set), got {self.bn_stats_bins!r}")

    @property
    def stats_rows(self) -> int:
        """BatchNorm statistics sets (``lcs.bn_stats``): ``bn_stats_bins`` log-spaced bins of α, plus, on
        a line, one row for each endpoint."""
        if not self.bn_stats_bins:
            return 0
        return self.bn_stats_bins + (2 if self.geometry == "line" else 0)

    def stats_row(self, alpha: float, level: float) -> int:
        """The row of α. A line's endpoints are networks of their own (LCS+L samples each a quarter of
        the time) and get exact rows: sharing the top bin's statistics with the α below it cost the
        dense end 15 points after 2 CIFAR-10 epochs (0.30 with running vs 0.44 with batch statistics).
        Interior α fall in n equal bins of log α over [d_min, 1]; the activations' statistics change
        fastest at low density, so the bins are finest there."""
        n = self.bn_stats_bins
        a = min(max(float(alpha), self.d_min), 1.0)
        if self.geometry == "line":
            if abs(a - 1.0) < 1e-9:
                return n + 1
            if abs(a - self.d_min) < 1e-9:
                return n
        if n <= 1 or self.d_min >= 1.0:
            return 0
        return min(n - 1, int(n * math.log(a / self.d_min) / math.log(1.0 / self.d_min)))

    @property
    def alpha_range(self) -> tuple[float, float]:
        return (self.d_min, 1.0)

    @property
    def level_max(self) -> float:
        return 1.0

    def level(self, alpha: float) -> float:
        return check_alpha(alpha, *self.alpha_range)


@dataclass(frozen=True)
class StructuredConfig(RegimeConfig):
    """Structured sparsity: width factor w = w_min + (w_max − w_min)·α; every compressing layer
    keeps its first round(w·C_out) output channels (see ``lcs.slim``).

    Args:
        w_min, w_max: the width range (default [0.25, 1.0]).
        line_scope: which tensors are lines under ``geometry="line"``: ``"norm"`` (only the norm
            affine parameters, as in the reference) or ``"all"`` (every conv/linear/norm tensor).

    Example:
        >>> StructuredConfig().level(0.5)
        0.625
    """

    w_min: float = 0.25
    w_max: float = 1.0
    line_scope: str = "norm"

    regime: ClassVar[str] = "structured"
    level_name: ClassVar[str] = "width"
    regularize_norms: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.w_min <= self.w_max <= 1.0):
            raise LcsError(f"widths must satisfy 0 < w_min <= w_max <= 1, got w_min={self.w_min}, "
                           f"w_max={self.w_max}")
        if self.line_scope not in ("norm", "all"):
            raise LcsError(f"line_scope must be 'norm' or 'all', got {self.line_scope!r}")

    @property
    def level_max(self) -> float:
        return self.w_max

    def level(self, alpha: float) -> float:
        return self.w_min + (self.w_max - self.w_min) * check_alpha(alpha, *self.alpha_range)

    def alpha_of(self, width: float) -> float:
        """The α whose width is ``width`` (for width grids)."""
        if not (self.w_min - 1e-9 <= width <= self.w_max + 1e-9):
            raise LcsError(f"width {width} is outside the subspace's range [{self.w_min:g}, {self.w_max:g}]")
        span = self.w_max - self.w_min
        return 1.0 if span == 0 else min(max((width - self.w_min) / span, 0.0), 1.0)


@dataclass(frozen=True)
class QuantizedConfig(RegimeConfig):
    """Quantization: α is cut into n = b_max − b_min + 1 equal bins, bin i → b_min + i bits (SPEC §1).

    The bins are closed on the right, ((i/n, (i+1)/n], with α = 0 in the first), so the bins' upper
    edges k/n, k = 1..n, which LCS+L trains on (SPEC §2), are exactly b_min … b_max and α = 1 is
    b_max. (Left-closed bins would send the edge k/n to the next bin and never train b_min.)
    Weights of the compressing layers and the activations entering them are fake-quantized to b bits
    (``lcs.quant``). ``bn_stats_per_bits``: every BatchNorm keeps one set of running statistics per
    bit width (the subspaces, whose bits change per step); off for one network at one bit width.

    Example:
        >>> QuantizedConfig().level(0.5), QuantizedConfig().level(1.0), QuantizedConfig().alpha_of(3)
        (5, 8, 0.16666666666666666)
    """

    b_min: int = 3
    b_max: int = 8
    bn_stats_per_bits: bool = True

    regime: ClassVar[str] = "quantized"
    level_name: ClassVar[str] = "bits"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("b_min", "b_max"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or not (BITS_RANGE[0] <= b <= BITS_RANGE[1]):
                raise LcsError(f"{name} must be a whole number of bits in [{BITS_RANGE[0]}, {BITS_RANGE[1]}], "
                               f"got {b!r}")
        if self.b_min > self.b_max:
            raise LcsError(f"the bit range is empty: b_min={self.b_min} > b_max={self.b_max}")
        if not isinstance(self.bn_stats_per_bits, bool):
            raise LcsError(f"bn_stats_per_bits must be true or false, got {self.bn_stats_per_bits!r}")

    @property
    def num_levels(self) -> int:
        return self.b_max - self.b_min + 1

    @property
    def stats_rows(self) -> int:
        """BatchNorm statistics sets (``lcs.bn_stats``): one per bit width."""
        return self.num_levels if self.bn_stats_per_bits else 0

    def stats_row(self, alpha: float, level: float) -> int:
        """The row of the bit width ``level`` (α only picks the bin, and the bin is the bits)."""
        bits = int(level)
        if bits != level or not (self.b_min <= bits <= self.b_max):
            raise LcsError(f"bits={level!r} is outside the subspace's bit range {self.b_min}..{self.b_max}")
        return bits - self.b_min

    @property
    def level_max(self) -> float:
        return self.b_max

    def level(self, alpha: float) -> int:
        a = check_alpha(alpha, *self.alpha_range)
        return self.b_min + max(0, math.ceil(round(a * self.num_levels, 9)) - 1)

    def position(self, alpha: float) -> float:
        """On a line, the upper edge of α's bin: LCS+L trains each bit width there only (SPEC §2), so
        every α of the bin is served by that trained network, not by an untrained point beside it
        (on digits with BN, α = 0 scored 0.10 where its bin's edge α = 1/6 scores 0.93)."""
        return self.alpha_of(self.level(alpha)) if self.geometry == "line" else alpha

    def alpha_of(self, bits: float) -> float:
        """The upper edge of the bin of ``bits``: the α that LCS+L trains for that bit width."""
        if bits != int(bits):
            raise LcsError(f"bits={bits!r} is not a whole number of bits")
        if not (self.b_min <= bits <= self.b_max):
            raise LcsError(f"bits={bits!r} is outside the subspace's bit range {self.b_min}..{self.b_max}")
        return (int(bits) - self.b_min + 1) / self.num_levels


REGIMES: dict[str, type[RegimeConfig]] = {"unstructured": UnstructuredConfig, "structured": StructuredConfig,
                                          "quantized": QuantizedConfig}


def regime_to_dict(config: RegimeConfig) -> dict:
    """JSON-ready description of a regime config (stored in artifacts)."""
    return {"regime": config.regime, **dataclasses.asdict(config)}


def regime_from_dict(raw: dict) -> RegimeConfig:
    """Inverse of ``regime_to_dict``, accepting only known regimes and fields."""
    raw = dict(raw)
    name = raw.pop("regime", None)
    if name not in REGIMES:
        raise LcsError(f"unknown regime {name!r} in artifact; known: {', '.join(REGIMES)}")
    cls = REGIMES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - fields
    if unknown:
        raise LcsError(f"unknown {name} regime fields in artifact: {', '.join(sorted(unknown))}")
    return cls(**raw)
