import json

import pytest
import torch

from lcs.checkpoint import latest_checkpoint
from lcs.config import load_config
from lcs.errors import LcsError
from lcs.ops import num_kept
from lcs.train import Trainer

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
