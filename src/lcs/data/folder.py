"""Image folders (``root/<class>/*.jpg`` or ``root/{train,val}/<class>/*``): scanned, decoded once into
memory (cached by ``cache``), or handed to ``stream`` when too large."""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat

import numpy as np
import torch
from PIL import Image

from ..errors import LcsError
from .base import ImageData
from .cache import _cache_location, _read_cache, _write_cache
from .prepare import _channel_stats, _split_of, _stratified_split
from .stream import StreamData, stream_folder, use_stream

__all__ = ["IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_DECODE_CHUNK = 512  # files per decode task: amortises inter-process overhead, still balances load
_MIN_POOL_FILES = 4096  # below this, starting worker processes costs more than it saves
_MAX_DECODE_WORKERS = 16


def _scan_images(folder: str) -> dict[str, list[os.DirEntry]]:
    """Class name -> sorted image entries, walking each class folder recursively (hidden names skipped)."""
    classes: dict[str, list[os.DirEntry]] = {}
    with os.scandir(folder) as it:
        dirs = [e for e in it if e.is_dir() and not e.name.startswith(".")]
    class_dirs = sorted(dirs, key=lambda e: e.name)
    for cdir in class_dirs:
        files: list[os.DirEntry] = []
        stack = [cdir.path]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        stack.append(e.path)
                    elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                        files.append(e)
        classes[cdir.name] = sorted(files, key=lambda e: e.path)
    return classes


def _class_tree(folder: str) -> dict[str, list[os.DirEntry]]:
    tree = _scan_images(folder)
    if not tree:
        raise LcsError(f"image folder {folder} has no class sub-folders; "
                       f"lay it out as {folder}/<class>/*.jpg")
    empty = [c for c, files in tree.items() if not files]
    tree = {c: files for c, files in tree.items() if files}
    if not tree:
        raise LcsError(f"image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                       "sub-folders; check the path")
    for c in empty:
        warnings.warn(f"ignoring class folder {os.path.join(folder, c)}: it holds no images", stacklevel=4)
    return tree


def _decode_one(path: str, size: int) -> np.ndarray:
    with Image.open(path) as img:
        if img.size != (size, size) and img.format == "JPEG":
            img.draft("RGB", (size, size))  # libjpeg decodes at a reduced DCT scale: much faster
        rgb = img.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_chunk(paths: Sequence[str], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a run of files (a process-pool task); failures come back as (index, reason)."""
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    failed = []
    for i, path in enumerate(paths):
        try:
            out[i] = _decode_one(path, size)
        except Exception as err:  # any unreadable file is skipped, never a crash
            failed.append((i, f"{type(err).__name__}: {err}"))
    return out, failed


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _decode_files(paths: list[str], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode to N x H x W x 3, in forked worker processes when there are enough files.

    Measured on 32x32 CIFAR JPEGs, Pillow's per-file Python overhead dominates and holds the GIL, so a
    thread pool was slower than one thread; processes scale with cores (as torch's DataLoader does).
    """
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    starts = range(0, len(paths), _DECODE_CHUNK)
    workers = min(_usable_cpus(), len(starts), _MAX_DECODE_WORKERS)
    parts: Iterator[tuple[np.ndarray, list[tuple[int, str]]]]
    pool = None
    if workers > 1 and len(paths) >= _MIN_POOL_FILES and "fork" in mp.get_all_start_methods():
        # fork: workers need no re-import of __main__ and only run Pillow/numpy, never torch.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"))
        parts = pool.map(_decode_chunk, [paths[s:s + _DECODE_CHUNK] for s in starts], repeat(size))
    else:
        parts = (_decode_chunk(paths[s:s + _DECODE_CHUNK], size) for s in starts)
    failures: list[tuple[int, str]] = []
    try:
        for start, (chunk, failed) in zip(starts, parts, strict=True):
            out[start:start + len(chunk)] = chunk
            failures += [(start + i, msg) for i, msg in failed]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out, failures


def _load_folder(root: str, val_fraction: float, seed: int, image_size: int, cache_dir: str | None,
                 pipeline: str = "auto", workers: int | None = None) -> ImageData | StreamData:
    """``root/<class>/*`` (val carved out, seeded and stratified) or ``root/{train,val}/<class>/*``."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    presplit = os.path.isdir(train_dir) and os.path.isdir(val_dir)
    if presplit:
        train_tree = _class_tree(train_dir)
        val_tree = _class_tree(val_dir)
        classes = list(train_tree)
        unknown = sorted(set(val_tree) - set(classes))
        if unknown:
            raise LcsError(f"{val_dir} has classes missing from {train_dir}: {', '.join(unknown[:5])}; "
                           "give every val class a train folder")
        index = {c: i for i, c in enumerate(classes)}
        entries = [e for c in classes for e in train_tree[c]]
        n_train = len(entries)
        labels_np = np.array([index[c] for c in classes for _ in train_tree[c]] +
                             [index[c] for c in val_tree for _ in val_tree[c]], dtype=np.int64)
        entries += [e for c in val_tree for e in val_tree[c]]
        train_idx, val_idx = np.arange(n_train), np.arange(n_train, len(entries))
    else:
        tree = _class_tree(root)
        classes = list(tree)
        if len(classes) < 2:
            raise LcsError(f"image folder {root} has only one class folder ({classes[0]!r}); point root at "
                           "the folder that holds the class folders (or at one with train/ and val/)")
        entries = [e for c in classes for e in tree[c]]
        labels_np = np.array([i for i, c in enumerate(classes) for _ in tree[c]], dtype=np.int64)
        train_idx, val_idx = _stratified_split(labels_np, val_fraction, seed)
    if len(val_idx) == 0:
        raise LcsError(f"the validation split of {root} is empty; add images or raise val_fraction "
                       f"(now {val_fraction})")
    if use_stream(pipeline, image_size, len(entries)):
        return stream_folder(root, classes, [e.path for e in entries], labels_np, train_idx, val_idx, image_size,
                             workers)

    cache_path = key = None
    if cache_dir is not None:
        cache_path, key = _cache_location(cache_dir, root, image_size, val_fraction, seed, presplit, entries)
        cached = _read_cache(cache_path, key)
        if cached is not None:
            return cached

    paths = [e.path for e in entries]
    decoded, failures = _decode_files(paths, image_size)
    ok = np.ones(len(paths), dtype=bool)
    for i, msg in failures:
        ok[i] = False
        warnings.warn(f"skipping unreadable image {paths[i]} ({msg})", stacklevel=3)
    if failures:
        warnings.warn(f"skipped {len(failures)} of {len(paths)} unreadable image files under {root}",
                      stacklevel=3)
    images = torch.from_numpy(decoded).permute(0, 3, 1, 2)
    labels = torch.from_numpy(labels_np)
    train = _split_of(images, labels, train_idx[ok[train_idx]])
    val = _split_of(images, labels, val_idx[ok[val_idx]])
    if len(train) == 0 or len(val) == 0:
        raise LcsError(f"no readable images left in the {'train' if len(train) == 0 else 'validation'} split "
                       f"of {root}; check the image files")
    mean, std = _channel_stats(train.images)
    data = ImageData("folder", train, val, classes, mean, std, pad=image_size // 8, hflip=True)
    if cache_path is not None and key is not None:
        _write_cache(cache_path, key, data, len(failures))
    return data
