"""The one bake path: the compressed network at a point of a subspace, as a plain model.

``Baker`` strips a copy of the subspace's model once (the *template*); ``Baker.network(point)``
then builds the network at α (or at a dict of levels) in four steps shared by every regime:

1. a new module tree sharing every tensor of the template (microseconds, not a deep copy);
2. each parametrized tensor evaluated through its chain (line, then TopK / fake quantization; a
   parametrization with a ``bake`` method records what the export needs, e.g. a weight's
   quantization grid), without parametrize's per-access machinery; a step whose type has
   ``bake_many`` runs for every tensor at once (TopK: one compiled selection for all layers);
3. BatchNorm statistics of the point's row, merged into convs where the regime folded them, then
   the regime's finishing steps (``Regime.finish``: fix the input quantizers' bits, slim down);
4. optionally, sparse kernels for layers that measured faster sparse on this machine, with the
   BatchNorm that reads each folded into it, and the compiled max pool (``lcs.layers.kernels``).

``lcs.materialize`` and ``lcs.Runtime.set_alpha`` both call it. Deploy side: torch only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers.bn_stats import freeze_bn_stats
from ..layers.kernels import KernelPlan, accelerate, check_kernels, kernel_plan
from ..layers.quant import fold_batchnorm
from ..regimes import BakeContext, Point, record_of
from ..subspace import Subspace

__all__ = ["Baker", "materialize", "strip_parametrizations", "share_structure"]


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


def share_structure(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor: new module objects and new parameter
    dicts, so parameters can be replaced in the copy without touching the original. Costs
    microseconds per module, unlike ``copy.deepcopy``."""
    new = copy.copy(module)
    d = new.__dict__  # plain dict writes: nn.Module.__setattr__ costs a third of a switch here
    d["_parameters"] = dict(module._parameters)
    d["_buffers"] = dict(module._buffers)
    d["_modules"] = {k: share_structure(v) if v is not None else None for k, v in module._modules.items()}
    return new


class Baker:
    """Builds plain networks at points of ``sub`` (see the module docstring).

    Args:
        sub: the subspace (left untouched except for its α, restored after each bake).
        trainable: the baked parameters require gradients (``materialize``: for further training);
            ``Runtime`` serves them frozen.
        input_shape: (C, H, W), for regimes that size their networks by a forward pass (structured).
    """

    def __init__(self, sub: Subspace, *, trainable: bool = False, input_shape: tuple[int, ...] | None = None):
        self.sub = sub
        self.record = record_of(sub.config)
        self.trainable = trainable
        # the template and its own copy of the state (deepcopy's memo keeps them connected)
        template, self.template_state = copy.deepcopy((sub.model, sub.state))
        self.template = strip_parametrizations(template).eval()
        for p in self.template.parameters():
            p.requires_grad_(trainable)
        # (fqn, tensor name, originals, chain): evaluated directly, without parametrize's per-access machinery
        self.chains = []
        for fqn, m in sub.model.named_modules():
            if parametrize.is_parametrized(m):
                for name, plist in m.parametrizations.items():
                    originals = [getattr(plist, n) for n in ("original0", "original1") if hasattr(plist, n)]
                    self.chains.append((fqn, name, originals or [plist.original], list(plist)))
        for kind in {type(p) for *_, chain in self.chains for p in chain}:
            if hasattr(kind, "warm_up"):  # compiled steps load now, not in the first switch
                kind.warm_up()
        self._plan: KernelPlan | None = None
        self.context = BakeContext(alpha=sub.alpha, levels=sub.levels, config=sub.config, template=self.template,
                                   input_shape=tuple(input_shape or sub.input_shape or ()) or None)

    @torch.no_grad()
    def network(self, point: Point | None = None, *, kernels: str = "dense") -> nn.Module:
        """The plain network at ``point`` (default: the subspace's current point), in eval mode."""
        sub = self.sub
        old = (sub.state.alpha, dict(sub.state.levels))
        try:
            if point is not None:
                sub.move(point)
            net = self._bake(kernels)
        finally:
            sub.state.alpha, sub.state.levels = old
        return net

    def _bake(self, kernels: str) -> nn.Module:
        sub, ctx = self.sub, self.context
        alpha, levels = sub.state.alpha, dict(sub.state.levels)
        ctx.alpha, ctx.levels = alpha, levels
        self.template_state.alpha, self.template_state.levels = alpha, dict(levels)
        net = share_structure(self.template)
        modules = dict(net.named_modules())
        values, rests = [], []
        for _, _, originals, chain in self.chains:
            # a point's first parametrization takes its one original; a line combines two
            if len(originals) == 1:
                values.append(originals[0])
                rests.append(chain)
            else:
                values.append(chain[0].forward(*originals))
                rests.append(chain[1:])
        # a step whose type bakes many tensors in one call (TopK: one compiled selection) does so here
        groups: dict[type, list[int]] = {}
        for i, rest in enumerate(rests):
            if rest and hasattr(type(rest[0]), "bake_many"):
                groups.setdefault(type(rest[0]), []).append(i)
        for kind, idx in groups.items():
            for i, value in zip(idx, kind.bake_many([rests[i][0] for i in idx], [values[i] for i in idx]),
                                strict=True):
                values[i], rests[i] = value, rests[i][1:]
        for (fqn, name, _, _), value, rest in zip(self.chains, values, rests, strict=True):
            for p in rest:
                value = p.bake(value, modules[fqn]) if hasattr(p, "bake") else p.forward(value)
            modules[fqn]._parameters[name] = nn.Parameter(value.detach(), requires_grad=self.trainable)
        # BatchNorm: the statistics of this point's row, merged into the conv where the regime folded it
        fold_batchnorm(freeze_bn_stats(net, alpha, levels))
        for step in self.record.finish:
            step(net, ctx)
        if check_kernels(kernels) == "auto":  # mostly-zero layers: sparse kernels where they measured faster here
            if self._plan is None:  # BatchNorms to fold, adds to fuse, conv chains: one trace per Baker,
                self._plan = kernel_plan(net)  # of a baked network (the regime's folds are done)
            accelerate(net, sub.compressed, plan=self._plan)
        return net


def materialize(sub: Subspace, alpha: Point, input_shape: tuple[int, ...] | None = None,
                kernels: str = "dense") -> nn.Module:
    """The compressed network at α (or, on a point subspace, at a dict of levels such as
    ``{"density": 0.1, "bits": 4}``) as a plain model: ordinary Conv2d / Linear / norm modules,
    scriptable and exportable. The subspace itself is left untouched.

    Quantized subspaces keep each quantizing layer's input quantizer (``lcs.layers.quant.LayerQuant``,
    bits fixed); their weights are the fake-quantized values, on the grid. A BatchNorm folded into a
    quantized conv is merged into that conv's bias and replaced by ``nn.Identity``. Structured
    subspaces come out physically slim (fewer channels); sizing them takes one forward pass on zeros
    of ``input_shape`` (C, H, W), by default ``sub.input_shape``.

    ``kernels="auto"`` lets the compressed layers run on CSR kernels where a micro-benchmark on this
    machine says they are faster (``lcs.layers.kernels``; ``Runtime`` and ``load_compressed`` do so by
    default); the default ``"dense"`` keeps plain kernels, for export and further training.

    Example:
        >>> plain = lcs.materialize(sub, 0.1)   # doctest: +SKIP
    """
    check_kernels(kernels)
    if not isinstance(alpha, Mapping):
        sub.config.position(alpha)  # validated before the copy
    return Baker(sub, trainable=True, input_shape=input_shape).network(alpha, kernels=kernels)

