"""The safetensors cache of decoded image folders: file name and key from the settings and the files."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

from ..errors import LcsError
from .base import ImageData, Split

_CACHE_FORMAT = "lcs-folder-cache"
_CACHE_VERSION = 1


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
        from ..files import load_tensors, read_safetensors_metadata

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
    from ..files import save_tensors

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = {"classes": data.classes, "mean": list(data.mean), "std": list(data.std), "pad": data.pad,
                "hflip": data.hflip, "skipped": skipped}
        tensors = {f"{name}_{kind}": getattr(getattr(data, name), kind).contiguous()
                   for name in ("train", "val") for kind in ("images", "labels")}
        save_tensors(tensors, path, {"format": _CACHE_FORMAT, "key": key, "info": json.dumps(info)})
    except (OSError, LcsError) as err:  # read-only or full disk: training still works, just without the cache
        warnings.warn(f"could not write data cache {path} ({err}); continuing without it", stacklevel=4)
