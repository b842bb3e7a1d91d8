"""What "the data" of a run is: in-memory ``Split``/``ImageData``, and the ``Data`` protocol that training
and evaluation code takes (``ImageData``, ``StreamData`` and ``LoaderData`` all satisfy it).

torch only: ``import lcs`` imports this module.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Split", "ImageData", "Data"]


@runtime_checkable
class Data(Protocol):
    """What training, evaluation and the CLI read from the data of a run.

    ``len(data.train)``/``len(data.val)`` count the samples of each split; batches come from
    ``lcs.data.train_batches``/``eval_batches``, which dispatch on the concrete type. On Python < 3.12
    ``isinstance(x, Data)`` evaluates the properties (``LoaderData.image_size`` reads one val batch).
    """

    @property
    def name(self) -> str: ...

    @property
    def train(self) -> Sized: ...

    @property
    def val(self) -> Sized: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def image_size(self) -> int: ...


@dataclass
class Split:
    """One split held in memory: uint8 keeps 50k CIFAR images at 150 MB instead of 600 MB as float."""

    images: torch.Tensor  # uint8, N x C x H x W (C = 3)
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ImageData:
    """A decoded dataset plus what training needs to normalize and augment it."""

    name: str
    train: Split
    val: Split
    classes: list[str]
    mean: tuple[float, float, float]  # per channel, on the 0..1 scale
    std: tuple[float, float, float]
    pad: int  # random-crop zero padding for training augmentation
    hflip: bool  # random horizontal flip during training (False where flipping changes the label)
    # "random": each image flipped with probability 1/2 per epoch; "alternate": a seeded random choice in
    # the first epoch, the opposite in the next, and so on (every image seen both ways every two epochs)
    flip: str = "random"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])
