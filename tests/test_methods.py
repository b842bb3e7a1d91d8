import math

import pytest
import torch

from lcs.train.loop import lr_at
from lcs.train.methods import BiasedEndpointSampler, DecayFromMax, FixedSampler, HoldMax, UniformSampler


def _draws(sampler, n=4000, seed=0):
    return [a for step in range(n) for a in sampler(step, torch.Generator().manual_seed(seed * 1_000_003 + step))]


def test_biased_endpoint_sampler_distribution():
    s = BiasedEndpointSampler(0.025, 1.0, 0.5)
    draws = torch.tensor(_draws(s))
    n = len(draws)
    lo = (draws == 0.025).float().mean().item()
    hi = (draws == 1.0).float().mean().item()
    # each endpoint has probability 0.25; 4 sigma of a binomial with n=4000 is ~0.027
    assert abs(lo - 0.25) < 0.03 and abs(hi - 0.25) < 0.03
    inner = draws[(draws != 0.025) & (draws != 1.0)]
    assert abs(len(inner) / n - 0.5) < 0.03
    assert inner.min() >= 0.025 and inner.max() <= 1.0
    # uniform on [0.025, 1]: mean 0.5125, variance 0.975^2/12
    assert abs(inner.mean().item() - 0.5125) < 4 * math.sqrt(0.975**2 / 12 / len(inner))


def test_uniform_sampler_distribution_and_determinism():
    s = UniformSampler(0.2, 0.6)
    draws = torch.tensor(_draws(s, 3000))
    assert draws.min() >= 0.2 and draws.max() <= 0.6
    hist = torch.histc(draws, bins=4, min=0.2, max=0.6) / len(draws)
    assert torch.all((hist - 0.25).abs() < 0.04)
    assert _draws(s, 50, seed=1) == _draws(s, 50, seed=1)
    assert _draws(s, 50, seed=1) != _draws(s, 50, seed=2)


def test_fixed_sampler():
    assert set(_draws(FixedSampler(0.1), 20)) == {0.1}


def test_topk_warmup_decay_matches_spec():
    # density = a + (1 - a) * max(0, 1 - t/T_w)
    sched = DecayFromMax(warmup_steps=100, levels_max={"density": 1.0})
    for a in (0.025, 0.3):
        for t in (0, 10, 50, 99, 100, 500):
            assert sched({"density": a}, t)["density"] == pytest.approx(a + (1 - a) * max(0.0, 1 - t / 100))


def test_decay_fades_in_only_the_named_levels():
    sched = DecayFromMax(warmup_steps=10, levels_max={"density": 1.0, "bits": 8}, names=("density",))
    assert sched({"density": 0.1, "bits": 3}, 5) == {"density": pytest.approx(0.55), "bits": 3}


def test_hold_max_then_level():
    sched = HoldMax(warmup_steps=10, levels_max={"density": 1.0})
    assert sched({"density": 0.1}, 9) == {"density": 1.0} and sched({"density": 0.1}, 10) == {"density": 0.1}


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_linear_schedule_falls_in_a_straight_line_to_zero():
    assert lr_at(9, 100, 10, 1.0, "linear") == pytest.approx(1.0)  # the same warm-up
    assert lr_at(10, 100, 10, 1.0, "linear") == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(82, 100, 10, 1.0, "linear") == pytest.approx(0.2)  # cosine: 0.095
    assert lr_at(100, 100, 10, 1.0, "linear") == 0.0
    assert lr_at(82, 100, 10, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))


def test_log_uniform_interior_visits_log_bins_equally():
    """method.alpha_dist=log: interior α are log-uniform on [lo, hi], so each log-spaced BN
    statistics row gets the same share of draws (uniform draws give the lowest bins a few %)."""
    import math

    sampler = BiasedEndpointSampler(0.025, 1.0, p_endpoint=0.0, log=True)
    draws = _draws(sampler, 4000)
    assert all(0.025 <= a <= 1.0 for a in draws)
    bins = [min(7, int(8 * math.log(a / 0.025) / math.log(40))) for a in draws]
    counts = [bins.count(b) for b in range(8)]
    assert max(counts) < 1.2 * min(counts)
    uniform = [min(7, int(8 * math.log(a / 0.025) / math.log(40)))
               for a in _draws(BiasedEndpointSampler(0.025, 1.0, p_endpoint=0.0), 4000)]
    assert uniform.count(0) < 0.02 * len(uniform)
