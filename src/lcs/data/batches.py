"""Stateless, deterministic batch iteration over any data: in memory, streamed, or the user's DataLoaders.

Every batch is a pure function of (seed, epoch, batch index), so training resumes exactly and
distributed ranks agree without any sampler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..errors import LcsError
from .base import ImageData, Split
from .seeds import _derive_seed, _is_int
from .stream import StreamData, stream_eval_batches, stream_train_batches
from .transforms import alternating_flips, crop_and_flip, draw_augmentation, normalize

__all__ = ["num_batches", "train_batches", "eval_batches"]


def num_batches(n: int, batch_size: int, *, drop_last: bool = True, world_size: int = 1) -> int:
    """Global batches per epoch; ``batch_size`` is global (all ranks together), so world_size only
    has to divide it."""
    _check_batch(batch_size, world_size)
    if n < 0:
        raise LcsError(f"dataset size {n} must be >= 0")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _check_batch(batch_size: int, world_size: int) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise LcsError(f"batch_size={batch_size!r} must be a positive integer")
    if not _is_int(world_size) or world_size < 1:
        raise LcsError(f"world_size={world_size!r} must be a positive integer")
    if batch_size % world_size:
        raise LcsError(f"global batch_size={batch_size} is not divisible by world_size={world_size}; "
                       f"use a multiple of {world_size}")


def train_batches(
    data: ImageData | StreamData,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    augment: bool = True,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of each global training batch of one epoch (drop_last), augmented and normalized.

    A pure function of (seed, epoch): ``start_batch`` resumes mid-epoch without recomputing earlier
    batches, and rank r of world_size gets rows [r*b/ws, (r+1)*b/ws) of every global batch.
    """
    if hasattr(data, "train_epoch"):  # the user's own DataLoaders (lcs.data.loaders.LoaderData)
        return data.train_epoch(int(epoch), int(seed), int(start_batch), torch.device(device))
    n = len(data.train)
    total = num_batches(n, batch_size, world_size=world_size)
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise LcsError(f"rank={rank!r} must be an integer in [0, {world_size})")
    if total == 0:
        raise LcsError(f"batch_size={batch_size} exceeds the {n} training images; use a smaller batch_size")
    if not _is_int(start_batch) or not 0 <= start_batch <= total:
        raise LcsError(f"start_batch={start_batch!r} must be an integer in [0, {total}]")
    if not _is_int(epoch) or epoch < 0:
        raise LcsError(f"epoch={epoch!r} must be a non-negative integer")
    if isinstance(data, StreamData):
        return stream_train_batches(data, int(batch_size), epoch=int(epoch), seed=int(seed),
                                    start_batch=int(start_batch), rank=int(rank), world_size=int(world_size),
                                    augment=augment, total=total, device=torch.device(device))
    return _train_iter(data, int(batch_size), int(epoch), int(seed), int(start_batch), int(rank),
                       int(world_size), augment, total, torch.device(device))


def _train_iter(data: ImageData, batch_size: int, epoch: int, seed: int, start_batch: int, rank: int,
                world_size: int, augment: bool, total: int, device: torch.device
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(_derive_seed("epoch", seed, epoch))
    perm = torch.randperm(len(data.train), generator=gen)
    local = batch_size // world_size
    mine = slice(rank * local, (rank + 1) * local)
    sides = (alternating_flips(len(data.train), seed=seed, epoch=epoch)  # once per epoch, indexed per batch
             if augment and data.hflip and data.flip == "alternate" else None)
    for b in range(start_batch, total):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        x = data.train.images[idx[mine]].to(device)
        y = data.train.labels[idx[mine]].to(device)
        if augment:
            dy, dx, flip = draw_augmentation(batch_size, data.pad, data.hflip,
                                             seed=seed, epoch=epoch, batch=b)
            if sides is not None:
                flip = sides[idx]
            x = crop_and_flip(x, dy[mine], dx[mine], flip[mine], data.pad)
        yield normalize(x, data.mean, data.std), y


def eval_batches(data: ImageData | StreamData, split: str = "val", batch_size: int = 256, *,
                 device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of ``split`` ("train" or "val") in order, normalized, last batch possibly short."""
    if split not in ("train", "val"):
        raise LcsError(f"split={split!r} is not one of 'train', 'val'")
    _check_batch(batch_size, 1)
    if hasattr(data, "val_batches"):  # the user's own DataLoaders (lcs.data.loaders.LoaderData)
        if split != "val":
            raise LcsError("user DataLoaders provide the validation split only")
        return data.val_batches(torch.device(device))
    if isinstance(data, StreamData):
        return stream_eval_batches(data, split, int(batch_size), torch.device(device))
    part: Split = getattr(data, split)
    dev = torch.device(device)

    def it() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(part), batch_size):
            x = part.images[start:start + batch_size].to(dev)
            yield normalize(x, data.mean, data.std), part.labels[start:start + batch_size].to(dev)

    return it()
