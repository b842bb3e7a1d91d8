"""Stable derived seeds and integer checks shared by the loaders and the batch iterators."""

from __future__ import annotations

import hashlib

import numpy as np


def _is_int(value: object) -> bool:
    """Python or numpy integers, not bools: counts and indices often arrive as numpy scalars."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from a tuple of ints/strings, so derived streams never collide or drift."""
    parts = tuple(int(p) if isinstance(p, np.integer) else p for p in parts)  # np.int64(3) reprs differently
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
