"""Entropy-near coding of the positions of a sparse tensor's nonzeros, and the information limit.

A bitmap costs n bits whatever the density; the positions of nnz nonzeros carry only n·H(nnz/n)
bits. Golomb-Rice coding of the gaps between successive positions comes within a few percent of
that for iid masks (geometric gaps), and stays cheap to decode.

Format (``encode_positions``): gaps g_i = p_i − p_{i−1} − 1 (p_{−1} = −1) split with a parameter k
into two streams, so that decoding needs no sequential bit parsing:

  * ``unary``: per gap, q_i = g_i >> k ones then one zero, packed MSB first (``pack_bits``);
    the zeros' positions z_i give q_i = z_i − z_{i−1} − 1;
  * ``rem``: the remainders g_i & (2^k − 1) as k-bit codes back to back, MSB first (the
    ``pack_ints`` layout; empty when k = 0).

If more than half the entries are True the False positions are coded instead (``complement``),
since the entropy is symmetric. Trailing entries after the last coded position cost nothing: the
decoder knows n. The unary stream checks itself: any single flipped bit (padding included) changes
the number of zeros, so decoding refuses it; a flipped remainder bit cannot be seen and decodes to
a different mask with the same count (unless a position leaves the range).

Also the bit packers every lcs encoding is built of: ``pack_bits`` (a 1-bit mask) and ``pack_ints``
(b-bit codes back to back). Deploy side: imports only torch and the standard library.
"""

from __future__ import annotations

import math

import torch

from .errors import LcsError
from .files import DamagedFileError
from .layers.quant import check_bits

__all__ = ["pack_bits", "unpack_bits", "pack_ints", "unpack_ints", "encode_positions", "decode_positions",
           "position_bits", "entropy_bits", "information_limit_bits"]

MAX_K = 24  # remainders up to 2^24 − 1: gaps this long mean densities below ~1e-7
_CHUNK = 1 << 20  # codes per chunk (a multiple of 8, so whole bytes for every k): bounded temporary memory


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → uint8 tensor of ⌈n/8⌉ bytes, most significant bit first (like numpy.packbits)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` bits as a bool tensor."""
    bits = (packed.view(-1, 1) & _BIT_WEIGHTS) != 0
    return bits.flatten()[:numel]


def _pack_width(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Codes of ``width`` bits each, back to back, most significant bit first (``pack_bits`` of the
    codes' bit planes, in chunks of bounded memory); any width ≥ 1."""
    flat = codes.detach().flatten().to(torch.int32)
    shifts = torch.arange(width - 1, -1, -1, dtype=torch.int32)
    parts = [pack_bits((chunk[:, None] >> shifts) & 1) for chunk in flat.split(_CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def _unpack_width(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Inverse of ``_pack_width``: the first ``numel`` codes as int64 (the caller checked the byte count)."""
    weights = torch.tensor([1 << s for s in range(width - 1, -1, -1)], dtype=torch.int64)
    chunk_bytes = _CHUNK * width // 8
    parts, left = [], numel
    for chunk in packed.split(chunk_bytes):
        n = min(left, _CHUNK)
        parts.append((unpack_bits(chunk, n * width).view(n, width).to(torch.int64) * weights).sum(1))
        left -= n
        if left == 0:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def pack_ints(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) → uint8 tensor of ⌈n·bits/8⌉ bytes: each code's bits, most
    significant first, back to back (``pack_bits`` of the codes' bit planes)."""
    check_bits(bits)
    flat = codes.detach().flatten()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise LcsError(f"codes must lie in [0, {2**bits - 1}] to be packed in {bits} bits")
    return _pack_width(flat, bits)


def unpack_ints(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_ints``: the first ``numel`` codes as int32."""
    check_bits(bits)
    if packed.numel() * 8 < numel * bits:
        raise LcsError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    return _unpack_width(packed, bits, numel).to(torch.int32)


def _coded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(sorted int64 positions to code, complement flag, numel) of a bool mask in C order."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise LcsError(f"encode_positions needs a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    flat = mask.detach().cpu().flatten()
    numel = flat.numel()
    nnz = int(flat.sum())
    complement = int(2 * nnz > numel)
    pos = (~flat if complement else flat).nonzero().squeeze(1)
    return pos, complement, numel


def _gaps(pos: torch.Tensor) -> torch.Tensor:
    """Gaps g_i = p_i − p_{i−1} − 1 with p_{−1} = −1 (int64, all ≥ 0 for increasing positions)."""
    return torch.diff(pos, prepend=pos.new_full((1,), -1)) - 1


def _unary_bits(gaps: torch.Tensor, k: int) -> int:
    """Length of the unary stream for parameter k: Σ (g_i >> k) + n."""
    return int((gaps >> k).sum()) + gaps.numel()


def _best_k(gaps: torch.Tensor) -> int:
    """The smallest k in 0..MAX_K minimising Σ(g >> k) + n + n·k (bits before byte padding).

    The cost is convex in k (its step T(k+1) − T(k) = n − Σ ⌈(g >> k)/2⌉ never decreases), so the
    scan stops at the first k whose successor is no cheaper: few passes over the gaps.
    """
    n = gaps.numel()
    best_k, best = 0, _unary_bits(gaps, 0)
    for k in range(1, MAX_K + 1):
        cost = _unary_bits(gaps, k) + n * k
        if cost >= best:
            break
        best_k, best = k, cost
    return best_k


def _pack_fixed(codes: torch.Tensor, k: int) -> torch.Tensor:
    """k-bit remainders back to back, MSB first (the ``pack_ints`` layout, for any k ≥ 0)."""
    if k == 0 or codes.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    return _pack_width(codes, k)


def _unpack_fixed(packed: torch.Tensor, k: int, count: int) -> torch.Tensor:
    """Inverse of ``_pack_fixed``: ``count`` codes as int64 (the caller checked the byte count)."""
    if k == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64)
    return _unpack_width(packed, k, count)


def _encode_gaps(gaps: torch.Tensor, k: int) -> tuple[dict[str, torch.Tensor], int]:
    """The two streams for gaps with parameter k, and the unary stream's length in bits."""
    q = gaps >> k
    unary_bits = int(q.sum()) + q.numel()
    bits = torch.ones(unary_bits, dtype=torch.bool)
    bits[torch.cumsum(q + 1, 0) - 1] = False  # each symbol's terminating zero
    rem = _pack_fixed(gaps & ((1 << k) - 1), k)
    return {"unary": pack_bits(bits), "rem": rem}, unary_bits


def _encode_with_k(mask: torch.Tensor, k: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``encode_positions`` with a given k (for tests and brute-force comparison)."""
    if not (isinstance(k, int) and 0 <= k <= MAX_K):
        raise LcsError(f"the Rice parameter k must be an integer in [0, {MAX_K}], got {k!r}")
    pos, complement, _ = _coded_positions(mask)
    tensors, unary_bits = _encode_gaps(_gaps(pos), k)
    return tensors, {"k": k, "count": pos.numel(), "complement": complement, "unary_bits": unary_bits}


def encode_positions(mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Golomb-Rice code of a bool mask's True positions (flattened in C order), k chosen for size.

    Returns ``({"unary": uint8, "rem": uint8}, {"k", "count", "complement", "unary_bits"})``: the
    info is plain ints (JSON metadata) and, with numel, all that ``decode_positions`` needs.
    """
    pos, complement, _ = _coded_positions(mask)
    gaps = _gaps(pos)
    k = _best_k(gaps)
    tensors, unary_bits = _encode_gaps(gaps, k)
    return tensors, {"k": k, "count": pos.numel(), "complement": complement, "unary_bits": unary_bits}


def position_bits(mask: torch.Tensor) -> int:
    """Bits the two streams of ``encode_positions(mask)`` occupy (8 × their bytes, padding included),
    computed without building them: compare with a bitmap's 8·⌈n/8⌉ to pick the cheaper encoding."""
    pos, _, _ = _coded_positions(mask)
    gaps = _gaps(pos)
    k = _best_k(gaps)
    return 8 * (-(-_unary_bits(gaps, k) // 8) + -(-(gaps.numel() * k) // 8))


def decode_positions(tensors: dict[str, torch.Tensor], info: dict[str, int], numel: int) -> torch.Tensor:
    """The flat bool mask of length ``numel`` that ``encode_positions`` coded; refuses inconsistent streams.

    Checks every length against the info (bytes of both streams, zeros in the unary stream, zero
    padding, the stream ending in a zero) and that positions stay below numel, so damage to the
    unary stream or the info raises ``DamagedFileError`` instead of yielding a wrong mask.
    """
    if not isinstance(numel, int) or numel < 0:
        raise LcsError(f"numel must be a non-negative integer, got {numel!r}")
    try:
        k, count, complement, unary_bits = (info[key] for key in ("k", "count", "complement", "unary_bits"))
        unary, rem = tensors["unary"], tensors["rem"]
    except (KeyError, TypeError) as err:
        raise DamagedFileError(f"position code lacks {err}") from None
    if not all(isinstance(v, int) for v in (k, count, complement, unary_bits)):
        raise DamagedFileError(f"position code info must be integers, got {info!r}")
    # Σ q_i ≤ Σ g_i ≤ numel − count, so a valid unary stream has count ≤ unary_bits ≤ numel bits.
    if not (0 <= k <= MAX_K and complement in (0, 1) and 0 <= count <= unary_bits <= numel):
        raise DamagedFileError(f"position code info {info!r} is impossible for {numel} entries")
    for name, t, nbits in (("unary", unary, unary_bits), ("rem", rem, count * k)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise DamagedFileError(f"position stream {name!r} must be a 1-D uint8 tensor")
        if t.numel() != -(-nbits // 8):
            raise DamagedFileError(f"position stream {name!r} has {t.numel()} bytes, expected {-(-nbits // 8)}")
    unary, rem = unary.cpu(), rem.cpu()

    bits = unpack_bits(unary, unary.numel() * 8)
    if bits[unary_bits:].any():
        raise DamagedFileError("position stream 'unary' has nonzero padding bits")
    zeros = (~bits[:unary_bits]).nonzero().squeeze(1)
    if zeros.numel() != count or (unary_bits and bool(bits[unary_bits - 1])):
        raise DamagedFileError(f"position stream 'unary' holds {zeros.numel()} symbols, expected {count}")
    q = torch.diff(zeros, prepend=zeros.new_full((1,), -1)) - 1
    gaps = (q << k) | _unpack_fixed(rem, k, count)
    pos = torch.cumsum(gaps + 1, 0) - 1  # strictly increasing: every gap + 1 ≥ 1
    if count and int(pos[-1]) >= numel:
        raise DamagedFileError(f"position code reaches entry {int(pos[-1])} of a tensor of {numel}")
    out = torch.zeros(numel, dtype=torch.bool)
    out[pos] = True
    return ~out if complement else out


def entropy_bits(n: int, nnz: int) -> float:
    """n·H(nnz/n), H the binary entropy in bits: what coding the positions of nnz of n entries costs
    at best (per entry, for iid masks), against which any position code is judged."""
    if not (0 <= nnz <= n):
        raise LcsError(f"need 0 ≤ nnz ≤ n, got nnz={nnz}, n={n}")
    if nnz in (0, n):
        return 0.0
    return -(nnz * math.log2(nnz / n) + (n - nnz) * math.log2((n - nnz) / n))


def information_limit_bits(n: int, nnz: int, value_bits: float) -> float:
    """Bits of a sparse tensor at the limit: nnz values of ``value_bits`` each plus their positions' entropy."""
    return nnz * value_bits + entropy_bits(n, nnz)
