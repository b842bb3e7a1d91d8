"""Methods as small pluggable pieces for the one training loop.

A method is (geometry, α sampler, compression schedule, extra loss terms). The loop never asks
which method it runs: it asks the sampler for the α's of this step, the schedule for the level at
each α, and sums the extra terms. Adding a method is adding a builder to ``METHODS``.

Samplers are pure functions of (step, generator): the generator is seeded from (seed, step), so
every distributed rank draws the same α with no communication, and a resumed run draws exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import LcsError
from .ops import cos2
from .regimes import QuantizedConfig, RegimeConfig
from .subspace import NORM_TYPES, Subspace

__all__ = ["BiasedEndpointSampler", "UniformSampler", "FixedSampler", "SandwichSampler", "ListSampler",
           "ChoiceSampler", "DecayFromMax", "HoldMax", "Method", "METHODS", "build_method", "cos2_term", "norm_l1_term"]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


@dataclass(frozen=True)
class BiasedEndpointSampler:
    """With probability ``p_endpoint`` an endpoint (each half the time), else α ~ U[lo, hi]."""

    lo: float
    hi: float
    p_endpoint: float = 0.5

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        u = torch.rand(2, generator=gen)
        if float(u[0]) < self.p_endpoint:
            return [self.lo if float(u[1]) < 0.5 else self.hi]
        return [_uniform(gen, self.lo, self.hi)]


@dataclass(frozen=True)
class UniformSampler:
    """α ~ U[lo, hi]."""

    lo: float
    hi: float

    def __call__(self, step: int, gen: torch.Generator) -> list[float]:
        return [_uniform(gen, self.lo, self.hi)]


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
class DecayFromMax:
    """level = γ + (γ_max − γ)·max(0, 1 − t/T_w): compression fades in over the warm-up (SPEC §2,
    TopK warm-up). Returns None after the warm-up, meaning plain γ(α)."""

    warmup_steps: int
    level_max: float

    def __call__(self, level: float, step: int) -> float:
        if step >= self.warmup_steps:
            return level
        return level + (self.level_max - level) * (1.0 - step / self.warmup_steps)


@dataclass(frozen=True)
class HoldMax:
    """level = γ_max during the warm-up, then γ(α) (LCS+P: train dense first)."""

    warmup_steps: int
    level_max: float

    def __call__(self, level: float, step: int) -> float:
        return self.level_max if step < self.warmup_steps else level


def _identity_schedule(level: float, step: int) -> float:
    return level


LossTerm = Callable[[Subspace], torch.Tensor]


def cos2_term(sub: Subspace) -> torch.Tensor:
    """cos²(θ₀, θ₁) over the compressing layers' weights (and the norm parameters, structured)."""
    return cos2(sub.regularized_pairs())


@dataclass
class Method:
    """``act_quant_start``: the step from which activations are quantized (quantization's
    activation delay, SPEC §2); None for methods that quantize no activations."""

    name: str
    geometry: str
    sampler: Callable[[int, torch.Generator], list[float]]
    schedule: Callable[[float, int], float] = _identity_schedule
    terms: dict[str, tuple[float, LossTerm]] = field(default_factory=dict)
    act_quant_start: int | None = None


def _lcs_l(m: MethodSettings, regime: RegimeConfig, total_steps: int) -> Method:
    lo, hi = regime.alpha_range
    return Method("lcs_l", "line", BiasedEndpointSampler(lo, hi, m.endpoint_prob),
                  DecayFromMax(round(m.warmup * total_steps), regime.level_max),
                  {"cos2": (m.beta, cos2_term)} if m.beta > 0 else {})


def _lcs_p(m: MethodSettings, regime: RegimeConfig, total_steps: int) -> Method:
    lo, hi = regime.alpha_range
    return Method("lcs_p", "point", UniformSampler(lo, hi),
                  HoldMax(round(m.warmup * total_steps), regime.level_max))


def norm_l1_term(sub: Subspace) -> torch.Tensor:
    """Σ|γ| over every norm scale (network slimming's sparsity penalty on channel scales)."""
    scales = [m.weight for m in sub.model.modules() if isinstance(m, NORM_TYPES) and m.weight is not None]
    return torch.stack([s.abs().sum() for s in scales]).sum()


def _sandwich(name: str, geometry: str) -> Callable[..., Method]:
    def build(m: MethodSettings, regime: RegimeConfig, total_steps: int) -> Method:
        lo, hi = regime.alpha_range
        terms = {"cos2": (m.beta, cos2_term)} if geometry == "line" and m.beta > 0 else {}
        return Method(name, geometry, SandwichSampler(lo, hi, m.sandwich_random), terms=terms)

    return build


def _ns(m: MethodSettings, regime: RegimeConfig, total_steps: int) -> Method:
    return Method("ns", "point", ListSampler(tuple(regime.alpha_of(w) for w in m.ns_widths)))


def _lec(m: MethodSettings, regime: RegimeConfig, total_steps: int) -> Method:
    return Method("lec", "point", FixedSampler(regime.alpha_range[1]), terms={"l1": (m.l1, norm_l1_term)})


def _target(m: MethodSettings, regime: RegimeConfig, total_steps: int) -> Method:
    if m.target is None:
        raise LcsError("method 'target' needs a target level: --set method.target=0.1")
    regime.level(m.target)  # validates the target against the regime's range
    return Method("target", "point", FixedSampler(m.target),
                  DecayFromMax(round(m.warmup * total_steps), regime.level_max))


def _bin_edges(regime: QuantizedConfig) -> tuple[float, ...]:
    return tuple(regime.alpha_of(b) for b in range(regime.b_min, regime.b_max + 1))


def _quant_lcs_l(m: MethodSettings, regime: QuantizedConfig, total_steps: int) -> Method:
    """α on the bins' upper edges (a uniform bit width), weights quantized from the first step,
    activations after the warm-up; + cos²."""
    return Method("lcs_l", "line", ChoiceSampler(_bin_edges(regime)),
                  terms={"cos2": (m.beta, cos2_term)} if m.beta > 0 else {},
                  act_quant_start=round(m.warmup * total_steps))


def _quant_lcs_p(m: MethodSettings, regime: QuantizedConfig, total_steps: int) -> Method:
    """b_max during the warm-up, then a uniformly random bit width per step."""
    warmup = round(m.warmup * total_steps)
    return Method("lcs_p", "point", ChoiceSampler(_bin_edges(regime)), HoldMax(warmup, regime.level_max),
                  act_quant_start=warmup)


def _bit_target(m: MethodSettings, regime: QuantizedConfig, total_steps: int) -> Method:
    """One network at the fixed bit width ``method.target``."""
    if m.target is None:
        raise LcsError("method 'target' needs a target bit width: --set method.target=4")
    return Method("target", "point", FixedSampler(regime.alpha_of(m.target)),
                  act_quant_start=round(m.warmup * total_steps))


class MethodSettings:
    """The fields of ``config.MethodConfig`` a builder reads (kept structural to avoid a cycle)."""

    endpoint_prob: float
    warmup: float
    beta: float
    target: float | None
    sandwich_random: int
    ns_widths: tuple[float, ...]
    l1: float


METHODS: dict[str, dict[str, Callable[..., Method]]] = {
    "unstructured": {"lcs_l": _lcs_l, "lcs_p": _lcs_p, "target": _target},
    "structured": {"lcs_l": _sandwich("lcs_l", "line"), "lcs_p": _sandwich("lcs_p", "point"),
                   "us": _sandwich("us", "point"), "ns": _ns, "lec": _lec},
    "quantized": {"lcs_l": _quant_lcs_l, "lcs_p": _quant_lcs_p, "target": _bit_target},
}


def build_method(settings: MethodSettings, regime_name: str, method_name: str, regime: RegimeConfig,
                 total_steps: int) -> Method:
    """The Method for ``method_name`` under ``regime_name``, with warm-ups in steps."""
    table = METHODS.get(regime_name)
    if table is None:
        raise LcsError(f"unknown regime {regime_name!r}; available: {', '.join(METHODS)}")
    builder = table.get(method_name)
    if builder is None:
        raise LcsError(f"unknown method {method_name!r} for regime {regime_name!r}; "
                       f"available: {', '.join(table)}")
    return builder(settings, regime, total_steps)
