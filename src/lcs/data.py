"""Image datasets decoded once into uint8 tensors, plus stateless, deterministic batch iteration.

The datasets LCS trains on (digits, CIFAR-10, small image folders) fit in memory as uint8, so we decode
them once and run augmentation on whole batches: far faster on CPU than per-sample loaders, and every
batch is a pure function of (seed, epoch, batch index), so training resumes exactly and distributed
ranks agree without any sampler state.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lcs.errors import LcsError
from lcs.stream import PIPELINES, StreamData, stream_eval_batches, stream_folder, stream_train_batches, use_stream

__all__ = [
    "DATASETS",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_EXTENSIONS",
    "Split",
    "ImageData",
    "load_data",
    "num_batches",
    "train_batches",
    "eval_batches",
    "normalize",
    "draw_augmentation",
    "crop_and_flip",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "folder")
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_VAL_FILE = "test_batch"
_CIFAR_DIRNAME = "cifar-10-batches-py"
_CACHE_FORMAT = "lcs-folder-cache"
_CACHE_VERSION = 1
_DECODE_CHUNK = 512  # files per decode task: amortises inter-process overhead, still balances load
_MIN_POOL_FILES = 4096  # below this, starting worker processes costs more than it saves
_MAX_DECODE_WORKERS = 16


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# Loading


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
    ``workers`` DataLoader processes, ImageNet transforms) or "auto" (see ``lcs.stream.use_stream``).
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


def _is_int(value: object) -> bool:
    """Python or numpy integers, not bools: counts and indices often arrive as numpy scalars."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from a tuple of ints/strings, so derived streams never collide or drift."""
    parts = tuple(int(p) if isinstance(p, np.integer) else p for p in parts)  # np.int64(3) reprs differently
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


# --- CIFAR-10 python batches ------------------------------------------------------------------------------


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


# --- image folder -----------------------------------------------------------------------------------------


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


# --- safetensors cache ------------------------------------------------------------------------------------


def _cache_location(cache_dir: str, root: str, image_size: int, val_fraction: float, seed: int,
                    presplit: bool, entries: list[os.DirEntry]) -> tuple[str, str]:
    """File name from the settings (one file per setting, overwritten when files change); key from all."""
    carve = None if presplit else [val_fraction, int(seed)]  # a train/val layout ignores both
    settings = {"root": root, "image_size": image_size, "carve_val": carve, "version": _CACHE_VERSION}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    name_hash = h.copy().hexdigest()[:16]
    cut = len(os.path.join(root, ""))  # entries come from scandir(root/...): slicing beats relpath
    for e in entries:
        st = e.stat()
        h.update(f"{e.path[cut:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in os.path.basename(root) or "root")
    folder = os.path.abspath(os.path.expanduser(str(cache_dir)))
    return os.path.join(folder, f"folder-{base[:40]}-{image_size}px-{name_hash}.safetensors"), h.hexdigest()


def _read_cache(path: str, key: str) -> ImageData | None:
    if not os.path.isfile(path):
        return None
    try:
        from .files import load_tensors, read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        if meta.get("format") != _CACHE_FORMAT or meta.get("key") != key:
            return None  # stale: files or settings changed
        t, _ = load_tensors(path)  # verified against its digest: a damaged cache is re-decoded
        info = json.loads(meta["info"])
        data = ImageData("folder", Split(t["train_images"], t["train_labels"]),
                         Split(t["val_images"], t["val_labels"]), list(info["classes"]),
                         tuple(info["mean"]), tuple(info["std"]), int(info["pad"]), bool(info["hflip"]))
        if len(data.train.images) != len(data.train) or len(data.val.images) != len(data.val):
            raise ValueError("image/label counts differ")
        return data
    except Exception as err:  # a damaged cache is only a lost speed-up
        warnings.warn(f"ignoring unreadable data cache {path} ({type(err).__name__}: {err}); re-decoding",
                      stacklevel=4)
        return None


def _write_cache(path: str, key: str, data: ImageData, skipped: int) -> None:
    """Atomic write (``lcs.files``) so a crash or a full disk never leaves half a cache."""
    from .files import save_tensors

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = {"classes": data.classes, "mean": list(data.mean), "std": list(data.std), "pad": data.pad,
                "hflip": data.hflip, "skipped": skipped}
        tensors = {f"{name}_{kind}": getattr(getattr(data, name), kind).contiguous()
                   for name in ("train", "val") for kind in ("images", "labels")}
        save_tensors(tensors, path, {"format": _CACHE_FORMAT, "key": key, "info": json.dumps(info)})
    except (OSError, LcsError) as err:  # read-only or full disk: training still works, just without the cache
        warnings.warn(f"could not write data cache {path} ({err}); continuing without it", stacklevel=4)


# ---------------------------------------------------------------------------------------------------------
# Batches


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N)CHW -> float32 ``(x / 255 - mean) / std``, computed on the images' device."""
    if images_uint8.dtype != torch.uint8:
        raise LcsError(f"normalize expects uint8 images, got {images_uint8.dtype}; "
                       "pass the raw 0..255 tensor")
    c = images_uint8.shape[-3]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).view(c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).view(c, 1, 1)
    return images_uint8.to(torch.float32).div_(255.0).sub_(m).div_(s)


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
    if hasattr(data, "train_epoch"):  # the user's own DataLoaders (lcs.loaders.LoaderData)
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
    for b in range(start_batch, total):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        x = data.train.images[idx[mine]].to(device)
        y = data.train.labels[idx[mine]].to(device)
        if augment:
            dy, dx, flip = draw_augmentation(batch_size, data.pad, data.hflip,
                                             seed=seed, epoch=epoch, batch=b)
            x = crop_and_flip(x, dy[mine], dx[mine], flip[mine], data.pad)
        yield normalize(x, data.mean, data.std), y


def eval_batches(data: ImageData | StreamData, split: str = "val", batch_size: int = 256, *,
                 device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of ``split`` ("train" or "val") in order, normalized, last batch possibly short."""
    if split not in ("train", "val"):
        raise LcsError(f"split={split!r} is not one of 'train', 'val'")
    _check_batch(batch_size, 1)
    if hasattr(data, "val_batches"):  # the user's own DataLoaders (lcs.loaders.LoaderData)
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
