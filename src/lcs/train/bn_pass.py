"""The stored BatchNorm statistics rows: warm-started during training, re-estimated once after it.

During training each statistics row is a running average over the batches whose point fell in
that row, taken while the weights moved (``RowWarmStart``: the first batch replaces the row's seed,
later ones join at the rate a single set of statistics would forget). At a short budget that estimate lags: on a
10-epoch CIFAR-10 line, α = 0.1 scored 0.10 with its running statistics and 0.62 with the batch's
own. This pass replaces each row by the plain average over ``batches_per_row`` training batches,
forwarded (no gradients, no update) with the final weights at points drawn from the method's own
sampler at the last step and kept for the row they fall in, so every row describes the network it
will serve. It is what ``torch.optim.swa_utils.update_bn`` does for one set of statistics, per row.

Nothing is recalibrated at deployment: the rows are stored in the subspace and exported with each
network, as before. Batches are augmented as in training: the rest of the network was trained
behind batch statistics of augmented images, and statistics of plain images (whose first-BN input
mean is −0.04 instead of the zero-padded crops' −0.26) cost 4–6 points on the CIFAR-10 line above
(α = 1: 0.662 → 0.619), while augmented batches gave 0.663 and lifted α = 0.1 from 0.490 to 0.549.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..subspace import Subspace
from .methods import Method

__all__ = ["estimate_bn_stats", "batchnorms", "RowWarmStart"]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorms that keep running statistics (the ones a pass re-estimates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class RowWarmStart:
    """Training-time updates of the statistics rows. A row's k-th batch joins with momentum
    max(1/k, 1 − (1 − m)^(1/p)), m the BatchNorm's own (0.1) and p the share of forwards that fell
    in this row so far: its first batch replaces the seed it started from, and afterwards the row
    forgets at the rate per training step that one shared set of statistics would.

    Why: every row starts as a copy of one set of statistics (a fresh model's, or the dense model's
    with ``--init``), and at 128 rows an interior row sees a few batches an epoch. At momentum m
    alone, 0.9ᵏ of the seed remains after k batches and the rest averages batches from epochs ago:
    a 2.5 %-dense LCS+P network validated at chance (0.100) for all five CIFAR-10 epochs on the
    dense model's statistics, and its dense end at 0.714–0.745 (0.607 and 0.835 once the final pass
    replaced them; docs/results.md, session 19). A one-batch estimate is fresh and, over 128 images
    and every pixel, close to the population's. Activation ranges start the same way
    (``lcs.layers.quant``). Rows only: a model with one shared set keeps BatchNorm's own update.
    The counts are checkpointed (``state``), so a resumed run updates exactly as an uninterrupted one."""

    def __init__(self, sub: Subspace):
        self.sub = sub
        rows = sub.config.stats_rows
        self.bns = batchnorms(sub.model) if rows else []
        self.counts = [0] * rows if self.bns else []

    def state(self) -> dict[str, list[int]]:
        return {"bn_row_batches": list(self.counts)} if self.bns else {}

    def load(self, state: dict[str, Any], rows_reset: bool) -> None:
        """The counts of a checkpoint; a checkpoint written before they were kept counts every row
        as long and equally often seen, new rows (``rows_reset``) as never seen."""
        if not self.bns or rows_reset:
            return
        saved = state.get("bn_row_batches")
        if isinstance(saved, list) and len(saved) == len(self.counts) and all(isinstance(c, int) for c in saved):
            self.counts = list(saved)
        else:
            self.counts = [1 << 30] * len(self.counts)

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Around one training forward at the subspace's current point."""
        if not self.bns:
            yield
            return
        config, state = self.sub.config, self.sub.state
        row = config.stats_row(state.alpha, state.levels)
        momenta = [m.momentum for m in self.bns]
        k, total = self.counts[row] + 1, sum(self.counts) + 1
        for m in self.bns:
            if m.momentum is not None:  # None: BatchNorm's cumulative average, already unbiased
                m.momentum = max(1.0 / k, 1.0 - (1.0 - m.momentum) ** (total / k))
        try:
            yield
        finally:
            for m, mom in zip(self.bns, momenta, strict=True):
                m.momentum = mom
        self.counts[row] += 1


@torch.no_grad()
def estimate_bn_stats(sub: Subspace, method: Method, batches: Iterable[torch.Tensor], *, step: int,
                      batches_per_row: int, seed: int = 0, max_draws: int = 2000) -> list[int]:
    """Replace every statistics row by its average over ``batches_per_row`` batches (see the module
    docstring). Rows that the method's sampler never reaches keep their running averages.
    Returns how many batches each row averaged (a regime without rows has one)."""
    bns = batchnorms(sub.model)
    if not bns or batches_per_row < 1:
        return []
    config = sub.config
    n_rows = max(1, config.stats_rows)
    counts = [0] * n_rows
    gen = torch.Generator().manual_seed(seed)
    drawn: dict[int, list] = {r: [] for r in range(n_rows)}  # points drawn but not used yet, by row

    def row_now() -> int:
        return config.stats_row(sub.state.alpha, sub.state.levels) if config.stats_rows else 0

    def point_in(row: int) -> bool:
        """Move to a drawn point of ``row`` (drawing more from the sampler as needed)."""
        for _ in range(max_draws):
            if drawn[row]:
                method.apply(sub, drawn[row].pop(), step)
                return True
            for p in method.sampler(step, gen):
                method.apply(sub, p, step)
                drawn[row_now()].append(p)
        return False

    was_training = sub.model.training
    momenta = [m.momentum for m in bns]
    saved = (sub.state.alpha, dict(sub.state.levels))
    reachable = set(range(n_rows))
    sub.model.train()
    try:
        for x in batches:
            for row in sorted(reachable):
                if counts[row] >= batches_per_row:
                    continue
                if not point_in(row):
                    reachable.discard(row)
                    continue
                for m in bns:  # momentum 1/(k+1): the k-th batch joins a plain average of all k+1
                    m.momentum = 1.0 / (counts[row] + 1)
                sub.model(x)
                counts[row] += 1
            if all(counts[r] >= batches_per_row for r in reachable):
                break
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        sub.state.alpha, sub.state.levels = saved
        sub.model.train(was_training)
    return counts
