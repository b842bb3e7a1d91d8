"""Methods as small pluggable pieces for the one training loop.

A method is (geometry, α sampler, compression schedule, extra loss terms). The loop never asks
which method it runs: it asks the sampler for the α's (or level dicts) of this step, the schedule
for the levels at each, and sums the extra terms. A regime declares its methods as data
(``lcs.regimes.MethodSpec``); ``build_method`` turns a spec into these pieces.

Samplers are pure functions of (step, generator): the generator is seeded from (seed, step), so
every distributed rank draws the same α with no communication, and a resumed run draws exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LcsError
from ..ops import cos2
from ..regimes import MethodSpec, Regime, RegimeConfig, record_of
from ..subspace import NORM_TYPES, Subspace

__all__ = ["BiasedEndpointSampler", "UniformSampler", "FixedSampler", "SandwichSampler", "ListSampler",
           "ChoiceSampler", "LevelsSampler", "DecayFromMax", "HoldMax", "Method", "build_method", "methods_of",
           "cos2_term", "norm_l1_term"]


def _uniform(gen: torch.Generator, lo: float, hi: float, log: bool = False) -> float:
    """α ~ U[lo, hi], or log-uniform on [lo, hi] (lo > 0): equal draws per log-spaced bin."""
    u = float(torch.rand((), generator=gen))
    if log and lo > 0:
        return min(hi, lo * (hi / lo) ** u)
    return lo + (hi - lo) * u


@dataclass(frozen=True)
class BiasedEndpointSampler:
    """With probability ``p_endpoint`` an endpoint (each half the time), else α ~ U[lo, hi] (or
    log-uniform: ``log``)."""

    lo: float
    hi: float
    p_endpoint: float = 0.5
    log: bool = False

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        u = torch.rand(2, generator=gen)
        if float(u[0]) < self.p_endpoint:
            return [self.lo if float(u[1]) < 0.5 else self.hi]
        return [_uniform(gen, self.lo, self.hi, self.log)]


@dataclass(frozen=True)
class UniformSampler:
    """α ~ U[lo, hi] (or log-uniform: ``log``)."""

    lo: float
    hi: float
    log: bool = False

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        return [_uniform(gen, self.lo, self.hi, self.log)]


@dataclass(frozen=True)
class FixedSampler:
    """Always the same α (the target baselines)."""

    alpha: float

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        return [self.alpha]


@dataclass(frozen=True)
class SandwichSampler:
    """The sandwich rule (Yu & Huang, US-Nets): both ends plus ``n_random`` α ~ U[lo, hi] per step,
    losses summed. The narrowest and widest networks bound the rest, so both are trained every step."""

    lo: float
    hi: float
    n_random: int = 2

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        return [self.hi, self.lo] + [_uniform(gen, self.lo, self.hi) for _ in range(self.n_random)]


@dataclass(frozen=True)
class ListSampler:
    """Every α of a fixed list, every step (NS: slimmable networks' fixed width list)."""

    alphas: tuple[float, ...]

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        return list(self.alphas)


@dataclass(frozen=True)
class ChoiceSampler:
    """One α of a fixed list per step, uniformly (quantization: the bins' upper edges k/n, i.e. a
    uniformly random bit width)."""

    alphas: tuple[float, ...]

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        return [self.alphas[int(torch.randint(len(self.alphas), (), generator=gen))]]


@dataclass(frozen=True)
class LevelsSampler:
    """Independent levels per step (a point of several levels: any density with any bits), drawn by
    the regime (``Regime.sample_levels``)."""

    config: Any
    draw: Callable[[Any, torch.Generator], dict[str, float]]

    def __call__(self, step: int, gen: torch.Generator) -> list[dict[str, float]]:
        return [self.draw(self.config, gen)]


@dataclass(frozen=True)
class DecayFromMax:
    """level = γ + (γ_max − γ)·max(0, 1 − t/T_w) for each of ``names`` (all levels when None):
    compression fades in over the warm-up (SPEC §2, TopK warm-up)."""

    warmup_steps: int
    levels_max: dict[str, float]
    names: tuple[str, ...] | None = None

    def __call__(self, levels: dict[str, float], step: int) -> dict[str, float]:
        if step >= self.warmup_steps:
            return levels
        keep = 1.0 - step / self.warmup_steps
        return {k: (v + (self.levels_max[k] - v) * keep if self.names is None or k in self.names else v)
                for k, v in levels.items()}


@dataclass(frozen=True)
class HoldMax:
    """Every level at its maximum during the warm-up, then γ(α) (LCS+P: train uncompressed first)."""

    warmup_steps: int
    levels_max: dict[str, float]

    def __call__(self, levels: dict[str, float], step: int) -> dict[str, float]:
        return dict(self.levels_max) if step < self.warmup_steps else levels


def _identity_schedule(levels: dict[str, float], step: int) -> dict[str, float]:
    return levels


LossTerm = Callable[[Subspace], torch.Tensor]


def cos2_term(sub: Subspace) -> torch.Tensor:
    """cos²(θ₀, θ₁) over the compressing layers' weights (and the norm parameters, structured)."""
    return cos2(sub.regularized_pairs())


def norm_l1_term(sub: Subspace) -> torch.Tensor:
    """Σ|γ| over every norm scale (network slimming's sparsity penalty on channel scales)."""
    scales = [m.weight for m in sub.model.modules() if isinstance(m, NORM_TYPES) and m.weight is not None]
    return torch.stack([s.abs().sum() for s in scales]).sum()


TERMS: dict[str, tuple[str, LossTerm]] = {"cos2": ("beta", cos2_term), "l1": ("l1", norm_l1_term)}


@dataclass
class Method:
    """The built pieces. ``phase_start``: the step from which the regime's phase hook is on
    (quantization's activation delay, SPEC §2); None for methods without a phase."""

    name: str
    geometry: str
    sampler: Callable[[int, torch.Generator], list[Any]]
    schedule: Callable[[dict[str, float], int], dict[str, float]] = _identity_schedule
    terms: dict[str, tuple[float, LossTerm]] = field(default_factory=dict)
    phase_start: int | None = None
    # the (efficient, accurate) α the trainer validates after each epoch; None: the subspace's range.
    # A method that trains one point (a target baseline) is validated there, not at ends it never trains.
    val_range: tuple[float, float] | None = None

    def apply(self, sub: Subspace, point: Any, step: int) -> float:
        """Move ``sub`` to one drawn point (an α, or a dict of levels) with the schedule's levels at
        ``step``; returns the point's compression level (what the progress bar shows)."""
        if isinstance(point, dict):  # a point of several levels, drawn as levels (any density with any bits)
            return sub.set_levels(**self.schedule(point, step))[sub.config.level_name]
        return sub.set_alpha(point, self.schedule(sub.config.levels(point), step))


class MethodSettings:
    """The fields of ``config.MethodConfig`` a builder reads (kept structural to avoid a cycle)."""

    endpoint_prob: float
    alpha_dist: str
    warmup: float
    beta: float
    l1: float
    target: float | None
    sandwich_random: int
    ns_widths: tuple[float, ...]


def _sampler(kind: str, m: MethodSettings, regime: RegimeConfig, record: Regime) -> Callable[..., list[Any]]:
    lo, hi = regime.alpha_range
    if kind == "endpoints":
        return BiasedEndpointSampler(lo, hi, m.endpoint_prob, m.alpha_dist == "log")
    if kind == "uniform":
        return UniformSampler(lo, hi, m.alpha_dist == "log")
    if kind == "edges":
        if record.train_alphas is None:
            raise LcsError(f"the {record.name} regime has no training α for the 'edges' sampler")
        return ChoiceSampler(tuple(record.train_alphas(regime)))
    if kind == "levels":
        if record.sample_levels is None:
            raise LcsError(f"the {record.name} regime has no level sampler")
        return LevelsSampler(regime, record.sample_levels)
    if kind == "sandwich":
        return SandwichSampler(lo, hi, m.sandwich_random)
    if kind == "widths":
        return ListSampler(tuple(regime.alpha_of(w) for w in m.ns_widths))
    if kind == "top":
        return FixedSampler(hi)
    if kind == "target":
        if m.target is None:
            raise LcsError("method 'target' needs a target level: --set method.target=0.1")
        return FixedSampler(regime.alpha_of(m.target))  # validates the target against the regime's range
    raise LcsError(f"unknown sampler {kind!r}")


def build_method(settings: MethodSettings, regime_name: str, method_name: str, regime: RegimeConfig,
                 total_steps: int) -> Method:
    """The Method for ``method_name`` under ``regime_name`` (the regime's ``MethodSpec``), with
    warm-ups in steps."""
    record = record_of(regime_name)
    spec = record.methods.get(method_name)
    if spec is None:
        raise LcsError(f"unknown method {method_name!r} for regime {regime_name!r}; "
                       f"available: {', '.join(record.methods)}")
    warmup = round(settings.warmup * total_steps)
    schedule: Callable[[dict[str, float], int], dict[str, float]] = _identity_schedule
    if spec.schedule == "decay":
        schedule = DecayFromMax(warmup, regime.levels_max, regime.decaying_levels)
    elif spec.schedule == "hold":
        schedule = HoldMax(warmup, regime.levels_max)
    terms = {}
    for name in spec.terms:
        weight_key, fn = TERMS[name]
        weight = getattr(settings, weight_key)
        if weight > 0 and (name != "cos2" or spec.geometry == "line"):
            terms[name] = (weight, fn)
    sampler = _sampler(spec.sampler, settings, regime, record)
    fixed = sampler.alpha if isinstance(sampler, FixedSampler) else None
    return Method(method_name, spec.geometry, sampler, schedule, terms, phase_start=warmup if spec.phase else None,
                  val_range=None if fixed is None else (fixed, fixed))


def methods_of(regime_name: str) -> dict[str, MethodSpec]:
    """The methods a regime offers (name → spec)."""
    return dict(record_of(regime_name).methods)
