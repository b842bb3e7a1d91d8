"""Files that are either whole or absent, and tensor files that prove they are undamaged.

* ``atomic_write`` / ``atomic_dir``: write under a temporary name beside the target, fsync, rename.
  On any failure (a full disk, a kill signal caught as an exception) the temporary file or folder
  is removed and the error names the path, so no partial file ever stays.
* ``save_tensors`` / ``load_tensors``: safetensors files whose metadata carries ``lcs_digest``, the
  SHA-256 of every tensor's bytes in name order. safetensors validates the header but not the
  data: a flipped byte inside a weight loads silently (and scored 0.10 with a NaN loss). Loading
  recomputes the digest and refuses a damaged file with one line (``DamagedFileError``). Files
  written before digests existed load as before.
* ``dumps_json``: strict JSON (NaN and infinities become ``null``), written atomically by
  ``write_json``.

Deploy side: imports only the standard library, torch and safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import LcsError

__all__ = ["DamagedFileError", "atomic_write", "atomic_dir", "tensor_digest", "serialize_tensors", "save_tensors",
           "load_tensors", "read_safetensors_metadata", "dumps_json", "write_json", "json_safe"]

DIGEST_KEY = "lcs_digest"


class DamagedFileError(LcsError):
    """A file whose tensor data does not match the digest in its header (or cannot be parsed)."""


def _write_error(path: str | os.PathLike, err: OSError) -> LcsError:
    reason = err.strerror or str(err)
    return LcsError(f"could not write {os.fspath(path)}: {reason}; nothing was left behind")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(p) as f: f.write(...)``: the file appears complete at ``p`` or not at all."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)  # `--json prof/x.json` in a fresh clone: the folder is created
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp: ...write into tmp...``: renamed to ``p`` (replacing it) on success,
    removed on failure."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as e:
        raise _write_error(final, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8
                     else t.view(-1).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file with the tensors' digest in its metadata."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(tensors, {**(metadata or {}), DIGEST_KEY: tensor_digest(tensors)})


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file with the tensors' digest in its metadata, atomically; returns bytes."""
    data = serialize_tensors(tensors, metadata)
    with atomic_write(path) as f:
        f.write(data)
    return len(data)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DamagedFileError(f"{path} is corrupted or truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > os.path.getsize(path):
                raise DamagedFileError(f"{path} is corrupted or truncated (not a safetensors header: {n} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise LcsError(f"no such file: {path}") from None
    except (ValueError, UnicodeDecodeError):
        raise DamagedFileError(f"{path} is corrupted or truncated (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path} is corrupted or truncated (unreadable safetensors header)")
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, verified against its digest when it has one."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = os.fspath(path)
    meta = read_safetensors_metadata(path)
    try:
        with open(path, "rb") as f:
            tensors = st_load(f.read())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise DamagedFileError(f"{path} is corrupted or truncated ({str(e).splitlines()[0]})") from None
    want = meta.get(DIGEST_KEY)
    if want is not None and tensor_digest(tensors) != want:
        raise DamagedFileError(f"{path} is damaged: its tensor data does not match the digest in its header")
    return tensors, meta


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / ±inf float replaced by None (strict JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    with atomic_write(path, "w") as f:
        f.write(dumps_json(obj, indent=indent))
