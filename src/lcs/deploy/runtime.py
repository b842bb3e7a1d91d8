"""Deploy side: a runtime that moves along a trained subspace.

``Runtime.load`` reads a subspace file (``lcs.deploy.subspace_file``) and ``Runtime.set_alpha``
builds the plain compressed network at α *once*, aside (``lcs.deploy.bake``, the path
``materialize`` takes too), and swaps it in with a single reference assignment: a thread running
inference keeps the network it started with, so no request ever mixes two α.

Imports only torch, safetensors, the standard library and lcs's own torch-only modules (no
training code, no tqdm, matplotlib, yaml or scikit-learn); a test checks ``sys.modules``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
from torch import nn

from ..layers.kernels import check_kernels, kernel_report
from ..regimes import Point
from ..subspace import Subspace
from .artifact import dense_float32_bytes
from .bake import Baker
from .subspace_file import SUBSPACE_FORMAT, load_subspace, save_subspace

__all__ = ["SUBSPACE_FORMAT", "save_subspace", "load_subspace", "Runtime"]


class Runtime:
    """Serve a subspace: ``rt = Runtime.load(FILE); rt.set_alpha(0.1); y = rt(x)``.

    ``set_alpha`` validates α against the trained range, computes the compressed weights at α
    once and swaps in a plain network, so every later forward runs at the speed of a plain
    network at that α. Point subspaces of several levels also take ``set_levels(density=0.1, bits=4)``.
    Switches are serialized by a lock; inference never waits for one.
    """

    def __init__(self, sub: Subspace, header: dict[str, Any], kernels: str = "auto"):
        self.kernels = check_kernels(kernels)
        self._sub = sub
        self.header = header
        self._lock = threading.Lock()
        self._baker = Baker(sub, trainable=False, input_shape=header.get("input_shape") or sub.input_shape)
        self._current: tuple[float, dict[str, float], nn.Module] = (float("nan"), {}, self._baker.template)
        self.last_switch_ms = 0.0
        self.set_alpha(self.alpha_range[1])
        self.dense_bytes = dense_float32_bytes(self.network)  # float32 bytes at the top α: "% of dense"

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, kernels: str = "auto") -> Runtime:
        """Load a subspace file (``lcs export RUN --subspace``). ``kernels="auto"``: unstructured
        layers run on CSR kernels where a micro-benchmark on this machine says they are faster
        (``lcs.layers.kernels``); ``"dense"``: always the dense kernels."""
        return cls(*load_subspace(path, model), kernels=kernels)

    def tune(self, grid: list[Point], batches: list[int], input_shape: tuple[int, ...]) -> None:
        """Measure the kernel choice of every layer at every point of ``grid`` and batch size, ahead of
        serving, so that no request pays for a measurement (decisions are cached on disk)."""
        old = self._point()
        for a in grid:
            self.move(a)
            for b in batches:
                self(torch.zeros(b, *input_shape))
        self.move(old)

    def kernel_report(self) -> dict[str, dict[int, bool]]:
        """{layer: {batch: runs sparse}} of the network currently served."""
        return kernel_report(self.network)

    # -- state -----------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self._current[0]

    @property
    def level(self) -> float:
        """The realized primary compression level at the current point (density, width or bits)."""
        return self._current[1][self.level_name]

    @property
    def levels(self) -> dict[str, float]:
        return dict(self._current[1])

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

    def _point(self) -> Point:
        return self.levels if self._sub.config.geometry == "point" and len(self.levels) > 1 else self.alpha

    # -- switching and inference ------------------------------------------------------------------
    def set_alpha(self, alpha: float) -> float:
        """Move to α; returns the realized primary level. Raises ValueError outside the trained range."""
        return self.move(alpha)[self.level_name]

    def set_levels(self, **levels: float) -> dict[str, float]:
        """Move a point subspace to any combination of its levels, e.g. ``set_levels(density=0.1, bits=4)``."""
        return self.move(levels)

    @torch.no_grad()
    def move(self, point: Point) -> dict[str, float]:
        """Go to an α or a dict of levels; returns every realized level."""
        with self._lock:
            t0 = time.perf_counter()
            levels = self._sub.move(point)
            net = self._baker.network(kernels=self.kernels)
            self._current = (self._sub.alpha, levels, net)  # one assignment: readers see old or new
            self.last_switch_ms = (time.perf_counter() - t0) * 1e3
            return dict(levels)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._current[2](x)

    def __repr__(self) -> str:
        levels = ", ".join(f"{k}={v:g}" for k, v in self.levels.items())
        return (f"Runtime({self.regime}, geometry={self._sub.config.geometry}, alpha={self.alpha:g}, "
                f"{levels}, range={self.alpha_range})")
