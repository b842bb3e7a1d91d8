"""The weight average (optim.ema): the math against a slow reference, what ships, exact resume."""

import json

import pytest
import torch
from torch import nn

from lcs.errors import LcsError
from lcs.files import load_tensors
from lcs.train.checkpoint import EMA_FILE, latest_checkpoint
from lcs.train.config import load_config
from lcs.train.ema import WeightEMA, ema_decay_at
from lcs.train.loop import Trainer
from lcs.train.run import load_run

FAST = ["data.batch_size=32", "optim.warmup_epochs=0.5", "run.progress=false", "model.norm=bn"]


def test_average_matches_a_slow_reference_and_copies_integer_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = WeightEMA(net, decay=0.9)
    reference = {k: v.clone().double() for k, v in net.state_dict().items() if v.is_floating_point()}
    for t in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(8, 3))  # moves the BatchNorm statistics and its integer batch counter
        ema.update(net, t)
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in net.state_dict().items():
            if k in reference:
                reference[k] = d * reference[k] + (1 - d) * v.double()
    for k, v in ema.state.items():
        if k in reference:
            assert torch.allclose(v.double(), reference[k], atol=1e-6), k
        else:
            assert torch.equal(v, net.state_dict()[k]), k  # num_batches_tracked: copied
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11) and ema_decay_at(0.5, 1000) == 0.5


def test_applied_restores_the_live_weights_exactly():
    net = nn.Linear(3, 2)
    ema = WeightEMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.add_(1.0)
    live = net.weight.detach().clone()
    with ema.applied(net):
        assert not torch.equal(net.weight, live)
    assert torch.equal(net.weight, live)


def test_the_average_ships_and_the_live_accuracy_is_logged(tmp_path, tiny_digits):
    cfg = load_config(None, FAST + ["optim.epochs=2", "optim.ema=0.9"])
    trainer = Trainer(cfg, tmp_path / "r", data=tiny_digits)
    averaged = []
    step = trainer.train_step  # capture the average just before the model takes it

    def spy(x, y, s):
        out = step(x, y, s)
        if s + 1 == trainer.total_steps:
            averaged.append({k: v.clone() for k, v in trainer.ema.state.items()})
        return out

    trainer.train_step = spy
    records = trainer.fit()
    assert "val_acc_hi_live" not in records[0] and "val_acc_hi_live" in records[1]
    shipped, _ = load_tensors(latest_checkpoint(tmp_path / "r") / "weights.safetensors")
    for k, v in averaged[0].items():
        assert torch.equal(shipped[k], v.contiguous()), k
    assert not (latest_checkpoint(tmp_path / "r") / EMA_FILE).exists()  # shipped: nothing kept apart
    _, sub, _ = load_run(tmp_path / "r")
    for k, v in sub.model.state_dict().items():
        assert torch.equal(v, shipped[k]), k


def test_a_resumed_average_equals_the_uninterrupted_one(tmp_path, tiny_digits):
    opts = FAST + ["optim.epochs=3", "optim.ema=0.8"]
    full = Trainer(load_config(None, opts), tmp_path / "full", data=tiny_digits)
    full.fit()
    part = Trainer(load_config(None, opts), tmp_path / "part", data=tiny_digits)
    part.fit(stop_after_epoch=1)
    assert (latest_checkpoint(tmp_path / "part") / EMA_FILE).is_file()
    # an unfinished run is evaluated on its average, as the trainer validates it
    _, sub, _ = load_run(tmp_path / "part")
    for k, v in sub.model.state_dict().items():
        assert torch.equal(v, part.ema.state[k].contiguous()), k
    resumed = Trainer(load_config(None, opts), tmp_path / "part", data=tiny_digits, resume=True)
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [[json.loads(x)["val_acc_hi"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "part")]
    assert logs[0] == logs[1]


def test_ema_out_of_range_is_a_clear_error():
    with pytest.raises(LcsError, match=r"optim.ema=1.0 is invalid"):
        load_config(None, ["optim.ema=1.0"])
