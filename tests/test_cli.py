"""The CLI end to end on the embedded digits data, and its one-line errors."""

import json

import pytest
import torch

import lcs
from lcs.cli import main
from lcs.train.run import load_run

FAST = ["--epochs", "1", "--no-progress", "--set", "data.batch_size=128", "--set", "optim.warmup_epochs=0.2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_digits_run):
    return train_digits_run(tmp_path_factory.mktemp("runs") / "r", "unstructured", "lcs_l")


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
    assert main(["eval", str(run_dir), "--grid", "0.1,1.0", "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["provenance"]["val_images"] > 0
    assert main(["plot", str(run_dir), str(tmp_path / "e.json"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_plot_epochs_draws_each_runs_training_curve(run_dir, tmp_path, capsys):
    from lcs.eval.report import epoch_curves

    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = epoch_curves(records)
    epochs = [r["epoch"] for r in records if "train_loss" in r]
    assert [e for e, _ in curves["hi"]] == epochs and [e for e, _ in curves["lo"]] == epochs
    assert [a for _, a in curves["hi"]] == [r["val_acc_hi"] for r in records if "train_loss" in r]
    bn = epoch_curves([*records, {"epoch": epochs[-1], "bn_final_batches": 4, "val_acc_hi": 0.5, "val_acc_lo": 0.25}])
    assert bn["hi_bn"] == [(epochs[-1], 0.5)] and bn["lo_bn"] == [(epochs[-1], 0.25)]
    out = tmp_path / "epochs.png"
    assert main(["plot", "--epochs", str(run_dir), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["plot", "--epochs", str(run_dir), f"{run_dir}@3", "--out", str(out)]) == 0  # shifted by 3
    _one_line_error(capsys, ["plot", "--epochs", str(tmp_path), "--out", str(out)], "metrics.jsonl")
    _one_line_error(capsys, ["plot", "--epochs", f"{run_dir}@x", "--out", str(out)], "RUN@EPOCHS")


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


def test_subspace_export_profile_and_adapt(run_dir, tmp_path, capsys):
    sub_path = tmp_path / "sub.safetensors"
    assert main(["export", str(run_dir), "--subspace", "--out", str(sub_path)]) == 0
    prof = tmp_path / "prof" / "p.json"
    prof.parent.mkdir()
    assert main(["profile", str(sub_path), "--grid", "0.1,1.0", "--batch", "1,4", "--data", "digits",
                 "--per-thread", "--json", str(prof)]) == 0
    out = capsys.readouterr().out
    assert "switch ms" in out and "b1 sparse" in out and "b1 layout" in out and "CSR kernels" in out
    records = json.loads(prof.read_text())["records"]
    assert [r["alpha"] for r in records] == [0.1, 1.0]
    for r in records:
        for key in ("switch_ms", "cached_switch_ms", "first_batch_ms", "latency_ms_b1", "p90_ms_b1", "latency_ms_b4",
                    "bytes", "macs", "params", "accuracy", "sparse_layers_b1", "dense_bytes", "latency_ms_b1_t1",
                    "latency_ms_b4_t1"):
            assert key in r and r[key] >= 0, key
        assert r["layout_b1"] in ("nchw", "channels_last") and r["layout_b4"] in ("nchw", "channels_last")
        assert r[f"latency_ms_b1_t{torch.get_num_threads()}"] == r["latency_ms_b1"]  # the run's own count
        assert r["p90_ms_b1"] >= r["latency_ms_b1"]
    assert records[0]["bytes"] < records[1]["bytes"]
    assert (prof.parent / "p_latency.png").is_file() and (prof.parent / "p_accuracy.png").is_file()
    adapt_dir = tmp_path / "adapt"
    assert main(["adapt", str(sub_path), "--budget-ms", "500", "--seconds", "1.5", "--load-at", "0.5",
                 "--profile", str(prof), "--out", str(adapt_dir)]) == 0
    result = json.loads((adapt_dir / "adapt.json").read_text())
    assert set(result["summary"]) == {"controller", "fixed"}
    assert result["summary"]["controller"]["requests"] > 0
    assert any(r["loaded"] for r in result["traces"]["controller"])
    assert (adapt_dir / "adapt.png").is_file()


def test_onnx_export_matches_pytorch(run_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from lcs.deploy.onnx import run_onnx

    path = tmp_path / "net.onnx"
    assert main(["export", str(run_dir), "--alpha", "0.05", "--format", "onnx", "--out", str(path)]) == 0
    _, sub, _ = load_run(run_dir)
    x = torch.randn(3, 3, 16, 16)
    with sub.at(0.05), torch.no_grad():
        assert torch.allclose(run_onnx(path, x), sub.model(x), atol=1e-4)


def test_deploy_errors_are_one_line(run_dir, tmp_path, capsys):
    _one_line_error(capsys, ["profile", str(tmp_path / "none.safetensors"), "--json", str(tmp_path / "p.json")],
                    "no such artifact")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"garbage" * 100)
    _one_line_error(capsys, ["adapt", str(junk), "--budget-ms", "5"], "not a readable")
    _one_line_error(capsys, ["export", str(run_dir), "--out", str(tmp_path / "x")], "--alpha")
