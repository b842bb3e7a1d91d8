"""The two parametrizations every regime is built from: a line between two weight sets, and a
compression function chained after it (``torch.nn.utils.parametrize``).

Registered on a weight, ``Line`` turns it into ``original0``/``original1`` and returns
θ(α) = (1−α)·θ₀ + α·θ₁; a compression parametrization registered on the same tensor then takes
θ(α) and returns f(θ(α), γ). The module's own forward is never copied or changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import topk_sparsify
from . import topk_batch

__all__ = ["SubspaceState", "Line", "TopK"]


@dataclass
class SubspaceState:
    """The one piece of mutable state: where on the subspace the model currently is.

    Shared by reference between all parametrizations of a model (``copy.deepcopy`` of the model
    keeps that sharing inside the copy). ``levels`` holds each named compression level (density,
    width, bits, ...); every parametrization reads its own by name, so a regime may have several.
    """

    alpha: float = 1.0
    levels: dict[str, float] = field(default_factory=dict)


class Line(nn.Module):
    """θ(α) = (1−α)·θ₀ + α·θ₁ with θ₀ = the module's current tensor and θ₁ initialized by ``init``.

    ``init``: ``"matched"`` (a fresh normal draw with θ₀'s standard deviation: for Kaiming-normal
    convs that is the SPEC's independent Kaiming init), ``"zeros"``,
    ``"half"`` (constant 0.5: norm scales of the second endpoint), or ``"copy"`` (θ₁ = θ₀).
    """

    def __init__(self, state: SubspaceState, init: str):
        super().__init__()
        self.state = state
        self.init = init

    def forward(self, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        return torch.lerp(w0, w1, self.state.alpha)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = w.detach().clone()
        if w0.is_meta:  # a model built only to receive stored values (``load_subspace``): draw nothing
            return w0, torch.empty_like(w0)
        if self.init == "copy":
            w1 = w0.clone()
        elif self.init == "matched":
            # An independent draw at the scale of θ₀: Kaiming fan-out for Kaiming-initialized convs
            # (SPEC §2), and no oversized classifier when θ₀ was initialized small.
            std = float(w0.std()) if w0.numel() > 1 else 0.0
            if std > 0:
                w1 = torch.randn_like(w0) * std
            else:
                w1 = nn.init.kaiming_normal_(torch.empty_like(w0), mode="fan_out", nonlinearity="relu")
        elif self.init == "zeros":
            w1 = torch.zeros_like(w0)
        elif self.init == "half":
            w1 = torch.full_like(w0, 0.5)
        else:
            raise ValueError(f"unknown line init {self.init!r}")
        return w0, w1

    def extra_repr(self) -> str:
        return f"init={self.init}"


class TopK(nn.Module):
    """Unstructured sparsity: keep the largest-magnitude fraction ``state.levels[level]`` of the weights."""

    def __init__(self, state: SubspaceState, level: str = "density"):
        super().__init__()
        self.state = state
        self.level = level

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return topk_sparsify(w, self.state.levels[self.level])

    @staticmethod
    def bake_many(steps: Sequence[TopK], weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each step's forward on its weight, for all at once (what a switch runs; no gradients):
        equal to the forwards, in one compiled call (``lcs.layers.topk_batch``)."""
        return topk_batch.topk_sparsify_many(weights, [s.state.levels[s.level] for s in steps])

    @staticmethod
    def warm_up() -> None:
        """Ready ``bake_many``'s compiled kernel (``Baker`` calls this once it sees a TopK)."""
        topk_batch.warm_up()

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w
