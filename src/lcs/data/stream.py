"""Image folders too large to hold in memory (ImageNet): decoded per batch by DataLoader workers.

The in-memory path (``lcs.data.folder``) decodes a folder once into uint8 tensors; at 224×224 ImageNet is
~190 GB that way. Here every epoch re-reads the JPEGs in ``torch.utils.data.DataLoader`` worker
processes with the ImageNet transforms of SPEC §2, implemented with Pillow (torchvision does not
import beside the CPU torch build):

- train: RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip, torchvision's
  sampling rule (10 tries, then a centre crop clamped to the ratio range);
- val: Resize(round(size·256/224)) of the shorter side + CenterCrop(size).

Both are one ``Image.resize(..., box=...)`` of the crop box (the same pixels as resize-then-crop)
after ``Image.draft``, which lets libjpeg decode at 1/2–1/8 scale when the crop still has at least
``size`` pixels per side there: most of the decode cost is skipped.

Batches keep the in-memory path's contract: the permutation is a function of (seed, epoch), every
sample's crop and flip a function of (seed, epoch, global batch, position), so the batches do not
depend on the number of workers or processes, resuming mid-epoch is exact, and rank r of N takes
rows [r·b/N, (r+1)·b/N) of every global batch (every rank the same number of batches).
An unreadable file is dropped from its batch with one warning naming it, and a count per pass.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import LcsError
from .seeds import _derive_seed
from .transforms import normalize

__all__ = ["PIPELINES", "IMAGENET_MEAN", "IMAGENET_STD", "STREAM_MIN_SIZE", "MEMORY_LIMIT_BYTES", "FileSplit",
           "StreamData", "use_stream", "default_workers", "resize_short_side", "random_resized_crop_box",
           "decode_train", "decode_val", "stream_folder", "stream_train_batches", "stream_eval_batches"]

PIPELINES = ("auto", "memory", "stream")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
STREAM_MIN_SIZE = 64  # auto: from this image size on, folders stream (ImageNet-style training)
MEMORY_LIMIT_BYTES = 4 << 30  # auto: also stream when the decoded uint8 set would exceed this
_MAX_DEFAULT_WORKERS = 8


def use_stream(pipeline: str, image_size: int, num_files: int) -> bool:
    """The rule for ``data.pipeline``: ``stream``/``memory`` as asked; ``auto`` streams when
    ``image_size >= 64`` (ImageNet-style crops of full images; a pre-resized square cache would
    lose them) or when the decoded set, num_files·3·size², would exceed 4 GiB."""
    if pipeline not in PIPELINES:
        raise LcsError(f"data.pipeline={pipeline!r} is invalid: must be one of {', '.join(PIPELINES)}")
    if pipeline != "auto":
        return pipeline == "stream"
    return image_size >= STREAM_MIN_SIZE or num_files * 3 * image_size * image_size > MEMORY_LIMIT_BYTES


def default_workers() -> int:
    """Worker processes per training process: the CPUs shared among the local processes, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(_MAX_DEFAULT_WORKERS, cpus // local))


@dataclass
class FileSplit:
    """One split as file paths and labels: nothing is decoded until a batch asks for it."""

    paths: list[str]
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class StreamData:
    """A folder read by DataLoader workers; ``lcs.data.train_batches``/``eval_batches`` accept it
    wherever they accept an in-memory ``ImageData``."""

    name: str
    root: str
    train: FileSplit
    val: FileSplit
    classes: list[str]
    image_size: int
    workers: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hflip: bool = True
    skipped: set[str] = field(default_factory=set)  # unreadable files already warned about

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------------------
# Geometry and decoding (run in the worker processes)


def resize_short_side(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes ``short``, the longer keeps the aspect
    ratio (truncated)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box, by torchvision's rule: 10 tries at a random
    area fraction and log-uniform aspect ratio, then the whole image clamped to the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _crop_resize(path: str, box: tuple[float, float, float, float], min_side: float, size: int,
                 flip: bool = False) -> np.ndarray:
    """Decode ``path`` (a JPEG at the smallest DCT scale that keeps ``min_side`` ≥ ``size`` pixels of
    the box) and resample the box, in original-image coordinates, to size × size RGB."""
    with Image.open(path) as img:
        width, height = img.size
        if img.format == "JPEG":
            f = size / min_side  # the scale at which the box's shorter side is exactly `size`
            if f < 1:
                img.draft("RGB", (math.ceil(width * f), math.ceil(height * f)))
        sx, sy = img.size[0] / width, img.size[1] / height
        rgb = img.convert("RGB")
    l, t, r, b = box
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=(l * sx, t * sy, r * sx, b * sy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


def _header_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def decode_train(path: str, size: int, sample_seed: int, hflip: bool = True) -> np.ndarray:
    """RandomResizedCrop + flip of one file, a pure function of (file, size, sample_seed): H×W×3 uint8."""
    rng = random.Random(sample_seed)
    width, height = _header_size(path)
    left, top, w, h = random_resized_crop_box(width, height, rng)
    flip = hflip and rng.random() < 0.5
    return _crop_resize(path, (left, top, left + w, top + h), min(w, h), size, flip)


def decode_val(path: str, size: int) -> np.ndarray:
    """Resize(round(size·256/224)) + CenterCrop(size), as one resample of the crop box."""
    width, height = _header_size(path)
    nw, nh = resize_short_side(width, height, round(size * 256 / 224))
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    sx, sy = width / nw, height / nh  # resized → original coordinates
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return _crop_resize(path, box, min(size * sx, size * sy), size)


class _Files(Dataset):
    """Items are (index, sample seed) for training crops or an index for the val transform; a
    failure comes back as a marker (None, label, (path, reason)), never an exception."""

    def __init__(self, split: FileSplit, size: int, train: bool, hflip: bool):
        self.paths, self.labels = split.paths, split.labels.tolist()
        self.size, self.train, self.hflip = size, train, hflip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: Any) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        index, seed = item if self.train else (item, 0)
        path = self.paths[index]
        try:
            if self.train:
                img = decode_train(path, self.size, seed, self.hflip)
            else:
                img = decode_val(path, self.size)
        except Exception as err:  # a corrupted or non-image file: dropped in _collate, warned in the main process
            return None, self.labels[index], (path, f"{type(err).__name__}: {err}")
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), self.labels[index], None


def _collate(samples: list[tuple[torch.Tensor | None, int, tuple[str, str] | None]]
             ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    ok = [(x, y) for x, y, _ in samples if x is not None]
    failed = [err for x, _, err in samples if x is None and err is not None]
    if not ok:
        return torch.zeros((0, 3, 0, 0), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), failed
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok], dtype=torch.int64), failed


class _TrainBatches:
    """Batch sampler: this rank's rows of every global batch, each row (file index, sample seed)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int, rank: int,
                 world_size: int, total: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world, self.total = start_batch, rank, world_size, total

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(_derive_seed("epoch", self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=gen)  # the same permutation as the in-memory path
        local = self.batch_size // self.world
        mine = slice(self.rank * local, (self.rank + 1) * local)
        for b in range(self.start, self.total):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            g = torch.Generator().manual_seed(_derive_seed("stream-augment", self.seed, self.epoch, b))
            seeds = torch.randint(0, 1 << 62, (self.batch_size,), generator=g)
            yield list(zip(idx[mine].tolist(), seeds[mine].tolist(), strict=True))


def _loader(dataset: Dataset, workers: int, device: torch.device, **kwargs: Any) -> DataLoader:
    extra: dict[str, Any] = {}
    if workers > 0 and "fork" in mp.get_all_start_methods():
        extra["multiprocessing_context"] = "fork"  # workers only run Pillow; no re-import of __main__
    return DataLoader(dataset, num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                      **extra, **kwargs)


def _batches(data: StreamData, loader: DataLoader, split: str, size: int, device: torch.device,
             training: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    failed = 0
    for x, y, failures in loader:
        for path, why in failures:
            failed += 1
            if path not in data.skipped:
                data.skipped.add(path)
                warnings.warn(f"skipping unreadable image {path} ({why})", stacklevel=2)
        if len(y) == 0:
            if training:  # every rank must step on every batch (DDP), so an empty one cannot be skipped
                raise LcsError(f"every image of a training batch under {data.root} is unreadable "
                               f"({', '.join(p for p, _ in failures[:3])}); remove the broken files")
            continue
        x = x.to(device, non_blocking=True)  # uint8 travels: a quarter of the float32 bytes
        yield normalize(x, data.mean, data.std), y.to(device, non_blocking=True)
    if failed:
        warnings.warn(f"skipped {failed} unreadable image file(s) of {size} in this pass over the {split} split "
                      f"of {data.root} ({len(data.skipped)} distinct unreadable files seen so far)", stacklevel=2)


def stream_train_batches(data: StreamData, batch_size: int, *, epoch: int, seed: int, start_batch: int,
                         rank: int, world_size: int, augment: bool, total: int, device: torch.device
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """See ``lcs.data.train_batches`` (arguments validated there). ``augment=False`` gives every
    training image the val transform in the same (seed, epoch) order."""
    sampler = _TrainBatches(len(data.train), batch_size, seed, epoch, start_batch, rank, world_size, total)
    if augment:
        loader = _loader(_Files(data.train, data.image_size, True, data.hflip), data.workers, device,
                         batch_sampler=sampler)
    else:
        plain = [[i for i, _ in rows] for rows in sampler]
        loader = _loader(_Files(data.train, data.image_size, False, False), data.workers, device,
                         batch_sampler=plain)
    return _batches(data, loader, "train", len(data.train), device, training=True)


def stream_eval_batches(data: StreamData, split: str, batch_size: int, device: torch.device
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``split`` in order with the val transform; unreadable files are left out."""
    part: FileSplit = getattr(data, split)
    loader = _loader(_Files(part, data.image_size, False, False), data.workers, device, batch_size=batch_size,
                     shuffle=False, drop_last=False)
    return _batches(data, loader, split, len(part), device, training=False)


def stream_folder(root: str, classes: list[str], paths: Sequence[str], labels: np.ndarray, train_idx: np.ndarray,
                  val_idx: np.ndarray, image_size: int, workers: int | None) -> StreamData:
    """A StreamData over already-listed files (``lcs.data.folder`` scans the folder and picks the split)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 0):
        raise LcsError(f"workers={workers!r} must be a non-negative integer (0 decodes in the training process)")
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def split(idx: np.ndarray) -> FileSplit:
        return FileSplit([paths[i] for i in idx], lab[torch.from_numpy(np.asarray(idx, dtype=np.int64))])

    return StreamData("folder", root, split(train_idx), split(val_idx), list(classes), int(image_size),
                      default_workers() if workers is None else int(workers))
