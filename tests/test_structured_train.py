"""Structured methods train through the one loop, and the CLI evaluates and exports them."""

import json

import pytest
import torch

import lcs
from lcs.cli import main
from lcs.errors import LcsError
from lcs.eval.prune import prunable_norms, prune_by_norm_scale
from lcs.train.config import load_config
from lcs.train.loop import Trainer
from lcs.train.run import load_run

FAST = ["method.regime=structured", "data.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0.5",
        "run.progress=false"]


@pytest.mark.parametrize("method, norm, n_alphas", [("lcs_l", "ln", 4), ("lcs_p", "ln", 4), ("us", "bn", 4),
                                                    ("ns", "bn", 4), ("lec", "bn", 1)])
def test_each_structured_method_trains(tmp_path, tiny_digits, method, norm, n_alphas):
    cfg = load_config(None, FAST + [f"method.name={method}"])
    assert cfg.model.norm == norm
    trainer = Trainer(cfg, tmp_path / method, data=tiny_digits)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x = lcs.data.normalize(tiny_digits.train.images[:16], tiny_digits.mean, tiny_digits.std)
    r = trainer.train_step(x, tiny_digits.train.labels[:16], step=0)
    assert len(r["alphas"]) == n_alphas and torch.isfinite(torch.tensor(r["loss"]))
    if method in ("lcs_l", "lcs_p", "us"):
        assert r["alphas"][:2] == [1.0, 0.0] and r["levels"][:2] == [1.0, 0.25]  # sandwich: both ends
    if method == "ns":
        assert r["levels"] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    if method == "lcs_l":
        assert 0.0 <= r["cos2"] <= 1.0
    if method == "lec":
        assert r["levels"] == [1.0] and r["l1"] > 0
    records = trainer.fit()
    assert records[-1]["train_loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_structured_config_errors():
    with pytest.raises(LcsError, match="per-channel"):
        load_config(None, FAST + ["model.norm=gn"])
    with pytest.raises(LcsError, match="outside"):
        load_config(None, FAST + ["method.name=ns", "method.ns_widths=1.0,0.1"])
    with pytest.raises(LcsError, match="w_min"):
        load_config(None, FAST + ["method.w_min=0"])
    assert load_config(None, FAST + ["method.name=ns", "method.ns_widths=1,0.5"]).method.ns_widths == (1.0, 0.5)


def test_lec_pruning_is_physical_and_exact_at_full_keep():
    model = lcs.models.create("cpreresnet20", norm="bn").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight))
    found = prunable_norms(model)
    assert {p.norm for p in found} == {f"blocks.{i}.norm{j}" for i in range(6) for j in (2, 3)}
    x = torch.randn(2, 3, 16, 16)
    full, kept = prune_by_norm_scale(model, 1.0)
    with torch.no_grad():
        assert torch.allclose(full(x), model(x), atol=1e-5)
    half, kept = prune_by_norm_scale(model, 0.5)
    total = sum(m.num_features for n, m in model.named_modules() if n in kept)
    assert abs(sum(kept.values()) - 0.5 * total) <= len(kept)  # ties aside, half the prunable channels
    assert half.blocks[0].conv1.out_channels == kept["blocks.0.norm2"] == half.blocks[0].conv2.in_channels
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in model.parameters())
    # the pruned network equals the full one with the pruned channels' norm outputs zeroed
    masked = prune_by_norm_scale(model, 1.0)[0]
    thresholds = {}
    for name in kept:
        w = dict(model.named_modules())[name].weight.abs()
        thresholds[name] = torch.topk(w, kept[name]).values.min()
    with torch.no_grad():
        for name, m in masked.named_modules():
            if name in kept:
                drop = m.weight.abs() < thresholds[name]
                m.weight[drop] = 0
                m.bias[drop] = 0
        assert torch.allclose(half(x), masked(x), atol=1e-5)


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory, train_digits_run):
    return train_digits_run(tmp_path_factory.mktemp("runs") / "s", "structured", "lcs_l", "--val-fraction", "0.5")


def test_cli_eval_reports_widths_params_and_latency(structured_run, capsys):
    assert main(["eval", str(structured_run), "--latency-batch", "1"]) == 0
    assert "width" in capsys.readouterr().out
    recs = json.loads((structured_run / "eval.json").read_text())["records"]
    assert [r["width"] for r in recs] == pytest.approx([0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    assert all(a["params"] < b["params"] and a["macs"] < b["macs"] and a["bytes"] < b["bytes"]
               for a, b in zip(recs, recs[1:], strict=False))
    assert all(r["latency_ms_b1"] > 0 for r in recs)
    assert "bn_mean_gap" not in recs[0]  # no BatchNorm in an LCS run


def test_cli_export_is_slim_and_equal(structured_run, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    assert main(["export", str(structured_run), "--alpha", "0", "--out", str(path)]) == 0
    plain = lcs.load_compressed(path)
    _, sub, _ = load_run(structured_run)
    x = torch.randn(3, 3, 16, 16)
    with sub.at(0.0), torch.no_grad():
        assert torch.allclose(plain(x), sub.model(x), atol=1e-5)
    assert plain.blocks[0].conv1.weight.shape[:2] == (4, 4)


def test_cli_us_and_lec_report_batchnorm_gaps(tmp_path, capsys, train_digits_run):
    for method in ("us", "lec"):
        out = train_digits_run(tmp_path / method, "structured", method, "--val-fraction", "0.5")
        args = ["eval", str(out), "--latency-batch", ""]
        assert main(args + (["--keep", "0.5,1.0"] if method == "lec" else ["--grid", "0,1"])) == 0
        text = capsys.readouterr().out
        assert "BatchNorm running statistics" in text
        recs = json.loads((out / "eval.json").read_text())["records"]
        assert all(r["bn_mean_gap"] >= 0 and r["bn_gaps"] for r in recs)
        assert (out / "eval_bn_stats.png").is_file()
        if method == "lec":
            assert [r["keep"] for r in recs] == [0.5, 1.0]
            assert recs[0]["params"] < recs[1]["params"] and recs[0]["param_reduction"] > 0
