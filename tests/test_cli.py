"""The CLI end to end on the embedded digits data, and its one-line errors."""

import json

import pytest
import torch

import lcs
from lcs.cli import main
from lcs.run import load_run

FAST = ["--epochs", "1", "--no-progress", "--set", "data.batch_size=128", "--set", "optim.warmup_epochs=0.2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--regime", "unstructured", "--method", "lcs_l", "--data", "digits", "--out", str(out),
                 *FAST]) == 0
    return out


def test_eval_writes_table_json_and_plot(run_dir, capsys):
    assert main(["eval", str(run_dir), "--grid", "0.025,0.1,0.5,1.0"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "bytes" in out
    payload = json.loads((run_dir / "eval.json").read_text())
    recs = payload["records"]
    assert [r["alpha"] for r in recs] == [0.025, 0.1, 0.5, 1.0]
    for r in recs:
        for key, typ in [("alpha", float), ("accuracy", float), ("loss", float), ("sparsity", float),
                         ("nonzero_params", int), ("macs", int), ("bytes", int), ("density", float)]:
            assert isinstance(r[key], typ), key
        assert 0 <= r["accuracy"] <= 1
        assert r["sparsity"] == pytest.approx(1 - r["alpha"], abs=2e-3)
    assert recs[0]["bytes"] < recs[1]["bytes"] < recs[2]["bytes"] < recs[3]["bytes"]
    assert recs[0]["macs"] < recs[-1]["macs"] == recs[-1]["dense_macs"]
    assert (run_dir / "eval.png").stat().st_size > 1000


def test_export_round_trip_equals_subspace(run_dir, tmp_path, capsys):
    path = tmp_path / "net.safetensors"
    assert main(["export", str(run_dir), "--alpha", "0.1", "--out", str(path)]) == 0
    assert "bytes" in capsys.readouterr().out
    plain = lcs.load_compressed(path)
    _, sub, _ = load_run(run_dir)
    x = torch.randn(4, 3, 16, 16)
    with sub.at(0.1), torch.no_grad():
        assert torch.allclose(plain(x), sub.model(x), atol=1e-5)


def test_plot_overlays_runs(run_dir, tmp_path):
    main(["eval", str(run_dir), "--grid", "0.1,1.0", "--json", str(tmp_path / "e.json")])
    assert main(["plot", str(run_dir), str(tmp_path / "e.json"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcs: error:") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err


def test_bad_input_gives_one_line_errors(run_dir, tmp_path, capsys):
    _one_line_error(capsys, ["export", str(run_dir), "--alpha", "1.5", "--out", str(tmp_path / "x")], "alpha=1.5")
    _one_line_error(capsys, ["export", str(run_dir), "--alpha", "-0.2", "--out", str(tmp_path / "x")], "outside")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "a"), "--set", "optim.nope=1"], "unknown config key")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "b"), "--data", "folder", "--data-root",
                             str(tmp_path / "missing")], "missing")
    _one_line_error(capsys, ["train", "--out", str(run_dir), *FAST], "--resume")
    _one_line_error(capsys, ["eval", str(tmp_path / "nowhere")], "not found")
    _one_line_error(capsys, ["eval", str(run_dir), "--grid", "0.1,abc"], "--grid")


def test_corrupted_checkpoint_one_line(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    ckpt = next((copy / "checkpoints").glob("step_*"))
    (ckpt / "weights.safetensors").write_bytes(b"not a safetensors file")
    _one_line_error(capsys, ["eval", str(copy)], "corrupted")
    _one_line_error(capsys, ["train", "--out", str(copy), "--resume", *FAST], "corrupted")
