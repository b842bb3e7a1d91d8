"""Deploy side: one artifact holding the whole subspace, and a runtime that moves along it.

``save_subspace`` writes the trained subspace (both endpoints for a line, one weight set for a
point) plus its architecture and regime as JSON metadata into one safetensors file.
``Runtime.load`` reads it back and ``Runtime.set_alpha`` builds the plain compressed network at α
*once*, aside, and swaps it in with a single reference assignment: a thread running inference
keeps the network it started with, so no request ever mixes two α.

Imports only torch, safetensors, the standard library and lcs's own torch-only modules (no
training code, no tqdm, matplotlib, yaml or scikit-learn); a test checks ``sys.modules``.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from typing import Any

import torch
from torch import nn

from .artifact import dense_float32_bytes, read_metadata
from .bn_stats import freeze_bn_stats
from .errors import LcsError, state_dict_error
from .files import load_tensors, save_tensors
from .kernels import accelerate, check_kernels, kernel_report
from .materialize import strip_parametrizations
from .quant import FakeQuant, fold_batchnorm, freeze_quantizers, layer_quants, weight_qparams
from .regimes import regime_from_dict, regime_to_dict
from .slim import channel_plan, is_slim, slim_down, width_channels
from .subspace import Subspace, convert

__all__ = ["SUBSPACE_FORMAT", "save_subspace", "load_subspace", "Runtime"]

SUBSPACE_FORMAT = "lcs.subspace"


def save_subspace(sub: Subspace, path: str | os.PathLike, arch: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> int:
    """Write the whole subspace to one safetensors file, atomically; returns its size in bytes.

    ``arch`` names the plain architecture (``{"name": ..., "kwargs": {...}}``) so that the file
    can be served without the code that trained it.
    """
    import json

    header = {"format": SUBSPACE_FORMAT, "version": 1, "arch": arch, "regime": regime_to_dict(sub.config),
              "alpha_range": list(sub.alpha_range), "compressed": list(sub.compressed)}
    if sub.input_shape is not None:
        header["input_shape"] = list(sub.input_shape)
    header.update(extra or {})
    return save_tensors(sub.model.state_dict(), path, {"lcs": json.dumps(header)})


def load_subspace(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[Subspace, dict[str, Any]]:
    """The Subspace stored in a subspace artifact, in eval mode, and the artifact's metadata."""
    path = os.fspath(path)
    header = read_metadata(path)
    if header.get("format") != SUBSPACE_FORMAT:
        raise LcsError(f"{path} holds {header.get('format')!r}, not a subspace (export it with "
                       f"`lcs export RUN --subspace`)")
    try:
        config = regime_from_dict(header["regime"])
        compressed = set(header["compressed"])
        if model is None:
            from . import models

            model = models.create(header["arch"]["name"], **header["arch"].get("kwargs", {}))
    except (KeyError, TypeError) as e:
        raise LcsError(f"{path}: incomplete subspace metadata ({e})") from None
    sub = convert(model, config, filter_fn=lambda m, fqn: fqn in compressed)
    if header.get("input_shape"):
        sub.input_shape = tuple(header["input_shape"])
    state, _ = load_tensors(path)  # verified against the file's digest
    try:
        sub.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LcsError(f"{path} does not match its architecture: {state_dict_error(e)}") from None
    sub.model.eval()
    return sub, header


def _share_structure(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor: new module objects and new parameter
    dicts, so parameters can be replaced in the copy without touching the original. Costs
    microseconds per module, unlike ``copy.deepcopy``."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: _share_structure(v) if v is not None else None for k, v in module._modules.items()}
    return new


class Runtime:
    """Serve a subspace: ``rt = Runtime.load(FILE); rt.set_alpha(0.1); y = rt(x)``.

    ``set_alpha`` validates α against the trained range, computes the compressed weights at α
    once and swaps in a plain network, so every later forward runs at the speed of a plain
    network at that α. Switches are serialized by a lock; inference never waits for one.
    """

    def __init__(self, sub: Subspace, header: dict[str, Any], kernels: str = "auto"):
        self.kernels = check_kernels(kernels)
        self._sub = sub
        self.header = header
        self._lock = threading.Lock()
        self._template = strip_parametrizations(copy.deepcopy(sub.model)).eval()
        freeze_quantizers(self._template)  # input quantizers: bits set per network in set_alpha
        self._quant_layers = [f"{fqn}.lcs_quant" for fqn in layer_quants(self._template)]
        for p in self._template.parameters():
            p.requires_grad_(False)
        # (fqn, tensor name, originals, chain of parametrizations): evaluated directly in set_alpha,
        # without the per-access module machinery of parametrize (a third of the switch time).
        self._baked = []
        for fqn, m in sub.model.named_modules():
            if hasattr(m, "parametrizations"):
                for name, plist in m.parametrizations.items():
                    originals = [getattr(plist, n) for n in ("original0", "original1") if hasattr(plist, n)]
                    if not originals:
                        originals = [plist.original]
                    self._baked.append((fqn, name, originals, list(plist)))
        # Structured: the template's slim layers follow its own (copied) state; the channel plan of
        # each distinct set of widths is found once by a forward pass and cached.
        slim = [m for m in self._template.modules() if is_slim(m)]
        self._slim_state = slim[0].lcs_slim.state if slim else None
        self._slim_sizes = sorted({m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                                   for m in slim if m.lcs_slim.scale_out})
        self._plans: dict[tuple[int, ...], dict[str, tuple[int, int]]] = {}
        self._current: tuple[float, float, nn.Module] = (float("nan"), float("nan"), self._template)
        self.last_switch_ms = 0.0
        self.set_alpha(self.alpha_range[1])
        self.dense_bytes = dense_float32_bytes(self.network)  # float32 bytes at the top α: "% of dense"

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, kernels: str = "auto") -> Runtime:
        """Load a subspace artifact (``lcs export RUN --subspace``). ``kernels="auto"``: unstructured
        layers run on CSR kernels where a micro-benchmark on this machine says they are faster
        (``lcs.kernels``); ``"dense"``: always the dense kernels."""
        return cls(*load_subspace(path, model), kernels=kernels)

    def tune(self, grid: list[float], batches: list[int], input_shape: tuple[int, ...]) -> None:
        """Measure the kernel choice of every layer at every α of ``grid`` and batch size, ahead of
        serving, so that no request pays for a measurement (decisions are cached on disk)."""
        old = self.alpha
        for a in grid:
            self.set_alpha(a)
            for b in batches:
                self(torch.zeros(b, *input_shape))
        self.set_alpha(old)

    def kernel_report(self) -> dict[str, dict[int, bool]]:
        """{layer: {batch: runs sparse}} of the network currently served."""
        return kernel_report(self.network)

    # -- state -----------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self._current[0]

    @property
    def level(self) -> float:
        """The realized compression level at the current α (density, width or bits)."""
        return self._current[1]

    @property
    def network(self) -> nn.Module:
        """The plain network currently served."""
        return self._current[2]

    @property
    def alpha_range(self) -> tuple[float, float]:
        lo, hi = self.header["alpha_range"]
        return float(lo), float(hi)

    @property
    def config(self):
        """The regime config (``lcs.UnstructuredConfig``, ``lcs.StructuredConfig``, ...)."""
        return self._sub.config

    @property
    def level_name(self) -> str:
        return self._sub.config.level_name

    @property
    def regime(self) -> str:
        return self._sub.config.regime

    # -- switching and inference ------------------------------------------------------------------
    @torch.no_grad()
    def set_alpha(self, alpha: float) -> float:
        """Move to α; returns the realized level. Raises ValueError outside the trained range."""
        with self._lock:
            t0 = time.perf_counter()
            level = self._sub.set_alpha(alpha)
            net = _share_structure(self._template)
            modules = dict(net.named_modules())
            for fqn, name, originals, chain in self._baked:
                # a point's first parametrization takes its one original; a line combines two
                if len(originals) == 1:
                    value, rest = originals[0], chain
                else:
                    value, rest = chain[0].forward(*originals), chain[1:]
                for p in rest:
                    if isinstance(p, FakeQuant):  # the weight's scale/zero point, for the packed export
                        modules[fqn].lcs_quant.set_weight_qparams(*weight_qparams(p.prescale(value), int(level)))
                    value = p.forward(value)
                modules[fqn]._parameters[name] = nn.Parameter(value, requires_grad=False)
            for fqn in self._quant_layers:  # each network's own copy: a running request keeps its bits
                modules[fqn].bits = int(level)
            # BN: the statistics of this level, merged into the conv where folded (quantized)
            fold_batchnorm(freeze_bn_stats(net, self._sub.alpha, level))
            if self._slim_state is not None:
                slim_down(net, self._plan(level))
            if self.kernels == "auto":  # mostly-zero layers: CSR kernels where they measured faster here
                accelerate(net, self._sub.compressed)
            self._current = (self._sub.alpha, level, net)  # one assignment: readers see old or new
            self.last_switch_ms = (time.perf_counter() - t0) * 1e3
            return level

    def _plan(self, width: float) -> dict[str, tuple[int, int]]:
        key = tuple(width_channels(c, width) for c in self._slim_sizes)
        if key not in self._plans:
            shape = self.header.get("input_shape") or self._sub.input_shape
            if shape is None:
                raise LcsError("this structured subspace artifact does not record its input shape")
            self._slim_state.level = width
            self._plans[key] = channel_plan(self._template, torch.zeros(1, *shape))
        return self._plans[key]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._current[2](x)

    def __repr__(self) -> str:
        return (f"Runtime({self.regime}, geometry={self._sub.config.geometry}, alpha={self.alpha:g}, "
                f"{self.level_name}={self.level:g}, range={self.alpha_range})")
