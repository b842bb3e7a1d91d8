"""``convert``: make any Conv2d / Linear / norm model a compressible subspace, in place, in one call.

The returned ``Subspace`` handle owns the shared α and knows which tensors are lines and which
layers compress. Models themselves stay ordinary ``nn.Module`` s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bn_stats import prepare_bn_stats
from .errors import LcsError
from .parametrizations import Line, SubspaceState, TopK
from .quant import FakeQuant, attach_layer_quant, prepare_bn_folding
from .regimes import QuantizedConfig, RegimeConfig, StructuredConfig, UnstructuredConfig, check_alpha
from .slim import make_slim

__all__ = ["Subspace", "convert", "register_regime", "default_filter", "all_but_classifier", "LINEAR_TYPES",
           "NORM_TYPES"]

LINEAR_TYPES = (nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm, nn.BatchNorm1d)

FilterFn = Callable[[nn.Module, str], bool]
RegimeHandler = Callable[[nn.Module, str, SubspaceState, Any], None]
Prepare = Callable[[nn.Module, SubspaceState, Any, set[str]], None]


@dataclass(frozen=True)
class _Regime:
    compress: RegimeHandler  # makes one chosen layer compressible
    prepare: Prepare | None  # runs on the whole model first (before any parametrization)
    is_line: Callable[[nn.Module, Any], bool]  # which modules' tensors become lines
    default_filter: Callable[[nn.Module], FilterFn]


_REGIMES: dict[type, _Regime] = {}


def _every_layer_is_line(module: nn.Module, config: Any) -> bool:
    return True


def _leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]


def default_filter(model: nn.Module) -> FilterFn:
    """Compress every Conv2d/Linear except the first and the last (the stem and the classifier),
    which SPEC §2 keeps dense: they are tiny and the most sensitive."""
    layers = _leaf_layers(model)
    keep_dense = {layers[0][0], layers[-1][0]} if layers else set()
    return lambda module, fqn: isinstance(module, LINEAR_TYPES) and fqn not in keep_dense


def all_but_classifier(model: nn.Module) -> FilterFn:
    """Every Conv2d/Linear but the last: the stem narrows its outputs too (it sees all input
    channels), so that residual sums of any width line up; the classifier keeps all outputs."""
    layers = _leaf_layers(model)
    last = layers[-1][0] if layers else None
    return lambda module, fqn: isinstance(module, LINEAR_TYPES) and fqn != last


def register_regime(config_type: type, *, prepare: Prepare | None = None,
                    is_line: Callable[[nn.Module, Any], bool] = _every_layer_is_line,
                    default_filter: Callable[[nn.Module], FilterFn] = default_filter
                    ) -> Callable[[RegimeHandler], RegimeHandler]:
    """Register ``fn(module, fqn, state, config)`` that makes one layer compressible for a regime,
    plus optional whole-model preparation, the line scope and the default layer filter."""

    def deco(fn: RegimeHandler) -> RegimeHandler:
        _REGIMES[config_type] = _Regime(fn, prepare, is_line, default_filter)
        return fn

    return deco


@register_regime(UnstructuredConfig)
def _add_topk(module: nn.Module, fqn: str, state: SubspaceState, config: UnstructuredConfig) -> None:
    parametrize.register_parametrization(module, "weight", TopK(state))


def _slim_everything(model: nn.Module, state: SubspaceState, config: StructuredConfig, compressed: set[str]) -> None:
    for fqn, m in model.named_modules():
        if fqn in compressed:
            c_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            if math.floor(c_out * config.w_min + 0.5) < 1:
                raise LcsError(f"w_min={config.w_min:g} leaves layer {fqn!r} ({c_out} output channels) with zero "
                               f"channels: raise w_min to at least {0.5 / c_out:.3g}")
        if isinstance(m, LINEAR_TYPES + NORM_TYPES):
            make_slim(m, state, scale_out=fqn in compressed)


def _structured_line(module: nn.Module, config: StructuredConfig) -> bool:
    return config.line_scope == "all" or isinstance(module, NORM_TYPES)


@register_regime(StructuredConfig, prepare=_slim_everything, is_line=_structured_line,
                 default_filter=all_but_classifier)
def _width_follows(module: nn.Module, fqn: str, state: SubspaceState, config: StructuredConfig) -> None:
    """Nothing per layer: ``make_slim`` already made compressing layers follow the width."""


def _prepare_batchnorm(model: nn.Module, state: SubspaceState, config: QuantizedConfig, compressed: set[str]) -> None:
    prepare_bn_folding(model, compressed)


@register_regime(QuantizedConfig, prepare=_prepare_batchnorm)
def _add_fake_quant(module: nn.Module, fqn: str, state: SubspaceState, config: QuantizedConfig) -> None:
    """Weights (times the scale of a BatchNorm folded into the layer) fake-quantized after the line;
    the layer's input quantized by a running-range observer."""
    parametrize.register_parametrization(module, "weight", FakeQuant(state, fold=module.__dict__.get("lcs_fold_bn")))
    attach_layer_quant(module, state)


def _line_init(module: nn.Module, name: str, line_init: str) -> str:
    if line_init == "copy":
        return "copy"
    if isinstance(module, NORM_TYPES):
        return "half" if name == "weight" else "zeros"
    return "matched" if name == "weight" else "zeros"


def _nothing_to_compress(model: nn.Module, custom_filter: bool) -> str:
    layers = _leaf_layers(model)
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

    layers = [(fqn, m) for fqn, m in _leaf_layers(model)
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

    # -- α ---------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.state.alpha

    @property
    def level(self) -> float:
        return self.state.level

    @property
    def alpha_range(self) -> tuple[float, float]:
        return self.config.alpha_range

    def set_alpha(self, alpha: float, level: float | None = None) -> float:
        """Move the whole model to α; returns the realized level (density, width or bits).

        A quantized line moves to the upper edge of α's bit-width bin, where that width was trained
        (``QuantizedConfig.position``); ``alpha`` then reports that edge.

        ``level`` overrides γ(α) (training warm-ups use it); it is validated against the regime.
        Raises ``ValueError`` (``LcsError``) for α outside the trained range or NaN.
        """
        a = self.config.position(check_alpha(alpha, *self.alpha_range))
        lvl = self.config.level(a) if level is None else float(level)
        if level is not None and not (0.0 < lvl <= self.config.level_max):
            raise LcsError(f"level={level} is outside (0, {self.config.level_max:g}]")
        self.state.alpha, self.state.level = a, lvl
        return lvl

    @contextlib.contextmanager
    def at(self, alpha: float, level: float | None = None) -> Iterator[float]:
        """Temporarily move to α: ``with sub.at(0.1): model(x)``."""
        old = (self.state.alpha, self.state.level)
        try:
            yield self.set_alpha(alpha, level)
        finally:
            self.state.alpha, self.state.level = old

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
                f"alpha={self.alpha:g}, {self.config.level_name}={self.level:g}, "
                f"{len(self.compressed)} compressed layers, {len(self.lines)} line tensors)")


def convert(model: nn.Module, config: RegimeConfig, *, filter_fn: FilterFn | None = None) -> Subspace:
    """Make ``model`` a compressible subspace in place and return its handle.

    Args:
        model: any model built of Conv2d / Linear / norm layers.
        config: a regime config, e.g. ``UnstructuredConfig(geometry="line")``.
        filter_fn: ``(module, fqn) -> bool`` choosing the layers that compress; defaults to every
            Conv2d/Linear except the first and the last.

    Under ``geometry="line"`` every weight and bias of every Conv2d/Linear/norm layer becomes a
    line (the dense stem and classifier too, SPEC §2). Build the optimizer *after* converting:
    the parameters are new objects.

    Example:
        >>> import lcs
        >>> sub = lcs.convert(lcs.models.create("cpreresnet20"), lcs.UnstructuredConfig())
        >>> sub.set_alpha(0.1)
        0.1
    """
    regime = _REGIMES.get(type(config))
    if regime is None:
        raise LcsError(f"no regime registered for {type(config).__name__}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise LcsError("model is already converted (it has parametrizations)")
    state = SubspaceState(alpha=config.alpha_range[1], level=config.level_max)
    chosen = filter_fn or regime.default_filter(model)
    compressed = [fqn for fqn, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and chosen(m, fqn)]
    if not compressed:
        raise LcsError(_nothing_to_compress(model, filter_fn is not None))
    _warn_if_mostly_dense(model, set(compressed))
    if config.stats_rows:  # BN statistics per level, for any regime that asks (before folding hooks)
        prepare_bn_stats(model, state, config)
    if regime.prepare is not None:
        regime.prepare(model, state, config, set(compressed))
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
        regime.compress(modules[fqn], fqn, state, config)
    return Subspace(model, config, state, compressed, lines)
