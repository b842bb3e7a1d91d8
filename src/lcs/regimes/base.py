"""What a regime is: a typed config (α → named compression levels) and one record of everything
else the package asks of it, registered once (``register``).

The generic code (``convert``, the training loop and its methods, evaluation, the CLI, the bake
path behind ``materialize`` and ``Runtime``, the artifact) asks the record and never branches on a
regime's name, as torchao's quantization configs each map to one registered handler. Adding a
regime is one module in ``lcs/regimes/`` plus one line in ``lcs/regimes/__init__.py``.

Deploy side: imports only torch (layers) and the standard library; methods are described as data
(``MethodSpec``) and built by ``lcs.train.methods``, so serving never imports training code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import LcsError
from ..layers.quant import BITS_RANGE

__all__ = ["RegimeConfig", "Regime", "MethodSpec", "BakeContext", "Point", "GEOMETRIES", "BITS_RANGE", "check_alpha",
           "check_whole", "check_level", "register", "record_of", "REGISTRY"]

GEOMETRIES = ("line", "point")

# A place on the subspace: an α, or (points) the levels themselves, e.g. {"density": 0.1, "bits": 4}.
Point = float | Mapping[str, float]


def check_whole(value: Any, key: str, minimum: int = 0) -> int:
    """A whole-number setting (bins, counts), with its config name in the error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LcsError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return value


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


def check_level(name: str, value: Any, lo: float, hi: float, whole: bool = False) -> float:
    """A level inside [lo, hi] (whole numbers for bits), or an error naming it and its range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LcsError(f"{name} must be a number, got {value!r}") from None
    if whole and v != int(v):
        raise LcsError(f"{name}={value!r} is not a whole number of {name}")
    if math.isnan(v) or not (lo - 1e-9 <= v <= hi + 1e-9):
        raise LcsError(f"{name}={value!r} is outside the subspace's range [{lo:g}, {hi:g}]")
    return int(v) if whole else min(max(v, lo), hi)


@dataclass(frozen=True)
class RegimeConfig:
    """Common fields: the subspace geometry and how the second line endpoint starts.

    Args:
        geometry: ``"line"`` (LCS+L: two weight sets, θ(α) = (1−α)θ₀ + αθ₁) or ``"point"``
            (LCS+P and the target baselines: one weight set, α only sets the compression).
        line_init: ``"independent"`` (SPEC: θ₁ drawn afresh; norm scales 0.5) or ``"copy"`` (θ₁ = θ₀,
            to start a subspace from pretrained dense weights).

    A regime names its levels (``level_names``: density, width, bits, or several) and maps α to them
    (``levels``) and back (``alpha_of``); every parametrization reads its own level by name from the
    shared ``SubspaceState.levels``.
    """

    geometry: str = "line"
    line_init: str = "independent"

    regime: ClassVar[str] = ""
    level_names: ClassVar[tuple[str, ...]] = ()
    regularize_norms: ClassVar[bool] = False  # cos² also over norm parameters
    decaying_levels: ClassVar[tuple[str, ...] | None] = None  # the levels a "decay" warm-up fades in (None: all)

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise LcsError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.line_init not in ("independent", "copy"):
            raise LcsError(f"line_init must be 'independent' or 'copy', got {self.line_init!r}")

    @property
    def level_name(self) -> str:
        """The primary level (the one a single number stands for: ``Subspace.level``, plots)."""
        return self.level_names[0]

    @property
    def alpha_range(self) -> tuple[float, float]:
        return (0.0, 1.0)

    @property
    def level_max(self) -> float:
        """The uncompressed primary level."""
        return self.levels_max[self.level_name]

    @property
    def levels_max(self) -> dict[str, float]:
        """Every level uncompressed (warm-ups hold or decay from these)."""
        raise NotImplementedError

    def levels(self, alpha: float) -> dict[str, float]:
        """γ(α) for every level name."""
        raise NotImplementedError

    def level(self, alpha: float) -> float:
        """γ(α) of the primary level."""
        return self.levels(alpha)[self.level_name]

    def alpha_of(self, level: float) -> float:
        """The α that serves the primary ``level`` (for grids given in levels)."""
        raise NotImplementedError

    def check_levels(self, levels: Mapping[str, float]) -> dict[str, float]:
        """Levels validated against the regime's ranges (all names required)."""
        raise NotImplementedError

    def position(self, alpha: float) -> float:
        """The point of the subspace that serves α: α itself, unless the regime says otherwise."""
        return alpha

    @property
    def stats_rows(self) -> int:
        """Sets of BatchNorm running statistics kept per level (``lcs.layers.bn_stats``); 0: one shared set."""
        return 0

    def stats_row(self, alpha: float, levels: Mapping[str, float]) -> int:
        """The statistics row that serves (α, levels); regimes with ``stats_rows`` say which."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in artifacts)."""
        return {"regime": self.regime, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MethodSpec:
    """A training method as data: the loop's pluggable pieces by name, built into samplers and
    schedules by ``lcs.train.methods`` (so a regime module imports no training code).

    sampler: ``endpoints`` (LCS+L: an endpoint half the time, else α ~ U), ``uniform``, ``edges``
        (one of ``Regime.train_alphas`` per step), ``levels`` (independent levels, ``Regime.sample_levels``),
        ``sandwich``, ``widths`` (NS's fixed list), ``top`` (the accurate end only), ``target``.
    schedule: ``none``, ``decay`` (compression fades in over the warm-up), ``hold`` (uncompressed
        during the warm-up).
    terms: extra loss terms, ``cos2`` (lines) and ``l1`` (norm scales).
    phase: the regime's phase hook (``Regime.phase``) switches on after the warm-up.
    warmup: the default warm-up, a fraction of all steps (``method.warmup`` overrides it).
    sweep: how ``lcs eval`` sweeps the trained network: ``points`` (the grid of α or levels) or ``keep``
        (LEC: one network, pruned to fractions of its channels).
    """

    geometry: str
    sampler: str
    schedule: str = "none"
    terms: tuple[str, ...] = ()
    phase: bool = False
    help: str = ""
    warmup: float = 0.8  # SPEC §2: TopK warm-up and activation-quantization delay over 80 % of the steps
    sweep: str = "points"


@dataclass
class BakeContext:
    """What a regime's finishing step needs to turn the baked template into a plain network at a point."""

    alpha: float
    levels: dict[str, float]
    config: RegimeConfig
    template: Any  # the stripped template network (its own SubspaceState follows the point)
    input_shape: tuple[int, ...] | None
    cache: dict[str, Any] = field(default_factory=dict)  # per-baker memo (e.g. channel plans per width)


LayerHook = Callable[[Any, str, Any, Any], None]  # (module, fqn, state, config)
PrepareHook = Callable[[Any, Any, Any, set, dict], dict]  # (model, state, config, compressed, decisions) -> decisions
FinishHook = Callable[[Any, BakeContext], None]


def _every_layer(module: Any, config: Any) -> bool:
    return True


@dataclass(frozen=True)
class Regime:
    """Everything lcs asks of a regime, in one place.

    Attributes:
        name, config: the regime's name (``--regime``) and its config class.
        methods: method name → ``MethodSpec``; ``settings``: builds the config from the ``method``
            config section, naming its keys in errors (``method.d_min``).
        default_norms: method name (None: the rest) → the norm layers it trains with by default.
        grid: the default evaluation grid (points: α, or level dicts for multi-level points).
        train_alphas: the α the ``edges`` sampler draws from; ``sample_levels``: the ``levels`` sampler.
        convert_layer: makes one chosen layer compressible; ``prepare``: the whole model first (may
            return decisions that change the math, e.g. which BatchNorms fold; they are stored in subspace
            files and handed back on load instead of being re-derived); ``is_line``: which modules' tensors
            are lines; ``default_filter``: which layers compress by default.
        finish: steps that turn the baked weights into a plain network at a point (fix bits, slim down).
        phase: an optional switch the loop turns on after the warm-up (activation quantization).
        encoders: artifact encodings its compressed weights may use (the smallest wins per tensor).
        plot_axis: the x axis of its accuracy plots; ``notes``: one-line notes per command.
        norms: the norms it accepts (None: any).
    """

    name: str
    config: type[RegimeConfig]
    methods: dict[str, MethodSpec]
    settings: Callable[[Any, str], RegimeConfig]
    convert_layer: LayerHook
    grid: Callable[[RegimeConfig], list[Point]]
    default_norms: dict[str | None, str] = field(default_factory=lambda: {None: "gn"})
    norms: tuple[str, ...] | None = None
    train_alphas: Callable[[RegimeConfig], tuple[float, ...]] | None = None
    sample_levels: Callable[[RegimeConfig, Any], dict[str, float]] | None = None
    prepare: PrepareHook | None = None
    is_line: Callable[[Any, RegimeConfig], bool] = _every_layer
    default_filter: Callable[[Any], Callable[[Any, str], bool]] | None = None
    finish: tuple[FinishHook, ...] = ()
    phase: Callable[[Any, bool], int] | None = None
    encoders: tuple[str, ...] = ("dense",)
    plot_axis: str = "sparsity"
    notes: dict[str, str] = field(default_factory=dict)

    def default_norm(self, method: str) -> str:
        return self.default_norms.get(method, self.default_norms[None])


REGISTRY: dict[str, Regime] = {}
_BY_CONFIG: dict[type, Regime] = {}


def register(regime: Regime) -> Regime:
    """Register a regime record (once per name)."""
    if regime.name in REGISTRY:
        raise LcsError(f"regime {regime.name!r} is already registered")
    if regime.config.regime != regime.name:
        raise LcsError(f"{regime.config.__name__}.regime is {regime.config.regime!r}, not {regime.name!r}")
    REGISTRY[regime.name] = regime
    _BY_CONFIG[regime.config] = regime
    return regime


def record_of(which: str | RegimeConfig | type) -> Regime:
    """The record of a regime, by name, config or config class."""
    if isinstance(which, str):
        rec = REGISTRY.get(which)
        if rec is None:
            raise LcsError(f"unknown regime {which!r}; known: {', '.join(REGISTRY)}")
        return rec
    cls = which if isinstance(which, type) else type(which)
    rec = _BY_CONFIG.get(cls)
    if rec is None:
        raise LcsError(f"no regime registered for {cls.__name__}")
    return rec
