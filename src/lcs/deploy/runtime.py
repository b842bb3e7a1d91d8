"""Deploy side: a runtime that moves along a trained subspace.

``Runtime.load`` reads a subspace file (``lcs.deploy.subspace_file``) and ``Runtime.set_alpha``
builds the plain compressed network at α *once*, aside (``lcs.deploy.bake``, the path
``materialize`` takes too), and swaps it in with a single reference assignment: a thread running
inference keeps the network it started with, so no request ever mixes two α. The networks of
recently visited points stay in a small cache (``cache_mb``), so returning to one, as a controller
moving over a grid of α does all the time, costs a dictionary lookup instead of a bake, and its
sparse layers keep their CSR weights and kernel choices.

Imports only torch, safetensors, the standard library and lcs's own torch-only modules (no
training code, no tqdm, matplotlib, yaml or scikit-learn); a test checks ``sys.modules``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..errors import LcsError
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

    ``cache_mb``: the networks of the most recently visited points are kept, up to this many MiB of
    tensors they do not share with the subspace (their compressed weights; lazily built CSR copies
    come on top), and a move to one of them reuses it; 0 bakes on every move.
    """

    def __init__(self, sub: Subspace, header: dict[str, Any], kernels: str = "auto", cache_mb: float = 256.0):
        self.kernels = check_kernels(kernels)
        if not cache_mb >= 0:
            raise LcsError(f"cache_mb must be >= 0, got {cache_mb!r}")
        self._sub = sub
        self.header = header
        self._lock = threading.Lock()
        self._baker = Baker(sub, trainable=False, input_shape=header.get("input_shape") or sub.input_shape)
        self._current: tuple[float, dict[str, float], nn.Module] = (float("nan"), {}, self._baker.template)
        self._cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple, tuple[float, dict[str, float], nn.Module, int]] = OrderedDict()
        self._shared = {t.data_ptr() for t in (*self._baker.template.parameters(), *self._baker.template.buffers())}
        self.last_switch_ms = 0.0
        self.last_switch_cached = False
        self.set_alpha(self.alpha_range[1])
        self.dense_bytes = dense_float32_bytes(self.network)  # float32 bytes at the top α: "% of dense"

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, kernels: str = "auto",
             cache_mb: float = 256.0) -> Runtime:
        """Load a subspace file (``lcs export RUN --subspace``). ``kernels="auto"``: unstructured
        layers run on CSR kernels where a micro-benchmark on this machine says they are faster
        (``lcs.layers.kernels``); ``"dense"``: always the dense kernels. ``cache_mb``: see the class."""
        return cls(*load_subspace(path, model), kernels=kernels, cache_mb=cache_mb)

    def tune(self, grid: list[Point], batches: list[int], input_shape: tuple[int, ...]) -> None:
        """Measure the kernel choice of every layer at every point of ``grid`` and batch size, ahead of
        serving, so that no request pays for a measurement (decisions are cached on disk)."""
        old = self._point()
        for a in grid:
            self.move(a)
            for b in batches:
                self(torch.zeros(b, *input_shape))
        self.move(old)

    def kernel_report(self) -> dict[str, dict[int, str]]:
        """{layer: {batch: kernel}} ("dense", "csr", "direct") of the network currently served."""
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
            key = (self._sub.alpha, tuple(sorted(levels.items())))
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._current = hit[:3]  # one assignment: readers see old or new
            else:
                self._current = (self._sub.alpha, dict(levels), self._baker.network(kernels=self.kernels))
                self._remember(key, self._current)
            self.last_switch_cached = hit is not None
            self.last_switch_ms = (time.perf_counter() - t0) * 1e3
            return dict(levels)

    def _remember(self, key: tuple, entry: tuple[float, dict[str, float], nn.Module]) -> None:
        """Cache ``entry`` (α, levels, network) under ``key``, evicting the least recently used."""
        if not self._cache_bytes:
            return
        own: dict[int, int] = {}  # data_ptr → bytes of the tensors this network does not share
        for m in entry[2].modules():
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None and t.data_ptr() not in self._shared:
                    own[t.data_ptr()] = t.numel() * t.element_size()
        size = sum(own.values())
        if size > self._cache_bytes:
            return
        self._cache[key] = (*entry, size)
        while sum(entry[3] for entry in self._cache.values()) > self._cache_bytes:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        """Forget every cached network (the one being served stays in use)."""
        with self._lock:
            self._cache.clear()

    @property
    def cached_points(self) -> int:
        """How many networks the switch cache holds."""
        return len(self._cache)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._current[2](x)

    def __repr__(self) -> str:
        levels = ", ".join(f"{k}={v:g}" for k, v in self.levels.items())
        return (f"Runtime({self.regime}, geometry={self._sub.config.geometry}, alpha={self.alpha:g}, "
                f"{levels}, range={self.alpha_range})")
