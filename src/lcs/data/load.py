"""``load_data``: argument checks and the dispatch to the digits, CIFAR-10 and folder loaders."""

from __future__ import annotations

import os

from ..errors import LcsError
from .base import ImageData
from .cifar10 import _load_cifar10
from .digits import _load_digits
from .folder import _load_folder
from .seeds import _is_int
from .stream import PIPELINES, StreamData

__all__ = ["DATASETS", "load_data"]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "folder")


def load_data(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int = 32,
    cache_dir: str | None = None,
    pipeline: str = "auto",
    workers: int | None = None,
) -> ImageData | StreamData:
    """Load dataset ``name`` ("digits", "cifar10" or "folder"): decoded into memory, or streamed (big folders).

    ``val_fraction`` and ``seed`` pick the seeded, stratified validation split where the dataset has
    none of its own (digits, folder without train/val sub-folders). ``cache_dir`` caches decoded
    folder data as safetensors, since decoding tens of thousands of JPEGs is the slow part.
    ``pipeline`` (folders only): "memory", "stream" (a ``StreamData`` decoded per batch by
    ``workers`` DataLoader processes, ImageNet transforms) or "auto" (see ``lcs.data.stream.use_stream``).
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise LcsError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 < float(val_fraction) < 1.0
    ):
        raise LcsError(f"val_fraction={val_fraction!r} must be a number strictly between 0 and 1, e.g. 0.1")
    if not _is_int(image_size) or image_size < 1:
        raise LcsError(f"image_size={image_size!r} must be a positive integer, e.g. 32")
    if not _is_int(seed):
        raise LcsError(f"seed={seed!r} must be an integer")
    val_fraction, image_size, seed = float(val_fraction), int(image_size), int(seed)
    if pipeline not in PIPELINES:
        raise LcsError(f"pipeline={pipeline!r} is invalid: must be one of {', '.join(PIPELINES)}")
    if key != "folder" and pipeline == "stream":
        raise LcsError(f"pipeline 'stream' reads image folders only; dataset {key!r} is held in memory "
                       "(use pipeline auto or memory)")
    if key == "digits":
        if root is not None:
            raise LcsError(f"dataset 'digits' is bundled with scikit-learn and takes no root (got {root!r}); "
                           "drop the root/data path")
        return _load_digits(val_fraction, seed, image_size)
    if root is None or str(root).strip() == "":
        raise LcsError(f"dataset {key!r} needs a root folder; pass the path to the data")
    path = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(path):
        raise LcsError(f"data root {path} does not exist or is not a folder; check the path")
    if key == "cifar10":
        return _load_cifar10(path, image_size)
    return _load_folder(path, val_fraction, seed, image_size, cache_dir, pipeline, workers)
