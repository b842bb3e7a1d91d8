"""The official CIFAR-10 python batches, read with an unpickler that only rebuilds numpy arrays."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import LcsError
from .base import ImageData, Split
from .prepare import _resize_uint8

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_VAL_FILE = "test_batch"
_CIFAR_DIRNAME = "cifar-10-batches-py"


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and refuses every other global.

    The CIFAR batches are pickles; a plain ``pickle.load`` would run whatever a tampered file asks.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise LcsError(f"refusing to unpickle {module}.{name} from a CIFAR batch file: only numpy arrays "
                       "are allowed; re-download the official CIFAR-10 python version")


def _read_cifar_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except LcsError as err:
        raise LcsError(f"{path}: {err}") from None
    except Exception as err:  # truncated / not a pickle: a data problem, not a crash
        raise LcsError(f"cannot read CIFAR batch {path} ({type(err).__name__}: {err}); "
                       "re-download the CIFAR-10 python version") from None


def _get(d: dict, key: str) -> Any:
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    obj = _read_cifar_pickle(path)
    data = _get(obj, "data") if isinstance(obj, dict) else None
    labels = _get(obj, "labels") if isinstance(obj, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
        raise LcsError(f"{path} is not a CIFAR-10 batch (need a dict with b'data' N x 3072 and b'labels'); "
                       "re-download the CIFAR-10 python version")
    labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels_np) != len(data) or (len(labels_np) and (labels_np.min() < 0 or labels_np.max() > 9)):
        raise LcsError(f"{path} has {len(labels_np)} labels for {len(data)} images or labels outside 0..9; "
                       "re-download the CIFAR-10 python version")
    return np.ascontiguousarray(data, dtype=np.uint8), labels_np


def _load_cifar10(root: str, image_size: int) -> ImageData:
    """The official CIFAR-10 "python version": train = data_batch_1..5, val = test_batch."""
    folder = root
    if not os.path.isfile(os.path.join(folder, _CIFAR_TRAIN_FILES[0])) and os.path.isdir(
        os.path.join(root, _CIFAR_DIRNAME)
    ):
        folder = os.path.join(root, _CIFAR_DIRNAME)
    needed = (*_CIFAR_TRAIN_FILES, _CIFAR_VAL_FILE)
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise LcsError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; point root at the extracted "
                       f"'{_CIFAR_DIRNAME}' folder of the python version")

    def split(files: Sequence[str]) -> Split:
        parts = [_read_cifar_batch(os.path.join(folder, f)) for f in files]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        images = torch.from_numpy(data).view(-1, 3, 32, 32)
        return Split(_resize_uint8(images, image_size).contiguous(), torch.from_numpy(labels))

    train, val = split(_CIFAR_TRAIN_FILES), split([_CIFAR_VAL_FILE])
    if len(val) == 0 or len(train) == 0:
        raise LcsError(f"CIFAR-10 folder {folder} has an empty train or test batch; re-download it")
    classes = list(CIFAR10_CLASSES)
    meta_path = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta_path):
        meta = _read_cifar_pickle(meta_path)
        names = _get(meta, "label_names") if isinstance(meta, dict) else None
        if isinstance(names, list) and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageData("cifar10", train, val, classes, CIFAR10_MEAN, CIFAR10_STD,
                     pad=image_size // 8, hflip=True)
