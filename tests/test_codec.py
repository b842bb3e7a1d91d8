"""Position coding (lcs.codec): exact round trips, the chosen Rice parameter and sizes against brute force and
slow Python references, nearness to the entropy, and damage the format promises to detect."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lcs import codec
from lcs.codec import decode_positions, encode_positions, entropy_bits, information_limit_bits, position_bits
from lcs.errors import LcsError
from lcs.files import DamagedFileError

DENSITIES = [0.0, 0.001, 0.025, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0]
SHAPES = [(1,), (7,), (13, 5), (3, 50, 7), (4096,), (2, 3, 333)]  # numels 1, 7, 65, 1050, 4096, 1998


def _mask(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def _ref_streams(mask: torch.Tensor, k: int) -> tuple[bytes, bytes, dict[str, int]]:
    """The format written out with Python lists and ints: coded positions, gaps, bits, bytes."""
    flat = mask.flatten().tolist()
    complement = int(2 * sum(flat) > len(flat))
    pos = [i for i, v in enumerate(flat) if v != bool(complement)]
    unary: list[int] = []
    rem: list[int] = []
    prev = -1
    for p in pos:
        g = p - prev - 1
        prev = p
        unary += [1] * (g >> k) + [0]
        rem += [(g >> (k - 1 - j)) & 1 for j in range(k)]

    def to_bytes(bits: list[int]) -> bytes:
        bits = bits + [0] * (-len(bits) % 8)
        return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))

    info = {"k": k, "count": len(pos), "complement": complement, "unary_bits": len(unary)}
    return to_bytes(unary), to_bytes(rem), info


def _ref_decode(unary: bytes, rem: bytes, info: dict[str, int], numel: int) -> list[bool]:
    """A sequential decoder: read one unary symbol and k remainder bits at a time, MSB first."""
    ubits = [(b >> (7 - j)) & 1 for b in unary for j in range(8)][:info["unary_bits"]]
    rbits = [(b >> (7 - j)) & 1 for b in rem for j in range(8)]
    k, out, ui, ri, prev = info["k"], [bool(info["complement"])] * numel, 0, 0, -1
    for _ in range(info["count"]):
        q = 0
        while ubits[ui]:
            q, ui = q + 1, ui + 1
        ui += 1
        r = 0
        for _ in range(k):
            r, ri = (r << 1) | rbits[ri], ri + 1
        prev += (q << k | r) + 1
        out[prev] = not info["complement"]
    return out


def _streams_equal(tensors: dict[str, torch.Tensor], unary: bytes, rem: bytes) -> bool:
    return bytes(tensors["unary"].tolist()) == unary and bytes(tensors["rem"].tolist()) == rem


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape: tuple[int, ...], density: float) -> None:
    mask = _mask(shape, density, seed=len(shape) * 7 + int(density * 1000))
    tensors, info = encode_positions(mask)
    assert set(tensors) == {"unary", "rem"} and all(t.dtype == torch.uint8 for t in tensors.values())
    assert json.loads(json.dumps(info)) == info and all(type(v) is int for v in info.values())
    assert info["complement"] == int(2 * int(mask.sum()) > mask.numel())
    out = decode_positions(tensors, info, mask.numel())
    assert out.dtype == torch.bool and out.shape == (mask.numel(),)
    assert torch.equal(out.view(shape), mask)


@pytest.mark.parametrize("value", [False, True])
def test_one_element_and_extremes_cost_nothing(value: bool) -> None:
    for mask in (torch.tensor([value]), torch.full((5, 9), value), torch.zeros(0, dtype=torch.bool)):
        tensors, info = encode_positions(mask)
        assert info["count"] == 0 and tensors["unary"].numel() == tensors["rem"].numel() == 0
        assert position_bits(mask) == 0
        assert torch.equal(decode_positions(tensors, info, mask.numel()), mask.flatten())


def test_non_contiguous_mask_is_coded_in_c_order() -> None:
    mask = _mask((40, 30), 0.2, seed=3).t()  # a transposed view: C order of the view, not of the storage
    tensors, info = encode_positions(mask)
    assert torch.equal(decode_positions(tensors, info, mask.numel()), mask.reshape(-1))


@pytest.mark.parametrize("density", [0.001, 0.02, 0.1, 0.3, 0.5, 0.8])
def test_chosen_k_is_the_brute_force_argmin(density: float) -> None:
    """Every k in 0..24 is encoded for real; its size is unary_bits + count·k with the streams' byte counts
    checked against it. The chosen k is the first k of least size, and every k's streams decode exactly."""
    mask = _mask((3000,), density, seed=11)
    sizes = []
    for k in range(codec.MAX_K + 1):
        tensors, info = codec._encode_with_k(mask, k)
        assert tensors["unary"].numel() == math.ceil(info["unary_bits"] / 8)
        assert tensors["rem"].numel() == math.ceil(info["count"] * k / 8)
        assert torch.equal(decode_positions(tensors, info, mask.numel()), mask)
        sizes.append(info["unary_bits"] + info["count"] * k)
    _, info = encode_positions(mask)
    assert info["k"] == sizes.index(min(sizes))


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.2, 0.5, 0.6, 0.97])
def test_position_bits_equals_the_stream_bytes(density: float) -> None:
    """position_bits is 8 × the bytes of both streams (each padded to whole bytes), exactly."""
    mask = _mask((5001,), density, seed=5)
    tensors, info = encode_positions(mask)
    assert position_bits(mask) == 8 * (tensors["unary"].numel() + tensors["rem"].numel())
    assert position_bits(mask) == 8 * (math.ceil(info["unary_bits"] / 8) + math.ceil(info["count"] * info["k"] / 8))


@pytest.mark.parametrize("density", [0.025, 0.05, 0.1, 0.25, 0.5, 0.9])
def test_size_is_near_the_entropy(density: float) -> None:
    """iid Bernoulli masks: geometric gaps, for which Rice codes are near-optimal. The lower bound is loose:
    one realization may code a little under n·H(nnz/n) (e.g. trailing entries are free), never far under."""
    mask = _mask((100_000,), density, seed=1)
    ratio = position_bits(mask) / entropy_bits(mask.numel(), int(mask.sum()))
    assert 0.98 < ratio < 1.10


@pytest.mark.parametrize("k", [0, 1, 3, 17, None])
def test_matches_python_reference_encoder_and_decoder(k: int | None) -> None:
    """Bytes equal a list-based encoder's; the vectorized and the sequential decoder agree (k=1 and 17 take
    the packing path that pack_ints does not cover)."""
    mask = _mask((300,), 0.15, seed=2)
    tensors, info = encode_positions(mask) if k is None else codec._encode_with_k(mask, k)
    unary, rem, ref_info = _ref_streams(mask, info["k"])
    assert info == ref_info and _streams_equal(tensors, unary, rem)
    ref = _ref_decode(bytes(tensors["unary"].tolist()), bytes(tensors["rem"].tolist()), info, mask.numel())
    assert decode_positions(tensors, info, mask.numel()).tolist() == ref == mask.tolist()


@pytest.mark.parametrize("k", [1, 2, 9, 16, 17, 24])
def test_fixed_width_packing_across_chunks(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Small chunks force several; the bytes are pack_bits of the codes' bit planes (the pack_ints layout)."""
    monkeypatch.setattr(codec, "_CHUNK", 16)
    codes = torch.randint(0, 2**k, (101,), generator=torch.Generator().manual_seed(k))
    planes = (codes[:, None] >> torch.arange(k - 1, -1, -1)) & 1
    packed = codec._pack_fixed(codes, k)
    assert torch.equal(packed, codec.pack_bits(planes.bool()))
    assert torch.equal(codec._unpack_fixed(packed, k, codes.numel()), codes)


def test_every_single_bit_flip_in_the_unary_stream_is_refused() -> None:
    """A flip changes the number of zeros (or sets a padding bit), which the info fixes: always detected."""
    mask = _mask((157,), 0.2, seed=5)  # unary_bits not a multiple of 8, so padding bits are flipped too
    tensors, info = encode_positions(mask)
    assert info["unary_bits"] % 8
    for bit in range(8 * tensors["unary"].numel()):
        bad = tensors["unary"].clone()
        bad[bit // 8] ^= 1 << (7 - bit % 8)
        with pytest.raises(DamagedFileError):
            decode_positions({**tensors, "unary": bad}, info, mask.numel())


def test_a_stream_ending_in_an_unterminated_symbol_is_refused() -> None:
    """Two flips keep the count of zeros: a 1 turned 0, then the final 0 turned 1 (a quotient with no end)."""
    mask = torch.tensor([False] * 9 + [True] + [False] * 30 + [True] * 2 + [False] * 6)
    tensors, info = codec._encode_with_k(mask, 0)  # unary 1111111110 1...10 0: 42 bits
    bad = tensors["unary"].clone()
    last = info["unary_bits"] - 1
    bad[0] ^= 0x80
    bad[last // 8] ^= 1 << (7 - last % 8)
    with pytest.raises(DamagedFileError):
        decode_positions({**tensors, "unary": bad}, info, mask.numel())


def test_complement_only_above_half() -> None:
    """Exactly half True codes the True positions; one more codes the False ones."""
    half = torch.tensor([True, False] * 8)
    over = half.clone()
    over[1] = True
    for mask, complement in ((half, 0), (over, 1)):
        tensors, info = encode_positions(mask)
        assert info["complement"] == complement and info["count"] == 8 - complement
        assert torch.equal(decode_positions(tensors, info, mask.numel()), mask)


def test_truncated_or_mismatched_streams_are_refused() -> None:
    mask = _mask((2000,), 0.05, seed=6)
    tensors, info = encode_positions(mask)
    assert info["k"] > 0 and info["count"] > 0
    cases = [({**tensors, "unary": tensors["unary"][:-1]}, info),
             ({**tensors, "unary": torch.cat([tensors["unary"], torch.zeros(1, dtype=torch.uint8)])}, info),
             ({**tensors, "rem": tensors["rem"][:-1]}, info),
             ({"unary": tensors["unary"]}, info),
             (tensors, {**info, "count": info["count"] + 1}),
             (tensors, {**info, "count": info["count"] - 1}),
             (tensors, {**info, "unary_bits": info["unary_bits"] - 1}),
             (tensors, {**info, "unary_bits": info["unary_bits"] + 1}),
             (tensors, {**info, "k": 25}),
             (tensors, {**info, "complement": 2})]
    for t, i in cases:
        with pytest.raises(DamagedFileError):
            decode_positions(t, i, mask.numel())
    last = int(mask.nonzero()[-1])
    with pytest.raises(DamagedFileError):  # the last position falls outside a shorter tensor
        decode_positions(tensors, info, last)
    assert torch.equal(decode_positions(tensors, info, last + 1), mask[:last + 1])


def test_remainder_bit_flips_decode_to_another_mask_or_are_refused() -> None:
    """The remainder stream has no redundancy: a flip shifts positions, so the mask differs (same count),
    unless a position leaves the tensor."""
    mask = _mask((600,), 0.1, seed=8)
    tensors, info = encode_positions(mask)
    for bit in range(info["count"] * info["k"]):
        bad = tensors["rem"].clone()
        bad[bit // 8] ^= 1 << (7 - bit % 8)
        try:
            out = decode_positions({**tensors, "rem": bad}, info, mask.numel())
        except DamagedFileError:
            continue
        assert not torch.equal(out, mask) and int(out.sum()) == int(mask.sum())


def test_bad_input_is_refused() -> None:
    with pytest.raises(LcsError):
        encode_positions(torch.zeros(4))
    with pytest.raises(LcsError):
        codec._encode_with_k(torch.zeros(4, dtype=torch.bool), 25)
    with pytest.raises(LcsError):
        entropy_bits(3, 4)
    tensors, info = encode_positions(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(LcsError):
        decode_positions(tensors, info, -1)


def test_entropy_and_information_limit() -> None:
    """Against closed forms and the counting bound log2 C(n, m) ≤ n·H(m/n) ≤ log2 C(n, m) + log2(n + 1)."""
    assert entropy_bits(0, 0) == entropy_bits(10, 0) == entropy_bits(10, 10) == 0.0
    assert entropy_bits(2, 1) == pytest.approx(2.0)
    assert entropy_bits(4, 1) == pytest.approx(4 * (0.25 * 2 + 0.75 * math.log2(4 / 3)))
    assert entropy_bits(1000, 100) == pytest.approx(entropy_bits(1000, 900))
    for n, m in [(10, 3), (1000, 17), (100_000, 2500)]:
        log_binom = math.log2(math.comb(n, m))
        assert log_binom <= entropy_bits(n, m) <= log_binom + math.log2(n + 1)
    assert information_limit_bits(1000, 100, 8) == pytest.approx(800 + entropy_bits(1000, 100))
    assert information_limit_bits(50, 0, 32) == 0.0
