import json
import subprocess
import sys
import threading
import time

import pytest
import torch

import lcs
from lcs.deploy.runtime import Runtime, save_subspace

ARCH = {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "gn"}}


def _dense_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in lcs.models.create("cpreresnet20").state_dict().values())


@pytest.fixture(scope="module", params=["line", "point"])
def artifact(request, tmp_path_factory):
    torch.manual_seed(0)
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), lcs.UnstructuredConfig(geometry=request.param))
    sub.model.eval()
    path = tmp_path_factory.mktemp("rt") / f"{request.param}.safetensors"
    size = save_subspace(sub, path, ARCH)
    return request.param, sub, path, size


def test_subspace_artifact_size(artifact):
    geometry, _, path, size = artifact
    assert path.stat().st_size == size
    limit = 2.05 if geometry == "line" else 1.05
    assert size <= limit * _dense_bytes()


def test_runtime_outputs_equal_training_side(artifact):
    _, sub, path, _ = artifact
    rt = Runtime.load(path)
    assert rt.alpha_range == (0.025, 1.0)
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for a in (0.025, 0.1, 0.37, 1.0):
        assert rt.set_alpha(a) == pytest.approx(a)
        assert rt.alpha == a and rt.level == pytest.approx(a)
        with sub.at(a), torch.no_grad():
            ref = sub.model(x)
        y = rt(x)
        assert torch.allclose(y, ref, atol=1e-5)
        outs.append(y)
    assert not torch.allclose(outs[0], outs[-1])  # switching really changes the network
    assert not any(hasattr(m, "parametrizations") for m in rt.network.modules())


def test_switch_cache_reuses_networks_and_evicts_by_size(artifact):
    _, sub, path, _ = artifact
    x = torch.randn(2, 3, 32, 32)
    rt = Runtime.load(path)
    rt.set_alpha(0.1)
    net_01 = rt.network
    rt.set_alpha(0.5)
    assert not rt.last_switch_cached
    rt.set_alpha(0.1)  # a return visit: the same network object, not a re-bake
    assert rt.last_switch_cached and rt.network is net_01
    with sub.at(0.1), torch.no_grad():
        assert torch.allclose(rt(x), sub.model(x), atol=1e-5)
    assert rt.cached_points == 3  # 1.0 (where it starts), 0.1, 0.5
    rt.clear_cache()
    rt.set_alpha(1.0)
    assert not rt.last_switch_cached and rt.cached_points == 1
    # a cache that holds about one network's compressed weights keeps only the latest
    own = sum(p.numel() * 4 for name, p in rt.network.named_parameters() if name.endswith("weight")
              and p.dim() > 1)
    small = Runtime.load(path, cache_mb=1.5 * own / 2**20)
    for a in (0.1, 0.5, 1.0):
        small.set_alpha(a)
    assert small.cached_points == 1
    small.set_alpha(0.1)
    assert not small.last_switch_cached
    # cache_mb=0 bakes on every move
    none = Runtime.load(path, cache_mb=0)
    none.set_alpha(0.1)
    none.set_alpha(0.1)
    assert not none.last_switch_cached and none.cached_points == 0
    with pytest.raises(ValueError, match="cache_mb"):
        Runtime.load(path, cache_mb=-1)


@pytest.mark.parametrize("bad", [1.5, -0.1, 0.0, float("nan")])
def test_runtime_rejects_alpha_outside_range(artifact, bad):
    rt = Runtime.load(artifact[2])
    with pytest.raises(ValueError, match=r"alpha.*\[0.025, 1\]"):
        rt.set_alpha(bad)
    assert rt.alpha == 1.0  # unchanged


def test_switch_never_mixes_two_alphas(artifact):
    """A reader thread checks every output against the two legal networks while the main thread
    switches back and forth; a half-switched network would match neither."""
    _, sub, path, _ = artifact
    rt = Runtime.load(path)
    x = torch.randn(1, 3, 32, 32)
    refs = {}
    for a in (0.05, 1.0):
        with sub.at(a), torch.no_grad():
            refs[a] = sub.model(x)
    errors, done, seen, count = [], threading.Event(), set(), [0]

    def reader():
        while not done.is_set():
            y = rt(x)
            match = [a for a, r in refs.items() if torch.allclose(y, r, atol=1e-5)]
            if len(match) != 1:
                errors.append(y)
            else:
                seen.add(match[0])
            count[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            rt.set_alpha(0.05 if i % 2 == 0 else 1.0)
            if i < 2:  # make sure the reader has run on both networks at least once
                start = count[0]
                deadline = time.monotonic() + 10
                while count[0] < start + 2 and time.monotonic() < deadline:
                    time.sleep(0.001)
    finally:
        done.set()
        t.join()
    assert not errors
    assert seen == {0.05, 1.0}


def test_runtime_imports_no_training_code(tmp_path, artifact):
    # torch and numba (the direct kernel's compiler, which reads its config with yaml) may import some
    # of these themselves (tqdm, yaml): only what lcs adds on top counts.
    code = (
        "import sys, torch, safetensors.torch\n"
        "try:\n    import numba\nexcept ImportError:\n    pass\n"
        "before = set(sys.modules)\n"
        "from lcs.deploy.runtime import Runtime\n"
        f"rt = Runtime.load({str(artifact[2])!r}); rt.set_alpha(0.1); rt(torch.zeros(1, 3, 32, 32))\n"
        "bad = [m for m in ('lcs.train', 'lcs.train.config', 'lcs.data.load', 'lcs.data.folder', 'lcs.data.batches',"
        " 'lcs.train.methods', 'lcs.eval', 'lcs.cli', 'tqdm',"
        " 'matplotlib', 'yaml', 'sklearn', 'PIL') if m in set(sys.modules) - before]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_bad_files(tmp_path, artifact):
    with pytest.raises(lcs.LcsError, match="no such artifact"):
        Runtime.load(tmp_path / "nope.safetensors")
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(artifact[2].read_bytes()[:5000])
    with pytest.raises(lcs.LcsError):
        Runtime.load(trunc)
    single = tmp_path / "single.safetensors"
    lcs.save_compressed(lcs.materialize(artifact[1], 0.5), single, {"arch": ARCH})
    with pytest.raises(lcs.LcsError, match="not a subspace"):
        Runtime.load(single)
