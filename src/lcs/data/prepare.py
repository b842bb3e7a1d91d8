"""Turning decoded uint8 images into ``Split`` s: seeded stratified split, resize, channel statistics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Split
from .seeds import _derive_seed


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: each class keeps ~val_fraction in val and at least one image in train."""
    gen = torch.Generator().manual_seed(_derive_seed("split", int(seed)))
    val_parts = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_val = min(int(len(idx) * val_fraction + 0.5), len(idx) - 1)
        perm = torch.randperm(len(idx), generator=gen).numpy()
        val_parts.append(idx[perm[:n_val]])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean/std on the 0..1 scale, in float64 chunks so large uint8 sets need little memory."""
    n, c = images.shape[:2]
    per_image = max(1, images[0].numel()) if n else 1
    step = max(1, (4 << 20) // per_image)
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, step):
        chunk = images[start:start + step].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = max(1, n * images.shape[2] * images.shape[3])
    mean = total / count / 255.0
    var = (total_sq / count / 255.0**2 - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channel: avoid dividing by 0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a uint8 NCHW batch, chunked to bound the float working memory."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    per_image = max(images[0].numel(), images.shape[1] * size * size) if len(images) else 1
    step = max(1, (8 << 20) // per_image)
    for start in range(0, images.shape[0], step):
        chunk = images[start:start + step].to(torch.float32)
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + step] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _split_of(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray) -> Split:
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return Split(images[index].contiguous(), labels[index].contiguous())
