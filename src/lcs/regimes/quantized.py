"""Quantization: per-tensor affine fake quantization of the compressing layers' weights and of the
activations entering them, b(α) ∈ {b_min … b_max} bits (SPEC §1; ``lcs.layers.quant``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch.nn.utils import parametrize

from ..errors import LcsError
from ..layers.quant import BITS_RANGE, FakeQuant, attach_layer_quant, fix_bits, prepare_bn_folding, set_activation_quant
from ..layers.select import default_filter
from .base import BakeContext, MethodSpec, Regime, RegimeConfig, check_alpha, check_level

__all__ = ["QuantizedConfig", "REGIME", "BitBins", "check_bit_range", "bits_settings", "add_fake_quant",
           "prepare_folding", "fix_network_bits", "bin_edges", "bit_stats_rows", "bit_stats_row"]


def check_bit_range(b_min: Any, b_max: Any, prefix: str = "") -> None:
    for name, b in ((f"{prefix}b_min", b_min), (f"{prefix}b_max", b_max)):
        if isinstance(b, bool) or not isinstance(b, int) or not (BITS_RANGE[0] <= b <= BITS_RANGE[1]):
            raise LcsError(f"{name}={b!r} is invalid: must be a whole number of bits in "
                           f"[{BITS_RANGE[0]}, {BITS_RANGE[1]}]")
    if b_min > b_max:
        raise LcsError(f"the bit range is empty: {prefix}b_min={b_min} > {prefix}b_max={b_max}")


@dataclass(frozen=True)
class BitBins:
    """α cut into n = b_max − b_min + 1 equal bins, bin i → b_min + i bits, closed on the right
    ((i/n, (i+1)/n], α = 0 in the first), so the bins' upper edges k/n are exactly b_min … b_max and
    α = 1 is b_max. (Left-closed bins would send the edge k/n to the next bin and never train b_min.)"""

    b_min: int
    b_max: int

    @property
    def n(self) -> int:
        return self.b_max - self.b_min + 1

    def bits(self, alpha: float) -> int:
        return self.b_min + max(0, math.ceil(round(alpha * self.n, 9)) - 1)

    def edge(self, bits: float) -> float:
        """The upper edge of the bin of ``bits``: the α that LCS+L trains for that bit width."""
        b = check_level("bits", bits, self.b_min, self.b_max, whole=True)
        return (b - self.b_min + 1) / self.n


def bit_stats_rows(config: Any) -> int:
    """One set of BatchNorm statistics per bit width (``bn_stats_per_bits``), for any config with bits."""
    return config.bins.n if config.bn_stats_per_bits else 0


def bit_stats_row(config: Any, levels: Mapping[str, float]) -> int:
    """The statistics row of the bit width in ``levels``."""
    return check_level("bits", levels["bits"], config.b_min, config.b_max, whole=True) - config.b_min


@dataclass(frozen=True)
class QuantizedConfig(RegimeConfig):
    """Quantization: α is cut into n = b_max − b_min + 1 equal bins, bin i → b_min + i bits (SPEC §1).

    The bins are closed on the right, ((i/n, (i+1)/n], with α = 0 in the first), so the bins' upper
    edges k/n, k = 1..n, which LCS+L trains on (SPEC §2), are exactly b_min … b_max and α = 1 is
    b_max. Weights of the compressing layers and the activations entering them are fake-quantized to
    b bits (``lcs.layers.quant``). ``bn_stats_per_bits``: every BatchNorm keeps one set of running
    statistics per bit width (the subspaces, whose bits change per step); off for one network at one
    bit width.

    Example:
        >>> QuantizedConfig().level(0.5), QuantizedConfig().level(1.0), QuantizedConfig().alpha_of(3)
        (5, 8, 0.16666666666666666)
    """

    b_min: int = 3
    b_max: int = 8
    bn_stats_per_bits: bool = True

    regime: ClassVar[str] = "quantized"
    level_names: ClassVar[tuple[str, ...]] = ("bits",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bit_range(self.b_min, self.b_max)
        if not isinstance(self.bn_stats_per_bits, bool):
            raise LcsError(f"bn_stats_per_bits must be true or false, got {self.bn_stats_per_bits!r}")

    @property
    def bins(self) -> BitBins:
        return BitBins(self.b_min, self.b_max)

    @property
    def num_levels(self) -> int:
        return self.bins.n

    @property
    def stats_rows(self) -> int:
        """BatchNorm statistics sets: one per bit width."""
        return bit_stats_rows(self)

    def stats_row(self, alpha: float, levels: Mapping[str, float]) -> int:
        """The row of the bit width (α only picks the bin, and the bin is the bits)."""
        return bit_stats_row(self, levels)

    @property
    def levels_max(self) -> dict[str, float]:
        return {"bits": self.b_max}

    def levels(self, alpha: float) -> dict[str, float]:
        return {"bits": self.bins.bits(check_alpha(alpha, *self.alpha_range))}

    def check_levels(self, levels: Mapping[str, float]) -> dict[str, float]:
        return {"bits": check_level("bits", levels["bits"], self.b_min, self.b_max, whole=True)}

    def position(self, alpha: float) -> float:
        """On a line, the upper edge of α's bin: LCS+L trains each bit width there only (SPEC §2), so
        every α of the bin is served by that trained network, not by an untrained point beside it
        (on digits with BN, α = 0 scored 0.10 where its bin's edge α = 1/6 scores 0.93)."""
        return self.alpha_of(self.level(alpha)) if self.geometry == "line" else alpha

    def alpha_of(self, level: float) -> float:
        """The upper edge of the bin of ``level`` bits: the α that LCS+L trains for that bit width."""
        return self.bins.edge(level)


def bits_settings(m: Any) -> None:
    """The ``method`` keys of the bit range, checked under their config names."""
    check_bit_range(m.b_min, m.b_max, prefix="method.")


def _settings(m: Any, method: str) -> QuantizedConfig:
    bits_settings(m)
    # BN statistics per bit width for the subspaces; the target baseline is one network at one width
    return QuantizedConfig(geometry="line" if method == "lcs_l" else "point", b_min=m.b_min, b_max=m.b_max,
                           line_init=m.line_init, bn_stats_per_bits=method != "target")


def prepare_folding(model: Any, state: Any, config: Any, compressed: set[str], decisions: dict) -> dict:
    """BatchNorms after quantizing convs fold into them (recorded, so a loaded subspace folds the same)."""
    return {"bn_folds": prepare_bn_folding(model, compressed, decisions.get("bn_folds"))}


def add_fake_quant(module: Any, fqn: str, state: Any, config: Any) -> None:
    """Weights (times the scale of a BatchNorm folded into the layer) fake-quantized after the line
    (and after TopK where a regime chains it); the layer's input quantized by a running-range observer."""
    parametrize.register_parametrization(module, "weight", FakeQuant(state, fold=module.__dict__.get("lcs_fold_bn")))
    attach_layer_quant(module, state)


def fix_network_bits(net: Any, ctx: BakeContext) -> None:
    """Each plain network keeps its own input quantizers' bits (a running request keeps its bits)."""
    fix_bits(net, int(ctx.levels["bits"]))


def bin_edges(config: Any) -> tuple[float, ...]:
    """The bins' upper edges k/n, one per bit width (a uniformly random bit width per step), for any
    config with bit bins."""
    return tuple(config.bins.edge(b) for b in range(config.b_min, config.b_max + 1))


REGIME = Regime(
    name="quantized", config=QuantizedConfig, settings=_settings, convert_layer=add_fake_quant,
    grid=lambda config: list(bin_edges(config)),  # the bins' upper edges, where LCS+L trains each bit width
    methods={
        "lcs_l": MethodSpec("line", "edges", terms=("cos2",), phase=True,
                            help="LCS+L: the bins' edges, weights quantized from the first step"),
        "lcs_p": MethodSpec("point", "edges", "hold", phase=True, help="LCS+P: b_max during the warm-up"),
        "target": MethodSpec("point", "target", phase=True, help="one network at method.target bits"),
    },
    train_alphas=bin_edges, prepare=prepare_folding, default_filter=default_filter, finish=(fix_network_bits,),
    phase=set_activation_quant, encoders=("dense", "packed_int", "sparse_int"), plot_axis="bits",
    notes={"onnx": " (ONNX holds quantized weights as uint8 codes + DequantizeLinear, one byte per weight; the "
                   ".safetensors artifact packs them into b bits)"},
)
