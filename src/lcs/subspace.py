"""``convert``: make any Conv2d / Linear / norm model a compressible subspace, in place, in one call.

The returned ``Subspace`` handle owns the shared α and knows which tensors are lines and which
layers compress. Models themselves stay ordinary ``nn.Module`` s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import LcsError
from .layers.bn_stats import prepare_bn_stats
from .layers.parametrizations import Line, SubspaceState
from .layers.select import LINEAR_TYPES, NORM_TYPES, FilterFn, all_but_classifier, default_filter, leaf_layers
from .regimes import Point, RegimeConfig, check_alpha, record_of

__all__ = ["Subspace", "convert", "default_filter", "all_but_classifier", "LINEAR_TYPES", "NORM_TYPES"]


def _line_init(module: nn.Module, name: str, line_init: str) -> str:
    if line_init == "copy":
        return "copy"
    if isinstance(module, NORM_TYPES):
        return "half" if name == "weight" else "zeros"
    return "matched" if name == "weight" else "zeros"


def _nothing_to_compress(model: nn.Module, custom_filter: bool) -> str:
    layers = leaf_layers(model)
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv3d,
                                                                                  nn.ConvTranspose2d))})
    if custom_filter:
        why = "filter_fn selected none of its Conv2d/Linear layers"
    elif not layers:
        why = "the model has no Conv2d or Linear layer"
    else:
        why = (f"it has only {len(layers)} Conv2d/Linear layer(s), and the default filter keeps the first "
               f"and the last dense (the stem and the classifier); pass filter_fn to choose layers")
    unsupported = f" ({', '.join(others)} layers are not supported)" if others else ""
    return f"nothing to compress: {why}{unsupported}"


def _warn_if_mostly_dense(model: nn.Module, compressed: set[str]) -> None:
    """A model whose chosen layers hold a small share of its weights compresses little: say so."""
    import warnings

    layers = [(fqn, m) for fqn, m in leaf_layers(model)
              if not isinstance(m.weight, nn.parameter.UninitializedParameter)]  # lazy layers: sizes unknown yet
    total = sum(m.weight.numel() for _, m in layers)
    chosen = sum(m.weight.numel() for fqn, m in layers if fqn in compressed)
    if total and chosen / total < 0.5:
        dense = max(((fqn, m) for fqn, m in layers if fqn not in compressed),
                    key=lambda fm: fm[1].weight.numel())
        warnings.warn(f"only {chosen / total:.0%} of the Conv2d/Linear weights compress: {dense[0]!r} alone keeps "
                      f"{dense[1].weight.numel():,} weights dense (the default filter keeps the first and last "
                      f"layers dense); pass filter_fn to compress it", stacklevel=3)


class Subspace:
    """A converted model plus its α. Use ``set_alpha`` (or ``with sub.at(a):``) to move on it.

    Attributes:
        model: the converted model (modified in place by ``convert``).
        config: the regime config.
        compressed: fully qualified names of the layers that compress.
        lines: (fqn, tensor name) of every tensor that is a line (LCS+L only).
    """

    def __init__(self, model: nn.Module, config: RegimeConfig, state: SubspaceState,
                 compressed: list[str], lines: list[tuple[str, str]]):
        self.model = model
        self.config = config
        self.state = state
        self.compressed = compressed
        self.lines = lines
        self.input_shape: tuple[int, ...] | None = None  # (C, H, W): sizes physically slim networks
        self.decisions: dict[str, Any] = {}  # what the regime decided at conversion (stored in subspace files)

    # -- α and levels ----------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.state.alpha

    @property
    def level(self) -> float:
        """The primary level (density, width or bits; ``levels`` has every named level)."""
        return self.state.levels[self.config.level_name]

    @property
    def levels(self) -> dict[str, float]:
        return dict(self.state.levels)

    @property
    def alpha_range(self) -> tuple[float, float]:
        return self.config.alpha_range

    def set_alpha(self, alpha: float, level: float | Mapping[str, float] | None = None) -> float:
        """Move the whole model to α; returns the realized primary level (density, width or bits).

        A quantized line moves to the upper edge of α's bit-width bin, where that width was trained
        (``QuantizedConfig.position``); ``alpha`` then reports that edge.

        ``level`` overrides γ(α) (training warm-ups use it): the primary level as a number, or a dict of
        named levels. Raises ``ValueError`` (``LcsError``) for α outside the trained range or NaN.
        """
        a = self.config.position(check_alpha(alpha, *self.alpha_range))
        levels = self.config.levels(a)
        if level is not None:
            override = level if isinstance(level, Mapping) else {self.config.level_name: level}
            maxima = self.config.levels_max
            for name, value in override.items():
                if name not in maxima:
                    raise LcsError(f"{name!r} is not a level of the {self.config.regime} regime "
                                   f"({', '.join(self.config.level_names)})")
                if not (0.0 < float(value) <= maxima[name]):
                    raise LcsError(f"{name}={value} is outside (0, {maxima[name]:g}]")
                levels[name] = float(value) if not isinstance(levels[name], int) else int(value)
        self.state.alpha, self.state.levels = a, levels
        return levels[self.config.level_name]

    def set_levels(self, **levels: float) -> dict[str, float]:
        """Move a point subspace (LCS+P) to any combination of its levels, e.g.
        ``sub.set_levels(density=0.1, bits=4)``; levels not named keep their current value. A line's
        weights depend on α: use ``set_alpha`` there."""
        if self.config.geometry != "point":
            raise LcsError("set_levels needs a point subspace (LCS+P): on a line the levels follow α (set_alpha)")
        unknown = set(levels) - set(self.config.level_names)
        if unknown:
            raise LcsError(f"unknown level(s) {', '.join(sorted(unknown))} for the {self.config.regime} regime "
                           f"({', '.join(self.config.level_names)})")
        self.state.levels = self.config.check_levels({**self.state.levels, **levels})
        return dict(self.state.levels)

    def move(self, point: Point) -> dict[str, float]:
        """Go to a point: an α, or a dict of levels (points only); returns every level."""
        if isinstance(point, Mapping):
            return self.set_levels(**point)
        self.set_alpha(point)
        return dict(self.state.levels)

    @contextlib.contextmanager
    def at(self, point: Point, level: float | Mapping[str, float] | None = None) -> Iterator[float]:
        """Temporarily move to α (or a dict of levels): ``with sub.at(0.1): model(x)``; yields the
        primary level."""
        old = (self.state.alpha, dict(self.state.levels))
        try:
            if isinstance(point, Mapping):
                yield self.set_levels(**point)[self.config.level_name]
            else:
                yield self.set_alpha(point, level)
        finally:
            self.state.alpha, self.state.levels = old

    # -- parameters ------------------------------------------------------------------------------
    def _module(self, fqn: str) -> nn.Module:
        return self.model.get_submodule(fqn)

    def regularized_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(θ₀, θ₁) that the cos² regularizer sees: the compressing layers' weights, plus every
        norm parameter for regimes whose lines include norms (structured, SPEC §2)."""
        compressed = set(self.compressed)
        pairs = []
        for fqn, name in self.lines:
            module = self._module(fqn)
            if (fqn in compressed and name == "weight") or (self.config.regularize_norms
                                                            and isinstance(module, NORM_TYPES)):
                plist = module.parametrizations[name]
                pairs.append((plist.original0, plist.original1))
        return pairs

    def compressed_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The compressing layers' weights at the current α, as the forward pass sees them."""
        for fqn in self.compressed:
            yield fqn, self._module(fqn).weight

    def __repr__(self) -> str:
        return (f"Subspace({type(self.config).__name__}, geometry={self.config.geometry}, "
                f"alpha={self.alpha:g}, {', '.join(f'{k}={v:g}' for k, v in self.state.levels.items())}, "
                f"{len(self.compressed)} compressed layers, {len(self.lines)} line tensors)")


def convert(model: nn.Module, config: RegimeConfig, *, filter_fn: FilterFn | None = None,
            decisions: Mapping[str, Any] | None = None) -> Subspace:
    """Make ``model`` a compressible subspace in place and return its handle.

    Args:
        model: any model built of Conv2d / Linear / norm layers.
        config: a regime config, e.g. ``UnstructuredConfig(geometry="line")``.
        filter_fn: ``(module, fqn) -> bool`` choosing the layers that compress; defaults to every
            Conv2d/Linear except the first and the last.
        decisions: what an earlier conversion decided (``Subspace.decisions``, e.g. which BatchNorms
            fold into quantized convs), as a subspace file records it: reused instead of re-derived.

    Under ``geometry="line"`` every weight and bias of every Conv2d/Linear/norm layer becomes a
    line (the dense stem and classifier too, SPEC §2). Build the optimizer *after* converting:
    the parameters are new objects.

    Example:
        >>> import lcs
        >>> sub = lcs.convert(lcs.models.create("cpreresnet20"), lcs.UnstructuredConfig())
        >>> sub.set_alpha(0.1)
        0.1
    """
    regime = record_of(config)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise LcsError("model is already converted (it has parametrizations)")
    state = SubspaceState(alpha=config.alpha_range[1], levels=config.levels(config.alpha_range[1]))
    chosen = filter_fn or (regime.default_filter or default_filter)(model)
    compressed = [fqn for fqn, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and chosen(m, fqn)]
    if not compressed:
        raise LcsError(_nothing_to_compress(model, filter_fn is not None))
    _warn_if_mostly_dense(model, set(compressed))
    if config.stats_rows:  # BN statistics per level, for any regime that asks (before folding hooks)
        prepare_bn_stats(model, state, config)
    made: dict[str, Any] = {}
    if regime.prepare is not None:
        made = regime.prepare(model, state, config, set(compressed), dict(decisions or {}))
    lines: list[tuple[str, str]] = []
    if config.geometry == "line":
        for fqn, module in model.named_modules():
            if not isinstance(module, LINEAR_TYPES + NORM_TYPES) or not regime.is_line(module, config):
                continue
            for name in ("weight", "bias"):
                if isinstance(getattr(module, name, None), nn.Parameter):
                    init = _line_init(module, name, config.line_init)
                    parametrize.register_parametrization(module, name, Line(state, init))
                    lines.append((fqn, name))
    modules = dict(model.named_modules())
    for fqn in compressed:
        regime.convert_layer(modules[fqn], fqn, state, config)
    sub = Subspace(model, config, state, compressed, lines)
    sub.decisions = made
    return sub
