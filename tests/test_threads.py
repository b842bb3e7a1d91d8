"""The thread governor: the cores other processes leave free, from /proc, applied to the controller."""

import pytest
import torch
from test_controller import PROFILE, FakeRuntime

from lcs.deploy.controller import BudgetController
from lcs.deploy.threads import CpuShare, ThreadGovernor


def test_cpu_share_reads_this_machine():
    share = CpuShare()
    if not share.available:
        pytest.skip("no /proc/stat here")
    x = torch.randn(256, 256)
    for _ in range(200):  # our own work is not counted as the others'
        x = torch.tanh(x @ x)
    share._last = share._read()
    for _ in range(200):
        x = torch.tanh(x @ x)
    others = share.others()
    assert others is not None and 0.0 <= others <= share.cpus


def test_governor_follows_the_free_cores_and_restores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    now = [0.0]
    others = [0.0]
    applied = []
    gov = ThreadGovernor(4, interval=0.2, share=lambda: others[0], set_threads=applied.append, clock=lambda: now[0])
    assert gov.decide() is None  # not due yet
    now[0] = 0.3
    assert gov.decide() is None and gov.threads == 4  # nobody else: all four
    others[0], now[0] = 2.9, 0.6  # a competitor takes ~3 cores
    assert gov.decide() == 1 and applied == [1]
    others[0], now[0] = 1.6, 0.9
    assert gov.decide() == 2
    others[0], now[0] = 8.0, 1.2
    assert gov.decide() == 1  # never fewer than one
    others[0], now[0] = 0.1, 1.5
    assert gov.decide() == 4
    gov.threads = 2
    gov.restore()
    assert applied[-1] == 4 and gov.threads == 4


def test_controller_changes_threads_and_restarts_its_load_estimate(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    rt = FakeRuntime()
    others = [0.0]
    applied = []
    gov = ThreadGovernor(2, interval=0.0, share=lambda: others[0], set_threads=applied.append, clock=rt.clock)
    ctl = BudgetController(rt, PROFILE, 8.0, governor=gov, clock=rt.clock)
    rt.load = 1.0
    for _ in range(5):
        _, d = ctl(torch.zeros(1))
    assert d.threads == 2 and applied == []
    others[0], rt.load = 2.0, 1.3  # the competitor arrives; one thread runs 1.3x the profile
    _, d = ctl(torch.zeros(1))
    assert d.threads == 1 and applied == [1]
    assert len(ctl._ratios) == 1 and ctl.load_factor == pytest.approx(1.3)  # learned afresh, not smoothed


def test_a_request_over_budget_makes_the_governor_look_at_once(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    now, reads = [0.0], []

    def share():
        reads.append(now[0])
        return 2.0

    gov = ThreadGovernor(2, interval=10.0, min_interval=0.03, share=share, set_threads=lambda n: None,
                         clock=lambda: now[0])
    now[0] = 0.01
    assert gov.decide(force=True) is None and reads == []  # too soon even when forced
    now[0] = 0.05
    assert gov.decide(force=True) == 1 and reads == [0.05]
    now[0] = 1.0
    assert gov.decide() is None and reads == [0.05]  # the interval is long


class ThreadedRuntime(FakeRuntime):
    """Latency per (α, threads): the efficient end barely slows with one thread, the others nearly
    double."""

    TABLE = {2: {0.025: 2.0, 0.5: 6.0, 1.0: 10.0}, 1: {0.025: 2.2, 0.5: 11.5, 1.0: 19.0}}

    def __init__(self):
        super().__init__()
        self.threads = 2

    def __call__(self, x):
        self.now += self.TABLE[self.threads][self.alpha] / 1e3
        return x


@pytest.mark.parametrize("per_thread", [True, False])
def test_controller_predicts_from_the_profile_of_its_thread_count(monkeypatch, per_thread):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    rt = ThreadedRuntime()
    profile = [{"alpha": a, "latency_ms_b1": ms, **({f"latency_ms_b1_t{t}": ThreadedRuntime.TABLE[t][a]
                                                    for t in (1, 2)} if per_thread else {})}
               for a, ms in ThreadedRuntime.TABLE[2].items()]
    others = [0.0]

    def set_threads(n):
        rt.threads = n

    gov = ThreadGovernor(2, interval=0.0, share=lambda: others[0], set_threads=set_threads, clock=rt.clock)
    ctl = BudgetController(rt, profile, 11.0, governor=gov, clock=rt.clock)
    for _ in range(20):
        ctl(torch.zeros(1))
    assert rt.alpha == 1.0
    others[0] = 1.0  # a competitor takes a core: one thread from now on
    over = sum(ctl(torch.zeros(1))[1].latency_ms > 11.0 for _ in range(300))
    if per_thread:
        assert over == 0 and rt.alpha == 0.025  # 0.5 takes 11.5 ms at one thread: never tried
        assert ctl.points == sorted(ThreadedRuntime.TABLE[1].items())
    else:  # one table scaled by the factor measured at 0.025 (1.1x) predicts 0.5 at 6.6 ms and tries it
        assert 2 <= over <= 30  # backed off, not stuck
