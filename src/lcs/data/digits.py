"""scikit-learn's bundled 8x8 digits, decoded into memory."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LcsError
from .base import ImageData
from .prepare import _channel_stats, _resize_uint8, _split_of, _stratified_split


def _load_digits(val_fraction: float, seed: int, image_size: int) -> ImageData:
    """scikit-learn's 8x8 digits: a tiny, offline dataset for demos and tests."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    bunch = load_digits()
    raw = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64))  # N x 8 x 8, values 0..16
    gray = (raw * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    gray = _resize_uint8(gray, image_size)
    images = gray.expand(-1, 3, -1, -1).contiguous()  # the model stems take RGB
    labels_np = np.asarray(bunch.target, dtype=np.int64)
    train_idx, val_idx = _stratified_split(labels_np, val_fraction, seed)
    if len(val_idx) == 0:
        raise LcsError(f"val_fraction={val_fraction} leaves the digits validation split empty; raise it")
    labels = torch.from_numpy(labels_np)
    train, val = _split_of(images, labels, train_idx), _split_of(images, labels, val_idx)
    mean, std = _channel_stats(train.images)
    return ImageData("digits", train, val, [str(i) for i in range(10)], mean, std,
                     pad=image_size // 8, hflip=False)
