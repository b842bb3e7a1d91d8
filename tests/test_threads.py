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
