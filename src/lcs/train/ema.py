"""An exponential moving average of the weights (``optim.ema``), the one that ships.

After every optimizer step each floating tensor of the model's state (parameters, the line's two
endpoints, BatchNorm statistics rows, activation ranges) moves towards the live one:
``ema = d·ema + (1 − d)·live``. The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))``
after ``t`` updates, so the average forgets the random start within the first steps instead of
carrying it for ``1 / (1 − decay)`` of them. Integer and boolean state (batch counters, flags) is
copied. Averaging the statistics with the weights keeps them matched, as timm's ModelEma does.

The trainer validates the averaged weights after each epoch and, when the last step is done,
copies them into the model for good: the final BatchNorm pass, the checkpoint, ``lcs eval`` and
``lcs export`` all see what was averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightEMA", "ema_decay_at"]


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (1-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def _write_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's state in place (its parameters and buffers keep their storage)."""
    live = model.state_dict()
    for k, v in tensors.items():
        live[k].copy_(v)


class WeightEMA:
    """The average of ``model``'s state. ``updates`` counts the steps averaged (it is the trainer's
    step, so a resumed run continues the same sequence of decays)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average again from the model's state (a resumed run without a stored average)."""
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        # read afresh each step, not cached: a module that rebinds a buffer instead of writing it in
        # place would leave a cached reference stale; the read costs far less than the step itself
        live = model.state_dict()
        if live.keys() != self.state.keys():
            raise ValueError("the model's state has other keys than the average's")
        floats_e, floats_l, others = [], [], []
        for k, e in self.state.items():
            v = live[k].detach()
            if e.is_floating_point():
                floats_e.append(e)
                floats_l.append(v)
            else:
                others.append((e, v))
        return floats_e, floats_l, others

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Average in the model's state after update number ``updates`` (1-based)."""
        ema, live, others = self._pairs(model)
        d = ema_decay_at(self.decay, updates)
        if ema:
            torch._foreach_lerp_(ema, live, 1.0 - d)
        for e, v in others:
            e.copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Write the average into ``model`` (the weights that ship)."""
        _write_state(model, self.state)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Run the block on the averaged weights, then put the live ones back exactly."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield
        finally:
            _write_state(model, live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.state.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors.keys() != self.state.keys():
            missing = sorted(self.state.keys() - tensors.keys())[:3]
            extra = sorted(tensors.keys() - self.state.keys())[:3]
            raise ValueError(f"the stored average does not match the model (missing {missing}, unexpected {extra})")
        for k, v in tensors.items():
            if v.shape != self.state[k].shape:
                raise ValueError(f"the stored average's {k} has shape {tuple(v.shape)}, the model's "
                                 f"{tuple(self.state[k].shape)}")
            self.state[k].copy_(v)
