import pytest
import torch
from safetensors.torch import save_file

import lcs
from lcs.codec import pack_bits, unpack_bits
from lcs.deploy.artifact import artifact_bytes, read_metadata


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 1001])
def test_pack_unpack_bits_round_trip(n):
    mask = torch.rand(n) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)


def test_pack_bits_matches_numpy():
    np = pytest.importorskip("numpy")
    mask = torch.rand(77) < 0.5
    assert torch.equal(pack_bits(mask), torch.from_numpy(np.packbits(mask.numpy())))


def _sub():
    torch.manual_seed(0)
    return lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), lcs.UnstructuredConfig())


META = {"arch": {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "gn"}}}


def test_export_round_trip_equals_subspace(tmp_path):
    sub = _sub()
    sub.model.eval()
    x = torch.randn(2, 3, 32, 32)
    for a in (0.05, 0.3, 1.0):
        path = tmp_path / f"m{a}.safetensors"
        lcs.save_compressed(lcs.materialize(sub, a), path, META)
        loaded = lcs.load_compressed(path)
        with sub.at(a), torch.no_grad():
            assert torch.allclose(loaded(x), sub.model(x), atol=1e-5)


def test_bytes_fall_with_alpha_and_90pct_is_under_quarter(tmp_path):
    sub = _sub()
    sizes = {a: artifact_bytes(lcs.materialize(sub, a), META) for a in (0.025, 0.1, 0.5, 1.0)}
    assert sizes[0.025] < sizes[0.1] < sizes[0.5] < sizes[1.0]
    dense = sum(t.numel() * t.element_size() for t in lcs.materialize(sub, 1.0).state_dict().values())
    assert sizes[0.1] < 0.25 * dense
    path = tmp_path / "a.safetensors"
    assert lcs.save_compressed(lcs.materialize(sub, 0.1), path, META) == path.stat().st_size == sizes[0.1]


def test_bad_artifacts_are_clear_errors(tmp_path):
    with pytest.raises(lcs.LcsError, match="no such artifact"):
        lcs.load_compressed(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(lcs.LcsError, match="not a readable"):
        lcs.load_compressed(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(lcs.LcsError, match="not an lcs artifact"):
        read_metadata(foreign)
    good = tmp_path / "good.safetensors"
    lcs.save_compressed(lcs.materialize(_sub(), 0.1), good, META)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(lcs.LcsError):
        lcs.load_compressed(truncated)


def test_sizes_come_within_ten_percent_of_the_information_limit(tmp_path):
    """Issue 16: nonzeros + the entropy of their positions (+ the dense stem, classifier and norms)
    is what a sparse network is worth; the artifact (header and all) stays within 10 % of it."""
    from lcs.deploy.artifact import information_limit_bytes

    sub = _sub()
    for a in (0.025, 0.1, 0.5):
        plain = lcs.materialize(sub, a)
        size = lcs.save_compressed(plain, tmp_path / f"a{a}.safetensors", META)
        assert size <= 1.10 * information_limit_bytes(plain), (a, size, information_limit_bytes(plain))


def test_version_1_artifacts_still_load(tmp_path):
    """A file in the first format (one entry per tensor part, bitmap encoding) loads and computes."""
    import json

    from lcs.codec import pack_bits
    from lcs.files import save_tensors

    sub = _sub()
    plain = lcs.materialize(sub, 0.1)
    tensors, layout = {}, {}
    for name, t in plain.state_dict().items():
        info = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if t.is_floating_point() and t.dim() == 4:
            tensors[f"{name}.bitmap"], tensors[f"{name}.values"] = pack_bits(t != 0), t[t != 0]
            info["encoding"] = "bitmap"
        else:
            tensors[name] = t
            info["encoding"] = "dense"
        layout[name] = info
    path = tmp_path / "v1.safetensors"
    save_tensors(tensors, path, {"lcs": json.dumps({"format": "lcs.compressed", "version": 1, **META,
                                                      "tensors": layout})})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(lcs.load_compressed(path, kernels="dense")(x), plain(x))
    header = json.loads(json.dumps(read_metadata(path)))
    header["version"] = 3
    save_tensors(tensors, path, {"lcs": json.dumps(header)})
    with pytest.raises(lcs.LcsError, match="version 3"):
        lcs.load_compressed(path)
