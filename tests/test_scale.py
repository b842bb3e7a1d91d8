"""ResNet18 and VGG19 train and evaluate from the CLI in every method of every available regime, on a
generated ImageNet-style folder of JPEGs (streamed through DataLoader workers)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lcs.cli import main
from lcs.train.run import load_run

# 16 listed train files (one unreadable) at batch 8: two steps. Tiny images keep 11–20 M-parameter
# models at about a second per step on 2 CPU cores.
BASE = ["--epochs", "1", "--no-progress", "--set", "data.batch_size=8", "--set", "optim.warmup_epochs=0.5",
        "--set", "run.threads=1"]
COMMON = [*BASE, "--set", "data.pipeline=stream", "--workers", "0"]
# (regime, method) -> (extra train flags, eval α grid)
METHODS = {("unstructured", "lcs_l"): ([], "0.05,1.0"), ("unstructured", "lcs_p"): ([], "0.05,1.0"),
           ("unstructured", "target"): (["--set", "method.target=0.2"], "0.2"),
           ("structured", "lcs_l"): ([], "0,1"), ("structured", "us"): ([], "0,1"),
           ("quantized", "lcs_l"): ([], "0.5,1")}


# Every unstructured method and one method per other regime on ResNet18, one on VGG19 in the default
# run; the rest of the matrix with `make test-slow` (VGG19's 20 M parameters cost ~5–10 s per train +
# eval here).
_SLOW = pytest.mark.slow
CASES = [("resnet18_cifar", "unstructured", "lcs_l"), ("resnet18_cifar", "unstructured", "lcs_p"),
         ("resnet18_cifar", "unstructured", "target"), ("resnet18_cifar", "structured", "lcs_l"),
         ("resnet18_cifar", "quantized", "lcs_l"), ("vgg19_cifar", "unstructured", "lcs_p"),
         pytest.param("resnet18_cifar", "structured", "us", marks=_SLOW),
         pytest.param("vgg19_cifar", "unstructured", "lcs_l", marks=_SLOW),
         pytest.param("vgg19_cifar", "unstructured", "target", marks=_SLOW),
         pytest.param("vgg19_cifar", "structured", "lcs_l", marks=_SLOW),
         pytest.param("vgg19_cifar", "structured", "us", marks=_SLOW),
         pytest.param("vgg19_cifar", "quantized", "lcs_l", marks=_SLOW)]


@pytest.mark.parametrize("model, regime, method", CASES)
def test_train_and_eval_every_method(image_folder, tmp_path, capsys, model, regime, method):
    out = tmp_path / f"{model}-{regime}-{method}"
    extra, grid = METHODS[(regime, method)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the folder's broken file is warned about (tested in test_stream)
        assert main(["train", "--regime", regime, "--method", method, "--model", model, "--data", "folder",
                     "--data-root", str(image_folder), "--out", str(out), "--set", "data.image_size=16",
                     *COMMON, *extra]) == 0
        record = json.loads((out / "metrics.jsonl").read_text())
        assert record["step"] == 2 and torch.isfinite(torch.tensor(record["train_loss"]))
        assert main(["eval", str(out), "--grid", grid, "--latency-batch", ""]) == 0
    payload = json.loads((out / "eval.json").read_text())
    records = payload["records"]
    assert [r["alpha"] for r in records] == [float(a) for a in grid.split(",")]
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0
        if regime == "unstructured":
            assert r["sparsity"] == pytest.approx(1 - r["density"], abs=2e-3)
    if regime == "structured":  # the efficient end is physically smaller
        assert records[0]["params"] < records[-1]["params"] / 4
    if regime == "quantized":
        assert records[0]["bits"] < records[-1]["bits"] and records[0]["bytes"] < records[-1]["bytes"]
    cfg, sub, _ = load_run(out)
    assert cfg.model.name == model and cfg.data.pipeline == "stream" and sub.config.geometry == (
        "line" if method == "lcs_l" else "point")
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_resnet18_imagenet_layout_streams_by_default_with_workers(image_folder, tmp_path):
    """At 64 px the auto pipeline streams (RandomResizedCrop + Resize/CenterCrop), here with 2 workers."""
    out = tmp_path / "r18"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--model", "resnet18", "--data", "folder", "--data-root", str(image_folder),
                     "--out", str(out), "--set", "data.image_size=64", *BASE, "--workers", "2"]) == 0
        cfg, _, _ = load_run(out)
        assert (cfg.data.pipeline, cfg.data.workers, cfg.data.image_size) == ("auto", 2, 64)
        assert main(["eval", str(out), "--grid", "0.1", "--workers", "0", "--latency-batch", ""]) == 0
    assert json.loads((out / "eval.json").read_text())["records"][0]["accuracy"] >= 0.0
