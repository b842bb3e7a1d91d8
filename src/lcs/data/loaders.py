"""A user's own ``torch.utils.data.DataLoader`` s as the data of a run (any Dataset, any transforms).

``LoaderData(train_loader, val_loader, num_classes=10)`` goes wherever lcs takes its own data
(``Trainer(cfg, out, data=...)``, ``evaluate_accuracy``, ``sweep``). What lcs guarantees for it:

* **Resume is exact** when the epoch's order is a function of the epoch: lcs re-seeds the
  loader's ``generator`` with (``run.seed``, epoch) at the start of every epoch (give the loader
  ``generator=torch.Generator()`` when it shuffles), calls ``sampler.set_epoch(epoch)`` where the
  sampler has it (``DistributedSampler``), and skips the batches already trained. Random
  transforms inside worker processes are the user's: seed them from ``torch.initial_seed()`` per
  worker (PyTorch's default) and they repeat too.
* **DistributedDataParallel**: give each process a ``DistributedSampler``; its per-rank batch is
  the loader's ``batch_size`` (``data.batch_size`` is then not used).
* Batches are ``(images, labels)``; images are already normalized by the user's transforms.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LcsError

__all__ = ["LoaderData"]

_EPOCH_SEED = 7_919


class _Sized:
    def __init__(self, loader: Any):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.dataset)


@dataclass
class LoaderData:
    train_loader: Any
    val_loader: Any
    num_classes: int
    name: str = "loaders"

    def __post_init__(self) -> None:
        for which in ("train_loader", "val_loader"):
            loader = getattr(self, which)
            if not isinstance(loader, torch.utils.data.DataLoader):
                raise LcsError(f"{which} must be a torch.utils.data.DataLoader, got {type(loader).__name__}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise LcsError(f"num_classes must be a whole number >= 2, got {self.num_classes!r}")
        if len(self.train_loader) == 0:
            raise LcsError("train_loader yields no batches")

    @property
    def train(self) -> _Sized:
        return _Sized(self.train_loader)

    @property
    def val(self) -> _Sized:
        return _Sized(self.val_loader)

    @property
    def image_size(self) -> int:
        x, _ = next(iter(self.val_loader))
        return int(x.shape[-1])

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_epoch(self, epoch: int, seed: int, start_batch: int, device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = self.train_loader
        if loader.generator is not None:
            loader.generator.manual_seed(seed * _EPOCH_SEED + epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, y in itertools.islice(loader, start_batch, None):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def val_batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.val_loader:
            yield x.to(device), y.to(device)
