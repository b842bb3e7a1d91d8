import pytest
import torch

from lcs.deploy.controller import BudgetController

PROFILE = [{"alpha": 0.025, "latency_ms_b1": 2.0}, {"alpha": 0.5, "latency_ms_b1": 6.0},
           {"alpha": 1.0, "latency_ms_b1": 10.0}]


class FakeRuntime:
    """A request takes profile latency × load on a simulated clock: the policy is tested, not timing."""

    alpha_range = (0.025, 1.0)

    def __init__(self):
        self.alpha = 1.0
        self.switches = 0
        self.load = 1.0
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def set_alpha(self, a):
        self.alpha = a
        self.switches += 1
        return a

    def __call__(self, x):
        ms = {p["alpha"]: p["latency_ms_b1"] for p in PROFILE}[self.alpha] * self.load
        self.now += ms / 1e3
        return x


def _controller(rt, **kwargs):
    return BudgetController(rt, PROFILE, clock=rt.clock, **kwargs)


def _drive(ctl, rt, loads, uniform=True):
    """The real controller (choose, switch, run, observe) under a load trace; the α of each request."""
    alphas = []
    for load in loads:
        rt.load = load
        _, decision = ctl(torch.zeros(1))
        if uniform:
            assert decision.latency_ms == pytest.approx(ctl.profiled_ms(decision.alpha) * load)
        alphas.append(decision.alpha)
    return alphas


def test_picks_largest_alpha_that_fits_and_follows_load():
    rt = FakeRuntime()
    ctl = _controller(rt, budget_ms=8.0)
    assert ctl.choose() == 0.5  # 10 ms > 8, 6 ms fits
    alphas = _drive(ctl, rt, [1.0] * 10 + [3.0] * 15 + [1.0] * 30)
    assert alphas[5] == 0.5
    assert alphas[11] == 0.025  # load arrives at request 10: one request over budget, then the jump
    assert alphas[24] == 0.025  # under 3x load only the efficient end fits (6 ms)
    assert 0.5 in alphas[25:25 + 1 + ctl.dwell + 1]  # load gone: back up within the dwell, not after many steps
    assert alphas[-1] == 0.5
    assert ctl.load_factor == pytest.approx(1.0, abs=0.05)


def test_no_oscillation_at_the_boundary():
    rt = FakeRuntime()
    ctl = _controller(rt, budget_ms=6.3, margin=0.15, dwell=3)
    # measured latencies jitter ±4 % around the profile: 0.5 sits right at the budget's edge
    loads = [1.04 if i % 2 else 0.96 for i in range(60)]
    _drive(ctl, rt, loads)
    assert rt.switches <= 3


def test_infeasible_budget_is_reported():
    rt = FakeRuntime()
    ctl = BudgetController(rt, PROFILE, budget_ms=1.0)
    assert ctl.choose() == 0.025 and ctl.feasible is False


def test_interpolates_between_profile_points():
    ctl = BudgetController(FakeRuntime(), PROFILE, budget_ms=8.0)
    assert ctl.profiled_ms(0.75) == pytest.approx(8.0)
    assert ctl.profiled_ms(0.0) == 2.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget_ms"):
        BudgetController(FakeRuntime(), PROFILE, budget_ms=0)
    with pytest.raises(ValueError, match="latency_ms_b64"):
        BudgetController(FakeRuntime(), PROFILE, budget_ms=5, batch=64)


def test_call_runs_and_reports(tmp_path):
    import lcs
    from lcs.deploy.runtime import Runtime, save_subspace

    sub = lcs.convert(lcs.models.create("cpreresnet20", num_classes=10), lcs.UnstructuredConfig())
    path = tmp_path / "s.safetensors"
    save_subspace(sub, path, {"name": "cpreresnet20", "kwargs": {"num_classes": 10}})
    rt = Runtime.load(path)
    ctl = BudgetController(rt, PROFILE, budget_ms=8.0)
    y, d = ctl(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 10) and d.alpha == 0.5 == rt.alpha and d.latency_ms > 0


def test_accepts_profile_json_path_and_dict(tmp_path):
    import json

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"records": PROFILE}))
    for profile in (str(path), path, {"records": PROFILE}):
        assert BudgetController(FakeRuntime(), profile, budget_ms=8.0).choose() == 0.5


def test_timeline_summarizes_traces():
    from lcs.deploy.adapt import timeline

    result = {"seconds": 2, "traces": {
        "controller": [{"t": 0.1, "alpha": 0.5, "latency_ms": 3.0, "loaded": False},
                       {"t": 1.2, "alpha": 0.1, "latency_ms": 5.0, "loaded": True}],
        "fixed": [{"t": 0.3, "alpha": 1.0, "latency_ms": 4.0, "loaded": False}]}}
    lines = timeline(result).splitlines()
    assert len(lines) == 3 and "yes" in lines[2] and "0.100" in lines[2] and "5.00" in lines[2]


def test_jittery_load_is_predicted_by_its_tail_not_its_mean():
    """Under a jittery load (ratios 1.0-1.3, mean 1.15) α = 0.5 fits on average (6.9 ms < 7.5 ms) but
    is over budget for a sixth of its requests; the 90th-percentile prediction keeps it out (no
    up-margin here, so that the prediction alone decides)."""
    import random

    rng = random.Random(0)
    loads = [1.0 + 0.3 * rng.random() for _ in range(300)]

    def over_budget(quantile):
        rt = FakeRuntime()
        ctl = _controller(rt, budget_ms=7.5, quantile=quantile, margin=0.0)
        alphas = _drive(ctl, rt, loads)
        lat = [ctl.profiled_ms(a) * load for a, load in zip(alphas, loads, strict=True)]
        return sum(m > 7.5 for m in lat[20:]) / len(lat[20:])

    assert over_budget(0.5) > 0.10
    assert over_budget(0.9) < 0.05


class UnevenLoadRuntime(FakeRuntime):
    """A load that slows α = 0.5 twice as much as the efficient end (as a CPU competitor may)."""

    def __call__(self, x):
        extra = 2.0 if self.alpha == 0.5 and self.load > 1.0 else 1.0
        ms = {p["alpha"]: p["latency_ms_b1"] for p in PROFILE}[self.alpha] * self.load * extra
        self.now += ms / 1e3
        return x


def test_failed_moves_up_back_off_and_load_going_away_resets():
    """Under a 1.2x load α = 0.5 looks like it fits from the efficient end (6 × 1.2 = 7.2 ms ≤ 8) but
    takes 14.4 ms: each move up is over budget. Backing off keeps those failures logarithmic in the
    number of requests instead of one per dwell; when the load goes, α = 0.5 comes back at once."""
    def run(max_dwell):
        rt = UnevenLoadRuntime()
        ctl = _controller(rt, budget_ms=8.0, margin=0.0, dwell=3, max_dwell=max_dwell)
        loads = [1.2] * 300 + [1.0] * 20
        alphas = _drive(ctl, rt, loads, uniform=False)
        over = sum(a == 0.5 for a in alphas[:300])  # every request at 0.5 under the load is over budget
        return over, alphas, ctl

    over_backoff, alphas, ctl = run(max_dwell=64)
    over_fixed, _, _ = run(max_dwell=3)  # max_dwell = dwell: no back-off
    assert over_fixed >= 60  # about one failure per dwell + 1 requests
    assert over_backoff <= 10 and ctl.failed_moves == over_backoff - 1  # the first request starts at 0.5
    assert 0.5 in alphas[300:300 + 2 * ctl.dwell + 2]  # load gone: back up within a couple of dwells


class ColdSwitchRuntime(FakeRuntime):
    """The first request after a switch takes twice its time (weights cold in the CPU caches)."""

    def __init__(self):
        super().__init__()
        self._cold = False

    def set_alpha(self, a):
        self._cold = True
        return super().set_alpha(a)

    def __call__(self, x):
        ms = {p["alpha"]: p["latency_ms_b1"] for p in PROFILE}[self.alpha] * self.load * (2.0 if self._cold else 1.0)
        self._cold = False
        self.now += ms / 1e3
        return x


def test_a_switch_penalty_is_learned_and_not_taken_for_load():
    """Load phases of 1.0 and 1.6 move the controller between α = 0.5 (6 ms; its cold first request
    12 ms, over the 8 ms budget) and 0.025. Learning that a first request costs 2× the next one, it
    reads a cold first request as the switch's cost, not as load arriving, and tries the move that
    costs it once per max_dwell requests. Blind to it (max_penalty=1), each cold first request looks
    like load, the controller flees to α = 0.025, and its moves up back off until it stays there:
    as many requests over budget, at a lower α."""
    def run(max_penalty):
        rt = ColdSwitchRuntime()
        ctl = _controller(rt, budget_ms=8.0, margin=0.0, dwell=3, max_dwell=64, max_penalty=max_penalty)
        over, alphas = 0, []
        for load in ([1.0] * 30 + [1.6] * 30) * 8:
            rt.load = load
            _, decision = ctl(torch.zeros(1))
            over += decision.latency_ms > ctl.budget_ms
            alphas.append(decision.alpha)
        return over, sum(alphas) / len(alphas), ctl

    over, mean_alpha, ctl = run(4.0)
    over_blind, mean_alpha_blind, blind = run(1.0)
    assert ctl.switch_penalty == pytest.approx(2.0, abs=0.25)
    assert blind.switch_penalty == 1.0
    assert over <= over_blind <= 12
    assert mean_alpha > mean_alpha_blind + 0.05


def test_a_switch_reports_its_penalized_prediction():
    rt = ColdSwitchRuntime()
    ctl = _controller(rt, budget_ms=30.0, dwell=0)
    ctl.switch_penalty = 2.0
    rt.alpha = 0.5
    _, decision = ctl(torch.zeros(1))  # 10 ms fits: a move up from 0.5 to 1.0
    assert decision.alpha == 1.0 and decision.predicted_ms == pytest.approx(20.0)
    _, decision = ctl(torch.zeros(1))  # staying: no penalty
    assert decision.alpha == 1.0 and decision.predicted_ms == pytest.approx(10.0)
