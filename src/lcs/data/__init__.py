"""The data of a run: image datasets decoded once into uint8 tensors, folders streamed per batch, or the
user's own DataLoaders, plus stateless, deterministic batch iteration over any of them.

The datasets LCS trains on (digits, CIFAR-10, small image folders) fit in memory as uint8, so we decode
them once and run augmentation on whole batches: far faster on CPU than per-sample loaders, and every
batch is a pure function of (seed, epoch, batch index), so training resumes exactly and distributed
ranks agree without any sampler state.

Modules, one job each (arrows: imports):

- ``base``: ``Split``, ``ImageData`` and the ``Data`` protocol (torch only);
- ``loaders``: ``LoaderData``, the user's own DataLoaders (torch only);
- ``seeds``: derived seeds and integer checks; ``prepare``: stratified split, resize, channel stats;
- ``digits``, ``cifar10``, ``folder`` (+ ``cache``, its safetensors cache): the loaders;
- ``stream``: folders decoded per batch by DataLoader workers (-> ``transforms``, ``seeds``);
- ``load``: ``load_data`` (-> ``digits``, ``cifar10``, ``folder``, ``stream``);
- ``transforms``: ``normalize`` and the crop/flip augmentation; ``batches``: ``train_batches`` and
  ``eval_batches`` over in-memory, streamed and DataLoader data (-> ``stream``, ``transforms``).

Importing this package imports only torch and the standard library (``import lcs`` imports it for
``LoaderData``); the names that need numpy, Pillow or scikit-learn load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Data, ImageData, Split
from .loaders import LoaderData

# name -> submodule, imported on first access (they pull in numpy and Pillow)
_LAZY = {
    "DATASETS": "load",
    "load_data": "load",
    "CIFAR10_CLASSES": "cifar10",
    "CIFAR10_MEAN": "cifar10",
    "CIFAR10_STD": "cifar10",
    "IMAGE_EXTENSIONS": "folder",
    "num_batches": "batches",
    "train_batches": "batches",
    "eval_batches": "batches",
    "normalize": "transforms",
    "draw_augmentation": "transforms",
    "crop_and_flip": "transforms",
    "StreamData": "stream",
}

__all__ = ["Data", "Split", "ImageData", "LoaderData", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
