"""Issue 13's defects, each with the regression test that guards it: damaged files are caught (and
runs fall back to an intact checkpoint), no partial file stays, subspaces saved from Python serve,
slim files load into a user's model, divergence stops cleanly, JSON is strict."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import lcs
from lcs.cli import main
from lcs.deploy.artifact import load_compressed, save_compressed
from lcs.deploy.runtime import Runtime, save_subspace
from lcs.files import DamagedFileError, dumps_json, load_tensors, save_tensors
from lcs.train.checkpoint import list_checkpoints
from lcs.train.config import load_config
from lcs.train.loop import DivergedError, Trainer

FAST = ["data.batch_size=32", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.progress=false"]


def _flip(path, n: int = 400) -> None:
    """Flip ``n`` bytes in the middle of the tensor data, leaving the header intact."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    mid = header + (len(raw) - header) // 2
    for i in range(mid, min(mid + n, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _one_line_error(capsys, argv, needle) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lcs: error:") and needle in err[-1], err
    return err[-1]


@pytest.fixture()
def two_checkpoints(tmp_path, tiny_digits):
    run = tmp_path / "r"
    Trainer(load_config(None, FAST), run, data=tiny_digits).fit()
    assert len(list_checkpoints(run)) == 2
    return run


def test_flipped_bytes_are_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors({"w": torch.randn(1000), "b": torch.arange(10)}, path)
    assert torch.equal(load_tensors(path)[0]["b"], torch.arange(10))
    _flip(path, 40)
    with pytest.raises(DamagedFileError, match="does not match the digest"):
        load_tensors(path)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(two_checkpoints, tiny_digits, capsys):
    newest, older = list_checkpoints(two_checkpoints)
    _flip(newest / "weights.safetensors")
    cfg = load_config(None, FAST)
    resumed = Trainer(cfg, two_checkpoints, data=tiny_digits, resume=True)
    err = capsys.readouterr()
    assert "damaged" in err.err and older.name in err.err
    assert resumed.step == int(older.name.split("_")[1])  # resumed from the intact one
    assert "resuming from step" in err.out


def test_damaged_checkpoints_fail_eval_and_export_with_one_line(two_checkpoints, tmp_path, capsys):
    for ckpt in list_checkpoints(two_checkpoints):
        _flip(ckpt / "weights.safetensors")
    _one_line_error(capsys, ["eval", str(two_checkpoints), "--latency-batch", ""], "damaged")
    _one_line_error(capsys, ["export", str(two_checkpoints), "--alpha", "1", "--out", str(tmp_path / "x")],
                    "damaged")
    assert not (two_checkpoints / "eval.json").exists()


def test_damaged_artifacts_fail_to_load(tmp_path, capsys):
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), lcs.UnstructuredConfig())
    sub.model.eval()
    arch = {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "gn"}}
    sub_file, net_file = tmp_path / "sub.safetensors", tmp_path / "net.safetensors"
    save_subspace(sub, sub_file, arch)
    save_compressed(lcs.materialize(sub, 0.1), net_file, {"arch": arch})
    for f in (sub_file, net_file):
        _flip(f)
    with pytest.raises(DamagedFileError):
        Runtime.load(sub_file)
    with pytest.raises(DamagedFileError):
        load_compressed(net_file)
    _one_line_error(capsys, ["profile", str(sub_file), "--json", str(tmp_path / "p.json")], "damaged")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_partial_files(two_checkpoints, tiny_digits, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exports"
    out.mkdir()
    trainer = Trainer(load_config(None, FAST + ["optim.epochs=3"]), two_checkpoints, resume=True, data=tiny_digits)
    monkeypatch.setattr(os, "fsync", _no_space)
    msg = _one_line_error(capsys, ["export", str(two_checkpoints), "--subspace", "--out", str(out / "s.safetensors")],
                          "No space left")
    assert str(out / "s.safetensors") in msg
    assert os.listdir(out) == []
    with pytest.raises(lcs.LcsError, match="could not write .*step_"):
        trainer.fit()
    assert sorted(p.name for p in (two_checkpoints / "checkpoints").iterdir()) == sorted(
        [p.name for p in list_checkpoints(two_checkpoints)] + ["latest.json"])  # no temporary folder stays


def test_structured_subspace_saved_from_python_serves(tmp_path):
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10, norm="ln"), lcs.StructuredConfig())
    sub.model.eval()
    sub.input_shape = (3, 32, 32)
    path = tmp_path / "s.safetensors"
    save_subspace(sub, path, {"name": "cpreresnet20", "kwargs": {"num_classes": 10, "norm": "ln"}})
    rt = Runtime.load(path)
    rt.set_alpha(0.0)
    x = torch.randn(2, 3, 32, 32)
    with sub.at(0.0), torch.no_grad():
        assert torch.allclose(rt(x), sub.model(x), atol=1e-5)


def test_slim_file_loads_into_a_user_model_without_hints(tmp_path):
    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10, norm="ln"), lcs.StructuredConfig())
    sub.model.eval()
    plain = lcs.materialize(sub, 0.0, input_shape=(3, 32, 32))
    path = tmp_path / "slim.safetensors"
    save_compressed(plain, path)  # no meta at all
    user = lcs.models.create("cpreresnet20", num_classes=10, norm="ln")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_compressed(path, model=user)(x), plain(x), atol=1e-5)
    other = lcs.models.create("cpreresnet20", num_classes=7, norm="ln")
    with pytest.raises(lcs.LcsError, match="size mismatch"):  # the real reason, not just the heading
        load_compressed(path, model=other)


def test_divergence_stops_at_the_step_and_keeps_the_checkpoint(two_checkpoints, tiny_digits):
    newest = list_checkpoints(two_checkpoints)[0]
    before = (newest / "weights.safetensors").read_bytes()
    cfg = load_config(None, FAST + ["optim.epochs=3", "optim.lr=1e12"])
    trainer = Trainer(cfg, two_checkpoints, data=tiny_digits, resume=True)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(DivergedError, match="diverged at step"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad update never happened
    assert any(not torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters(), strict=True))
    assert list_checkpoints(two_checkpoints)[0] == newest
    assert (newest / "weights.safetensors").read_bytes() == before


def test_json_outputs_are_strict():
    text = dumps_json({"loss": float("nan"), "xs": [1.0, float("inf")]})
    assert json.loads(text) == {"loss": None, "xs": [1.0, None]}


def _loaders(tiny_digits, seed: int = 0):
    from torch.utils.data import DataLoader, TensorDataset

    from lcs.data import normalize

    def ds(split):
        return TensorDataset(normalize(split.images, tiny_digits.mean, tiny_digits.std), split.labels)

    train = DataLoader(ds(tiny_digits.train), batch_size=32, shuffle=True, generator=torch.Generator(),
                       drop_last=True)
    val = DataLoader(ds(tiny_digits.val), batch_size=50)
    return lcs.LoaderData(train, val, num_classes=10)


def test_trainer_takes_user_dataloaders_and_resumes_exactly(tmp_path, tiny_digits):
    cfg = load_config(None, FAST + ["optim.epochs=2"])
    full = Trainer(cfg, tmp_path / "full", data=_loaders(tiny_digits))
    records = full.fit()
    assert full.step == 2 * (192 // 32) and len(records) == 2 and 0 <= records[-1]["val_acc_hi"] <= 1
    part = Trainer(load_config(None, FAST + ["optim.epochs=2"]), tmp_path / "part", data=_loaders(tiny_digits))
    part.fit(stop_after_epoch=1)
    resumed = Trainer(load_config(None, FAST + ["optim.epochs=2"]), tmp_path / "part", data=_loaders(tiny_digits),
                      resume=True)
    resumed.fit()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_loader_data_rejects_bad_input(tiny_digits):
    with pytest.raises(lcs.LcsError, match="DataLoader"):
        lcs.LoaderData([1, 2], _loaders(tiny_digits).val_loader, num_classes=10)
    with pytest.raises(lcs.LcsError, match="num_classes"):
        lcs.LoaderData(_loaders(tiny_digits).train_loader, _loaders(tiny_digits).val_loader, num_classes=1)


def test_init_seeds_the_subspace_from_a_trained_model(tmp_path, tiny_digits, capsys):
    from safetensors.torch import save_file

    plain = lcs.models.create("cpreresnet20", num_classes=10, norm="gn", in_channels=3)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01 * torch.randn_like(p))
    user = tmp_path / "user.safetensors"
    save_file(plain.state_dict(), str(user))  # a user's plain state dict, no lcs metadata
    cfg = load_config(None, FAST + [f"model.init={user}"])
    assert cfg.method.line_init == "copy"
    trainer = Trainer(cfg, tmp_path / "r", data=tiny_digits)
    with trainer.sub.at(1.0), torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        assert torch.allclose(trainer.model(x), plain.eval()(x), atol=1e-5)  # the line starts at the model
    with trainer.sub.at(0.025, level=1.0), torch.no_grad():
        assert torch.allclose(trainer.model(x), plain(x), atol=1e-5)  # both endpoints do

    other = lcs.models.create("cpreresnet20", num_classes=7)
    bad = tmp_path / "bad.safetensors"
    save_file(other.state_dict(), str(bad))
    pickle = tmp_path / "model.pt"
    torch.save(plain.state_dict(), pickle)
    for path, needle in ((bad, "does not match"), (pickle, "not a safetensors"), (tmp_path / "nope", "no such")):
        msg = _one_line_error(capsys, ["train", "--out", str(tmp_path / f"x{needle[:3]}"), "--init", str(path),
                                       "--epochs", "1", "--no-progress"], needle)
        assert str(path) in msg or needle == "no such"


def test_outputs_go_into_folders_that_do_not_exist_yet(tmp_path):
    """`lcs profile --json prof/x.json` in a fresh clone: the folder is created, not an error."""
    from lcs.files import write_json

    write_json(tmp_path / "prof" / "deeper" / "x.json", {"a": 1})
    assert json.loads((tmp_path / "prof" / "deeper" / "x.json").read_text()) == {"a": 1}
