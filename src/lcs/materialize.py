"""``materialize``: the compressed network at α as a plain model with no subspace machinery."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bn_stats import freeze_bn_stats
from .errors import LcsError
from .kernels import accelerate, check_kernels
from .quant import fold_batchnorm, freeze_quantizers
from .slim import channel_plan, is_slim, slim_down
from .subspace import Subspace

__all__ = ["materialize", "strip_parametrizations"]


@torch.no_grad()
def strip_parametrizations(model: nn.Module) -> nn.Module:
    """Bake every parametrization's current value into a plain Parameter, in place.

    Not ``parametrize.remove_parametrizations``: a deep copy of a parametrized module shares its
    injected class with the original, and removing the parametrization deletes the property from
    that shared class, which would break the original subspace. Here only this model's modules
    get their original class back.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        values = {name: getattr(module, name).detach().clone() for name in module.parametrizations.keys()}
        module.__class__ = parametrize.type_before_parametrizations(module)
        del module._modules["parametrizations"]
        for name, value in values.items():
            module._parameters[name] = nn.Parameter(value)
    return model


def materialize(sub: Subspace, alpha: float, input_shape: tuple[int, ...] | None = None,
                kernels: str = "dense") -> nn.Module:
    """A deep copy of the model with θ(α) compressed by f(·, γ(α)) baked in: ordinary Conv2d /
    Linear / norm modules, scriptable and exportable. The subspace itself is left untouched.

    Quantized subspaces keep each quantizing layer's input quantizer (``lcs.quant.LayerQuant``,
    bits fixed at γ(α)); their weights are the fake-quantized values, on the grid. A BatchNorm folded
    into a quantized conv is merged into that conv's bias and replaced by ``nn.Identity``.
    Structured subspaces come out physically slim (fewer channels); sizing them takes one forward
    pass on zeros of ``input_shape`` (C, H, W), by default ``sub.input_shape``.

    ``kernels="auto"`` lets the compressed layers run on CSR kernels where a micro-benchmark on this
    machine says they are faster (``lcs.kernels``; ``Runtime`` and ``load_compressed`` do so by
    default); the default ``"dense"`` keeps plain kernels, for export and further training.

    Example:
        >>> plain = lcs.materialize(sub, 0.1)   # doctest: +SKIP
    """
    with sub.at(alpha):
        plain = copy.deepcopy(sub.model)  # its copied SubspaceState keeps α after the context exits
    freeze_quantizers(plain)  # quantized: fixed bits, and the weights' scale/zero point for the packed export
    # quantized with BN: each BN keeps the statistics of these bits, then merges into its conv where folded
    plain = fold_batchnorm(freeze_bn_stats(strip_parametrizations(plain))).eval()
    if any(is_slim(m) for m in plain.modules()):
        shape = input_shape or sub.input_shape
        if shape is None:
            raise LcsError("a structured subspace needs its input shape to be made slim: pass input_shape=(C, H, W) "
                           "or set sub.input_shape")
        param = next(plain.parameters())
        slim_down(plain, channel_plan(plain, torch.zeros(1, *shape, dtype=param.dtype, device=param.device)))
    if check_kernels(kernels) == "auto":
        accelerate(plain, sub.compressed)
    return plain
