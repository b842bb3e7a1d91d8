import json
import math

import pytest
import torch

from lcs.errors import LcsError
from lcs.ops import num_kept
from lcs.train.checkpoint import latest_checkpoint
from lcs.train.config import load_config
from lcs.train.loop import Trainer

FAST = ["data.batch_size=32", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.progress=false"]


@pytest.mark.parametrize("method, extra", [("lcs_l", []), ("lcs_p", []), ("target", ["method.target=0.1"])])
def test_training_smoke_per_method(tmp_path, tiny_digits, method, extra):
    cfg = load_config(None, FAST + [f"method.name={method}"] + extra)
    trainer = Trainer(cfg, tmp_path / method, data=tiny_digits)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    records = trainer.fit()
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["val_acc_hi"] <= 1.0 and r["train_loss"] > 0 for r in records)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned something
    lines = (tmp_path / method / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["step"] == trainer.step == 12
    assert (tmp_path / method / "config.yaml").is_file()
    assert latest_checkpoint(tmp_path / method).name == "step_00000012"
    # after training the compression is active: exact counts at the efficient end
    trainer.sub.set_alpha(trainer.sub.alpha_range[0])
    for _, w in trainer.sub.compressed_weights():
        assert int((w != 0).sum()) == num_kept(w.numel(), trainer.sub.alpha_range[0])


def test_progress_bar_path(tmp_path, tiny_digits, capsys):
    cfg = load_config(None, FAST + ["optim.epochs=1", "run.progress=true"])
    Trainer(cfg, tmp_path / "bar", data=tiny_digits).fit()
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.out + captured.err and "alpha=" in captured.err


def test_lcs_l_step_reports_cos2_and_samples_alpha(tmp_path, tiny_digits):
    trainer = Trainer(load_config(None, FAST), tmp_path / "r", data=tiny_digits)
    x, y = tiny_digits.train.images[:8], tiny_digits.train.labels[:8]
    from lcs.data import normalize

    r = trainer.train_step(normalize(x, tiny_digits.mean, tiny_digits.std), y, step=3)
    assert "cos2" in r and 0.0 <= r["cos2"] <= 1.0
    lo, hi = trainer.sub.alpha_range
    assert len(r["alphas"]) == 1 and lo <= r["alphas"][0] <= hi
    # warm-up: density = a + (1 - a)(1 - t/T_w)
    a = r["alphas"][0]
    t_w = round(0.8 * trainer.total_steps)
    assert r["levels"][0] == pytest.approx(a + (1 - a) * max(0, 1 - 3 / t_w))


def test_resumed_run_equals_uninterrupted(tmp_path, tiny_digits):
    cfg = load_config(None, FAST + ["optim.epochs=3"])
    full = Trainer(cfg, tmp_path / "full", data=tiny_digits)
    full.fit()
    part = Trainer(load_config(None, FAST + ["optim.epochs=3"]), tmp_path / "part", data=tiny_digits)
    part.fit(stop_after_epoch=1)  # "killed" after epoch 1
    torch.manual_seed(12345)  # a different process state must not matter
    resumed = Trainer(load_config(None, FAST + ["optim.epochs=3"]), tmp_path / "part", data=tiny_digits,
                      resume=True)
    assert resumed.step == 6
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_log = [json.loads(x)["val_acc_hi"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part_log = [json.loads(x)["val_acc_hi"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert full_log == part_log


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, tiny_digits):
    cfg = load_config(None, FAST + ["optim.epochs=1"])
    Trainer(cfg, tmp_path / "r", data=tiny_digits).fit()
    weights = latest_checkpoint(tmp_path / "r") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LcsError, match="corrupted or truncated"):
        Trainer(load_config(None, FAST + ["optim.epochs=1"]), tmp_path / "r", data=tiny_digits, resume=True)


def _conv_output_dtypes(trainer: Trainer) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    first = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def test_bf16_autocast_only_when_asked(tmp_path, tiny_digits):
    from lcs.data import normalize

    x = normalize(tiny_digits.train.images[:8], tiny_digits.mean, tiny_digits.std)
    y = tiny_digits.train.labels[:8]
    plain = Trainer(load_config(None, FAST), tmp_path / "fp32", data=tiny_digits)
    assert plain.amp is False and plain.channels_last is False  # CPU, GroupNorm: both off by default
    seen = _conv_output_dtypes(plain)
    r_plain = plain.train_step(x, y, step=0)
    assert seen == [torch.float32]
    amp = Trainer(load_config(None, FAST + ["run.amp=bf16"]), tmp_path / "bf16", data=tiny_digits)
    seen = _conv_output_dtypes(amp)
    r = amp.train_step(x, y, step=0)
    assert seen == [torch.bfloat16] and math.isfinite(r["loss"])
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())  # master weights stay float32
    # the same initial weights (same seed), the same batch and α: bf16 rounding moves the loss only a little
    assert r["alphas"] == r_plain["alphas"]
    assert abs(r["ce"] - r_plain["ce"]) < 0.02 * max(1.0, r_plain["ce"])


def test_channels_last_by_default_for_batchnorm_on_cpu_and_on_cuda():
    from lcs.train.loop import channels_last_by_default

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert channels_last_by_default(cpu, "bn") and not channels_last_by_default(cpu, "gn")
    assert not channels_last_by_default(cpu, "ln") and channels_last_by_default(cuda, "gn")


def test_a_batchnorm_run_on_cpu_trains_channels_last_unless_switched_off(tmp_path, tiny_digits):
    bn = Trainer(load_config(None, FAST + ["model.norm=bn"]), tmp_path / "bn", data=tiny_digits)
    assert bn.channels_last and next(p for p in bn.model.parameters() if p.dim() == 4).is_contiguous(
        memory_format=torch.channels_last)
    off = Trainer(load_config(None, FAST + ["model.norm=bn", "run.channels_last=false"]), tmp_path / "off",
                  data=tiny_digits)
    assert not off.channels_last


def test_channels_last_on_request_computes_the_same(tmp_path, tiny_digits):
    from lcs.data import normalize

    x = normalize(tiny_digits.train.images[:8], tiny_digits.mean, tiny_digits.std)
    y = tiny_digits.train.labels[:8]
    a = Trainer(load_config(None, FAST), tmp_path / "a", data=tiny_digits)
    b = Trainer(load_config(None, FAST + ["run.channels_last=true"]), tmp_path / "b", data=tiny_digits)
    stem = next(p for p in b.model.parameters() if p.dim() == 4)
    assert stem.is_contiguous(memory_format=torch.channels_last)
    ra, rb = a.train_step(x, y, step=0), b.train_step(x, y, step=0)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.allclose(va, vb, atol=1e-5), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_digits):
    with pytest.raises(LcsError, match="no CUDA device"):
        Trainer(load_config(None, FAST + ["run.device=cuda"]), tmp_path / "r", data=tiny_digits)
    assert Trainer(load_config(None, FAST + ["run.device=auto"]), tmp_path / "auto",
                   data=tiny_digits).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_channels_last_training(tmp_path, tiny_digits):
    cfg = load_config(None, FAST + ["optim.epochs=1", "run.device=cuda", "run.amp=bf16"])
    trainer = Trainer(cfg, tmp_path / "cuda", data=tiny_digits)
    assert trainer.device.type == "cuda" and trainer.channels_last and trainer.amp
    stem = next(p for p in trainer.model.parameters() if p.dim() == 4)
    assert stem.is_cuda and stem.is_contiguous(memory_format=torch.channels_last)
    seen = _conv_output_dtypes(trainer)
    records = trainer.fit()
    # the training forwards ran in bf16; the evaluations after the epoch run in float32
    assert seen[:trainer.step] == [torch.bfloat16] * trainer.step and torch.float32 in seen[trainer.step:]
    assert math.isfinite(records[-1]["train_loss"]) and 0.0 <= records[-1]["val_acc_hi"] <= 1.0


@pytest.mark.parametrize("regime, target", [("unstructured", "0.1"), ("quantized", "4")])
def test_a_target_baseline_is_validated_at_its_target(tmp_path, tiny_digits, regime, target, monkeypatch):
    """Its epoch curve is the trained network's, not that of the range's ends it never trains."""
    import lcs.train.loop as loop

    seen = []
    real = loop.evaluate_accuracy

    def spy(model, data, device):
        seen.append(dict(trainer.sub.state.levels))
        return real(model, data, device)

    monkeypatch.setattr(loop, "evaluate_accuracy", spy)
    cfg = load_config(None, ["data.batch_size=64", "optim.epochs=1", "run.progress=false", "method.name=target",
                             f"method.regime={regime}", f"method.target={target}"])
    trainer = Trainer(cfg, tmp_path / "t", data=tiny_digits)
    record = trainer.fit()[-1]
    level = {"unstructured": "density", "quantized": "bits"}[regime]
    assert [s[level] for s in seen] == [float(target) if regime == "unstructured" else int(target)]  # once
    assert record["val_acc_lo"] == record["val_acc_hi"]
