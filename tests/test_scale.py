"""ResNet18 and VGG19 train and evaluate from the CLI in every method of every available regime, on a
generated ImageNet-style folder of JPEGs (streamed through DataLoader workers)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lcs.cli import main
from lcs.run import load_run

# 16 listed train files (one unreadable) at batch 8: two steps. Tiny images keep 11–20 M-parameter
# models at about a second per step on 2 CPU cores.
BASE = ["--epochs", "1", "--no-progress", "--set", "data.batch_size=8", "--set", "optim.warmup_epochs=0.5",
        "--set", "run.threads=1"]
COMMON = [*BASE, "--set", "data.pipeline=stream", "--workers", "0"]
METHODS = {"lcs_l": [], "lcs_p": [], "target": ["--set", "method.target=0.2"]}


# Every method on ResNet18 and one on VGG19 in the default run (~20 s); the rest of the matrix with
# `make test-slow` (VGG19's 20 M parameters cost ~5–10 s per train + eval here).
CASES = [("resnet18_cifar", "lcs_l"), ("resnet18_cifar", "lcs_p"), ("resnet18_cifar", "target"),
         ("vgg19_cifar", "lcs_p"), pytest.param("vgg19_cifar", "lcs_l", marks=pytest.mark.slow),
         pytest.param("vgg19_cifar", "target", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model, method", CASES)
def test_train_and_eval_every_method(image_folder, tmp_path, capsys, model, method):
    out = tmp_path / f"{model}-{method}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the folder's broken file is warned about (tested in test_stream)
        assert main(["train", "--regime", "unstructured", "--method", method, "--model", model, "--data", "folder",
                     "--data-root", str(image_folder), "--out", str(out), "--set", "data.image_size=16",
                     *COMMON, *METHODS[method]]) == 0
        record = json.loads((out / "metrics.jsonl").read_text())
        assert record["step"] == 2 and torch.isfinite(torch.tensor(record["train_loss"]))
        grid = "0.2" if method == "target" else "0.05,1.0"
        assert main(["eval", str(out), "--grid", grid]) == 0
    payload = json.loads((out / "eval.json").read_text())
    assert [r["alpha"] for r in payload["records"]] == [float(a) for a in grid.split(",")]
    for r in payload["records"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["sparsity"] == pytest.approx(1 - r["density"], abs=2e-3)
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
        assert main(["eval", str(out), "--grid", "0.1", "--workers", "0"]) == 0
    assert json.loads((out / "eval.json").read_text())["records"][0]["accuracy"] >= 0.0
