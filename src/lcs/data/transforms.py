"""Per-batch tensor operations: normalization and the seeded crop-and-flip augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import LcsError
from .seeds import _derive_seed

__all__ = ["normalize", "draw_augmentation", "alternating_flips", "crop_and_flip"]


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N)CHW -> float32 ``(x / 255 - mean) / std``, computed on the images' device."""
    if images_uint8.dtype != torch.uint8:
        raise LcsError(f"normalize expects uint8 images, got {images_uint8.dtype}; "
                       "pass the raw 0..255 tensor")
    c = images_uint8.shape[-3]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).view(c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).view(c, 1, 1)
    return images_uint8.to(torch.float32).div_(255.0).sub_(m).div_(s)


def draw_augmentation(n: int, pad: int, hflip: bool, *, seed: int, epoch: int, batch: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (dy, dx in 0..2*pad) and flip flags for one GLOBAL batch of ``n`` samples.

    Seeded from (seed, epoch, batch) only, never from rank, so each rank's slice matches the
    single-process batch exactly.
    """
    gen = torch.Generator().manual_seed(_derive_seed("augment", int(seed), int(epoch), int(batch)))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen).bool()
    if not hflip:
        flip = torch.zeros(n, dtype=torch.bool)
    return offsets[0], offsets[1], flip


def alternating_flips(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """Flip flags of all ``n`` training images in ``epoch`` (index them by image): a seeded coin per
    image, negated every odd epoch.

    Why (Jordan, "94 % on CIFAR-10 in 3.29 seconds", 2024): with independent coins a quarter of the
    images are seen the same way round in two consecutive epochs; alternating shows each both ways
    every two epochs, which helps most when there are few epochs. A function of (seed, index, epoch)
    only, so it resumes exactly and ranks agree.
    """
    gen = torch.Generator().manual_seed(_derive_seed("alternate-flip", int(seed)))
    first = torch.randint(0, 2, (int(n),), generator=gen).bool()
    return first ^ bool(int(epoch) % 2)


def crop_and_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  pad: int) -> torch.Tensor:
    """Zero-pad the batch once, take each sample's H x W window at (dy, dx), mirror where ``flip``.

    Two batched gathers (rows, then columns with the flip folded into the column index) replace a
    per-image Python loop; works for any dtype and device.
    """
    n, c, h, w = images.shape
    if pad > 0:
        padded = images.new_zeros((n, c, h + 2 * pad, w + 2 * pad))
        padded[:, :, pad:pad + h, pad:pad + w] = images
    else:
        padded = images
    dev = images.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    rows = dy[:, None] + torch.arange(h, device=dev)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, padded.shape[3]))
    cols = dx[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
