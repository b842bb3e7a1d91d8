"""Width-adaptive layers for structured sparsity, and the physically slim network they stand for.

``make_slim`` gives a Conv2d / Linear / per-channel norm a forward that *computes* with fewer
channels: it consumes whatever the previous layer produced (``x.shape[1]`` input channels) and,
when it compresses, produces only its first ``width_channels(C_out, w)`` outputs. Narrow widths
are therefore really cheaper in training, not masked. ``slim_down`` turns such a network at one
width into plain, smaller ``nn.Conv2d`` / ``nn.Linear`` / norm modules (what ``lcs export``
ships); ``resize_to_shapes`` is its inverse on the loading side.

Deploy side: imports only torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LcsError

__all__ = ["width_channels", "make_slim", "is_slim", "channel_plan", "slim_down", "resize_to_shapes",
           "SLIM_NORM_TYPES"]

SLIM_NORM_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d, nn.GroupNorm)


def width_channels(channels: int, width: float) -> int:
    """round(w·C) with halves rounded up, at least 1 (SPEC §1)."""
    return max(1, math.floor(channels * width + 0.5))


class _SlimState:
    """Per-module attributes of a slim layer (kept in one object so ``copy.copy`` shares it)."""

    __slots__ = ("state", "scale_out")

    def __init__(self, state: Any, scale_out: bool):
        self.state = state  # the SubspaceState shared by the model: ``state.levels["width"]`` is the width
        self.scale_out = scale_out


def _out_channels(module: nn.Module, full: int) -> int:
    slim = module.lcs_slim
    return width_channels(full, slim.state.levels["width"]) if slim.scale_out else full


class _SlimConv2d:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k_out = _out_channels(self, self.out_channels)
        w = self.weight[:k_out, : x.shape[1]]
        b = self.bias[:k_out] if self.bias is not None else None
        return self._conv_forward(x, w, b)


class _SlimLinear:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k_out = _out_channels(self, self.out_features)
        b = self.bias[:k_out] if self.bias is not None else None
        return F.linear(x, self.weight[:k_out, : x.shape[-1]], b)


class _SlimBatchNorm:
    """``_BatchNorm.forward`` on the first ``x.shape[1]`` channels: the running statistics of
    those channels are updated in place through the slice (a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        rm = self.running_mean[:k] if keep_stats and self.running_mean is not None else None
        rv = self.running_var[:k] if keep_stats and self.running_var is not None else None
        w = self.weight[:k] if self.weight is not None else None
        b = self.bias[:k] if self.bias is not None else None
        return F.batch_norm(x, rm, rv, w, b, use_batch, factor, self.eps)


class _SlimInstanceNorm:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        rm = self.running_mean[:k] if self.running_mean is not None else None
        rv = self.running_var[:k] if self.running_var is not None else None
        w = self.weight[:k] if self.weight is not None else None
        b = self.bias[:k] if self.bias is not None else None
        use_input_stats = self.training or not self.track_running_stats
        return F.instance_norm(x, rm, rv, w, b, use_input_stats, self.momentum if self.momentum is not None else 0.0,
                               self.eps)


class _SlimLayerNorm:
    """GroupNorm with one group: statistics over the active channels of each image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        w = self.weight[:k] if self.weight is not None else None
        b = self.bias[:k] if self.bias is not None else None
        return F.group_norm(x, 1, w, b, self.eps)


_MIXINS: tuple[tuple[type, type], ...] = (
    (nn.Conv2d, _SlimConv2d), (nn.Linear, _SlimLinear), (nn.BatchNorm2d, _SlimBatchNorm),
    (nn.BatchNorm1d, _SlimBatchNorm), (nn.InstanceNorm2d, _SlimInstanceNorm),
    (nn.GroupNorm, _SlimLayerNorm),
)
_SLIM_CLASSES: dict[type, type] = {}  # plain class -> its slim twin
_PLAIN_OF: dict[type, type] = {}  # slim twin -> plain class


def _slim_class(cls: type) -> type:
    if cls not in _SLIM_CLASSES:
        mixin = next((mx for base, mx in _MIXINS if issubclass(cls, base)), None)
        if mixin is None:
            raise LcsError(f"structured sparsity cannot slice a {cls.__name__}: use Conv2d, Linear and per-channel "
                           "norms (InstanceNorm2d or BatchNorm; GroupNorm's groups would change with the width)")
        slim = type(f"Slim{cls.__name__}", (mixin, cls), {})
        _SLIM_CLASSES[cls], _PLAIN_OF[slim] = slim, cls
    return _SLIM_CLASSES[cls]


def is_slim(module: nn.Module) -> bool:
    return "lcs_slim" in module.__dict__


def make_slim(module: nn.Module, state: Any, scale_out: bool) -> None:
    """Give ``module`` (in place, before any parametrization) the width-following forward.

    ``scale_out``: whether its outputs follow the width (compressing layers) or stay whole (the
    classifier). Inputs always follow what arrives.
    """
    if isinstance(module, nn.GroupNorm) and module.num_groups != 1:
        raise LcsError(f"structured sparsity needs norms that serve any width: GroupNorm with {module.num_groups} "
                       "groups would regroup channels as the width changes (use norm 'in', 'ln' or 'bn')")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise LcsError(f"structured sparsity does not slice grouped convolutions (groups={module.groups})")
    module.__class__ = _slim_class(type(module))
    module.lcs_slim = _SlimState(state, scale_out)


@torch.no_grad()
def channel_plan(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(input channels, output channels) of every slim module at the model's current width, found
    by one forward pass on ``example`` (modules the pass does not reach are left out)."""
    plan: dict[str, tuple[int, int]] = {}
    handles = []
    for fqn, m in model.named_modules():
        if is_slim(m):
            def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, fqn: str = fqn) -> None:
                x = inp[0]
                plan[fqn] = (x.shape[-1] if isinstance(mod, nn.Linear) else x.shape[1],
                             out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[1])
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return plan


def _narrow(module: nn.Module, k_in: int, k_out: int, params: dict[str, torch.Tensor]) -> None:
    """Make ``module`` (a slim module of a structure-shared copy) a plain module with k_in → k_out
    channels whose tensors are contiguous slices of ``params`` (its current full tensors)."""
    module.__class__ = _PLAIN_OF[type(module)]
    del module.__dict__["lcs_slim"]
    _set_size(module, k_in, k_out, params)


def _set_size(module: nn.Module, k_in: int, k_out: int, params: dict[str, torch.Tensor]) -> None:
    """Give a plain Conv2d / Linear / norm k_in → k_out channels: its size attributes, and new
    tensor dicts holding contiguous slices of ``params``."""
    module._parameters = dict(module._parameters)
    module._buffers = dict(module._buffers)
    if isinstance(module, nn.Conv2d):
        module.in_channels, module.out_channels = k_in, k_out
        slices = {"weight": (slice(0, k_out), slice(0, k_in)), "bias": (slice(0, k_out),)}
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = k_in, k_out
        slices = {"weight": (slice(0, k_out), slice(0, k_in)), "bias": (slice(0, k_out),)}
    else:
        if isinstance(module, nn.GroupNorm):
            module.num_channels = k_in
        else:
            module.num_features = k_in
        slices = {n: (slice(0, k_in),) for n in ("weight", "bias", "running_mean", "running_var")}
    for name, sl in slices.items():
        if params.get(name) is not None:
            value = params[name].detach()[sl].contiguous()
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[name] = value


def slim_down(model: nn.Module, plan: dict[str, tuple[int, int]]) -> nn.Module:
    """Turn every slim module of ``model`` (in place) into a plain module of the planned size."""
    for fqn, m in model.named_modules():
        if is_slim(m):
            k_in, k_out = plan.get(fqn, (None, None))
            if k_in is None:
                raise LcsError(f"layer {fqn!r} was not reached by the forward pass; cannot size it")
            tensors = {**m._parameters, **m._buffers}
            _narrow(m, k_in, k_out, tensors)
    model.__dict__["lcs_slimmed"] = True  # the artifact says so: its loader shrinks layers first
    return model


def resize_to_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Shrink the plain Conv2d / Linear / norm modules of a full-width model (in place) to the
    tensor shapes of a slim artifact, so that ``load_state_dict`` can fill them."""
    for fqn, m in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        shape = shapes.get(prefix + "weight")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and shape is not None:
            k_out, k_in = shape[0], shape[1]
        elif isinstance(m, SLIM_NORM_TYPES) and (shape or shapes.get(prefix + "running_mean")) is not None:
            k_in = k_out = (shape or shapes[prefix + "running_mean"])[0]
        else:
            continue
        if isinstance(m, nn.GroupNorm) and m.num_groups != 1:
            continue
        empty = {n: (torch.empty(shapes[prefix + n]) if prefix + n in shapes else t)
                 for n, t in {**m._parameters, **m._buffers}.items() if t is not None and t.dim() > 0}
        _set_size(m, k_in, k_out, empty)
    return model
