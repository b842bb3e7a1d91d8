"""The statistics rows. The final BatchNorm pass: each row becomes the plain average of its batches'
statistics with the final weights (against a slow reference), every reachable row gets its batches,
and the trainer runs it once, checkpoints it and does not redo it on resume. In training
(``RowWarmStart``): a row's first batches replace its seed, later ones join at the rate of one
shared set, and the counts resume exactly."""

import json

import pytest
import torch
from torch import nn

import lcs
from lcs.train.bn_pass import RowWarmStart, batchnorms, estimate_bn_stats
from lcs.train.checkpoint import latest_checkpoint
from lcs.train.config import load_config
from lcs.train.loop import Trainer
from lcs.train.methods import FixedSampler, Method, UniformSampler

pytestmark = pytest.mark.filterwarnings("ignore:only .* compress")


def _subspace() -> lcs.Subspace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))
    return lcs.convert(model, lcs.UnstructuredConfig(d_min=0.05, bn_stats_bins=4))


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=gen) * (1 + i) + i for i in range(n)]


def _bn_inputs(sub: lcs.Subspace, batches: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Each BN's input per batch at the subspace's current point, the model fixed (no update between)."""
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, k=k: inputs.setdefault(k, []).append(i[0].detach()))
             for k, bn in enumerate(batchnorms(sub.model))]
    saved = {k: (bn.lcs_running_mean.clone(), bn.lcs_running_var.clone()) for k, bn in enumerate(batchnorms(sub.model))}
    with torch.no_grad():
        for x in batches:
            sub.model(x)
    for h in hooks:
        h.remove()
    for k, bn in enumerate(batchnorms(sub.model)):  # the reference pass leaves the rows as they were
        bn.lcs_running_mean.copy_(saved[k][0])
        bn.lcs_running_var.copy_(saved[k][1])
    return inputs



def _assert_row_is_plain_average(bn: nn.Module, row: int, inputs: list[torch.Tensor]) -> None:
    """Row ``row`` of ``bn`` holds the plain average of these inputs' batch mean and unbiased variance."""
    mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(bn.lcs_running_mean[row], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.lcs_running_var[row], var, rtol=1e-5, atol=1e-5)

def test_a_row_becomes_the_average_of_its_batches_statistics():
    sub = _subspace()
    alpha = 0.3
    method = Method("fixed", "line", FixedSampler(alpha))
    batches = _batches(3)
    bns = batchnorms(sub.model)
    sub.set_alpha(alpha)
    sub.model.train()
    inputs = _bn_inputs(sub, batches)  # the reference: each BN's input at α, the model as it is
    counts = estimate_bn_stats(sub, method, batches, step=0, batches_per_row=3)
    row = sub.config.stats_row(alpha, sub.config.levels(alpha))
    assert counts[row] == 3 and sum(counts) == 3
    for k, bn in enumerate(bns):
        _assert_row_is_plain_average(bn, row, inputs[k])
        assert bn.momentum == 0.1  # restored


def test_every_reachable_row_gets_its_batches_and_the_others_are_kept():
    sub = _subspace()
    before = {k: bn.lcs_running_mean.clone() for k, bn in enumerate(batchnorms(sub.model))}
    lo, hi = sub.alpha_range
    counts = estimate_bn_stats(sub, Method("u", "line", UniformSampler(lo, hi, log=True)), _batches(4), step=0,
                               batches_per_row=2)
    rows = sub.config.stats_rows
    assert len(counts) == rows
    reached = [r for r in range(rows) if counts[r]]
    assert all(counts[r] == 2 for r in reached) and len(reached) >= rows - 2  # the endpoint rows need endpoint draws
    for k, bn in enumerate(batchnorms(sub.model)):
        for r in range(rows):
            changed = not torch.equal(bn.lcs_running_mean[r], before[k][r])
            assert changed == (counts[r] > 0)
    assert sub.alpha == hi and sub.model.training  # state restored


FAST = ["model.norm=bn", "method.bn_stats_bins=4", "data.batch_size=64", "optim.epochs=1",
        "optim.warmup_epochs=0.5", "method.warmup=0.3", "run.progress=false", "method.bn_final_batches=2"]


def test_the_trainer_runs_the_pass_once_checkpoints_it_and_resume_keeps_it(tmp_path, tiny_digits, capsys):
    out = tmp_path / "run"
    trainer = Trainer(load_config(None, FAST), out, data=tiny_digits)
    records = trainer.fit()
    last = records[-1]
    assert last["bn_final_batches"] == 2 and last["bn_rows_estimated"] >= 4
    assert {"val_acc_hi_running_stats", "val_acc_lo_running_stats"} <= set(last)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["bn_final_batches"] == 2 and len(lines) == 2
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert latest.endswith("_bn")
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # resuming the finished run: the pass is in the checkpoint, nothing runs again
    again = Trainer(load_config(None, FAST), out, data=tiny_digits, resume=True)
    assert again.bn_final_done == 2 and again.fit() == []
    assert "nothing to train" in capsys.readouterr().out
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    # asking for another pass on the finished run runs only that
    more = Trainer(load_config(None, FAST[:-1] + ["method.bn_final_batches=3"]), out, data=tiny_digits, resume=True)
    assert "only the final BatchNorm pass is left" in capsys.readouterr().out
    assert [r["bn_final_batches"] for r in more.fit()] == [3]


def test_bad_value_is_a_clear_error():
    with pytest.raises(lcs.LcsError, match="method.bn_final_batches"):
        load_config(None, ["method.bn_final_batches=-1"])


def test_structured_switchable_batchnorm_rows_train_and_get_the_final_pass(tmp_path, tiny_digits):
    """Structured LCS+P with one statistics row per width bin and one per end: the sandwich's draws
    reach every row, and each width's network carries its own row."""
    cfg = load_config(None, ["method.regime=structured", "method.name=lcs_p", "model.norm=bn",
                             "method.bn_stats_bins=2", "method.bn_final_batches=1", "data.batch_size=64",
                             "optim.epochs=1", "run.progress=false"])
    trainer = Trainer(cfg, tmp_path / "s", data=tiny_digits)
    assert trainer.sub.config.stats_rows == 4
    last = trainer.fit()[-1]
    assert last["bn_rows_estimated"] == 4
    bn = next(m for m in trainer.model.modules() if hasattr(m, "lcs_running_mean"))
    rows = bn.lcs_running_mean
    assert all(not torch.equal(rows[i], rows[j]) for i in range(4) for j in range(i))
    narrow, wide = (lcs.materialize(trainer.sub, a, input_shape=(3, 16, 16)) for a in (0.0, 1.0))
    first = next(m for m in narrow.modules() if isinstance(m, nn.BatchNorm2d))
    k = first.num_features
    assert torch.equal(first.running_mean, rows[trainer.sub.config.stats_row(0.0, {"width": 0.25})][:k])
    assert next(m for m in wide.modules() if isinstance(m, nn.BatchNorm2d)).num_features > k


def test_us_keeps_one_shared_set_of_statistics():
    cfg = load_config(None, ["method.regime=structured", "method.name=us", "method.bn_stats_bins=4"])
    assert cfg.regime_config().stats_rows == 0


def test_training_further_after_a_pass_runs_it_again(tmp_path, tiny_digits):
    out = tmp_path / "run"
    Trainer(load_config(None, FAST), out, data=tiny_digits).fit()
    longer = Trainer(load_config(None, FAST[:3] + ["optim.epochs=2"] + FAST[4:]), out, data=tiny_digits, resume=True)
    assert longer.bn_final_done == 2  # from the pass's checkpoint
    records = longer.fit()
    assert [r["epoch"] for r in records] == [2, 2] and records[-1]["bn_final_batches"] == 2


def test_a_finished_run_gets_finer_statistics_rows_without_retraining(tmp_path, tiny_digits, capsys):
    """Resuming with another method.bn_stats_bins and a final pass: only the rows change (their
    number, then the pass), every weight stays; without a pass it is a clear error."""
    out = tmp_path / "run"
    Trainer(load_config(None, FAST), out, data=tiny_digits).fit()
    coarse = {k: v.clone() for k, v in Trainer(load_config(None, FAST), out, data=tiny_digits,
                                                resume=True).model.state_dict().items()}
    finer = FAST + ["method.bn_stats_bins=8"]
    more = Trainer(load_config(None, finer), out, data=tiny_digits, resume=True)
    assert "re-estimates them" in capsys.readouterr().out and more.bn_final_done == 0
    records = more.fit()
    assert [r["bn_final_batches"] for r in records] == [2] and records[0]["bn_rows_estimated"] >= 8
    state = more.model.state_dict()
    for k, v in coarse.items():
        if k.endswith("lcs_running_mean"):
            assert v.shape[0] == 4 + 2 and state[k].shape[0] == 8 + 2  # a line: bins + one row per end
        elif not k.endswith(("lcs_running_var", "num_batches_tracked")):
            assert torch.equal(v, state[k]), k
    again = Trainer(load_config(None, finer), out, data=tiny_digits, resume=True)  # the pass is checkpointed
    assert again.bn_final_done == 2 and again.fit() == []
    with pytest.raises(lcs.LcsError, match="does not match the model"):
        Trainer(load_config(None, FAST[:-1] + ["method.bn_final_batches=0", "method.bn_stats_bins=5"]), out,
                data=tiny_digits, resume=True)


def test_a_rows_first_batches_replace_its_seed_then_momentum_takes_over():
    """Under ``RowWarmStart`` a row's first k ≤ 10 batches give their plain average, whatever the
    row started from; a row that gets every batch then joins at BatchNorm's momentum 0.1, one that
    gets a share p of them at 1 − 0.9^(1/p); other rows are untouched."""
    sub = _subspace()
    bns = batchnorms(sub.model)
    for bn in bns:  # a seed far from anything these batches give
        bn.lcs_running_mean.fill_(100.0)
        bn.lcs_running_var.fill_(1e4)
    alpha = 0.3
    sub.set_alpha(alpha)
    sub.model.train()
    row = sub.config.stats_row(alpha, sub.config.levels(alpha))
    others = {k: bn.lcs_running_mean.clone() for k, bn in enumerate(bns)}
    batches = _batches(3)
    inputs = _bn_inputs(sub, batches)
    warm = RowWarmStart(sub)
    with torch.no_grad():
        for x in batches:
            with warm.updating():
                sub.model(x)
    assert warm.counts[row] == 3 and sum(warm.counts) == 3
    for k, bn in enumerate(bns):
        _assert_row_is_plain_average(bn, row, inputs[k])
        kept = [r for r in range(sub.config.stats_rows) if r != row]
        assert torch.equal(bn.lcs_running_mean[kept], others[k][kept])
        assert bn.momentum == 0.1  # restored after each forward
    # a row seen often: the batch joins with the BN's own momentum
    warm.counts[row] = 20
    x = _batches(4)[3]
    before = [bn.lcs_running_mean[row].clone() for bn in bns]
    new = _bn_inputs(sub, [x])
    with torch.no_grad(), warm.updating():
        sub.model(x)
    for k, bn in enumerate(bns):
        torch.testing.assert_close(bn.lcs_running_mean[row], 0.9 * before[k] + 0.1 * new[k][0].mean((0, 2, 3)),
                                   rtol=1e-5, atol=1e-5)
    # the same row after 59 batches elsewhere: a share 21/81 of all batches, this one included
    other = next(r for r in range(sub.config.stats_rows) if r != row)
    warm.counts = [0] * sub.config.stats_rows
    warm.counts[row], warm.counts[other] = 20, 60
    before = [bn.lcs_running_mean[row].clone() for bn in bns]
    with torch.no_grad(), warm.updating():
        sub.model(x)
    mom = 1 - 0.9 ** (81 / 21)
    for k, bn in enumerate(bns):
        torch.testing.assert_close(bn.lcs_running_mean[row], (1 - mom) * before[k] + mom * new[k][0].mean((0, 2, 3)),
                                   rtol=1e-5, atol=1e-5)


ROWS = ["model.norm=bn", "method.name=lcs_p", "method.bn_stats_bins=4", "method.bn_final_batches=0",
        "data.batch_size=32", "optim.epochs=3", "optim.warmup_epochs=0.5", "method.warmup=0.3",
        "run.progress=false"]


def test_row_counts_are_checkpointed_and_a_resumed_run_updates_its_rows_exactly(tmp_path, tiny_digits):
    full = Trainer(load_config(None, ROWS), tmp_path / "full", data=tiny_digits)
    full.fit()
    assert sum(full.bn_rows.counts) == full.step  # LCS+P: one forward a step
    part = Trainer(load_config(None, ROWS), tmp_path / "part", data=tiny_digits)
    part.fit(stop_after_epoch=1)
    resumed = Trainer(load_config(None, ROWS), tmp_path / "part", data=tiny_digits, resume=True)
    assert resumed.bn_rows.counts == part.bn_rows.counts and sum(part.bn_rows.counts) == part.step
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_checkpoint_without_row_counts_resumes_with_every_row_long_seen(tmp_path, tiny_digits):
    """Runs checkpointed before the counts were kept resume, every row counted as long and equally
    often seen."""
    out = tmp_path / "old"
    Trainer(load_config(None, ROWS), out, data=tiny_digits).fit(stop_after_epoch=1)
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    del state["bn_row_batches"]
    state_file.write_text(json.dumps(state))
    resumed = Trainer(load_config(None, ROWS), out, data=tiny_digits, resume=True)
    assert all(c >= 10 for c in resumed.bn_rows.counts)
    resumed.fit()
