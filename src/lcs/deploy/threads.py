"""How many intra-op threads to run with while other processes compete for the cores.

A runtime with as many OpenMP threads as cores stalls whenever another process takes one of them:
its threads wait for each other at every operator's barrier, and one descheduled thread holds up
all. Measured here (cPreResNet20, 2 cores, a 2-thread matrix-product competitor): at batch 1 the
median rose from 1.5 to 7 ms and the 90th percentile to 314 ms with 2 threads, against 2.2 / 2.8 ms
with 1 thread; at batch 32, 41 / 657 ms with 2 threads against 30 / 32 ms with 1. No choice of α
fixes a 657 ms tail; fewer threads does.

``CpuShare`` reads, from Linux's ``/proc``, how much CPU time other processes took since the last
reading (in cores); ``ThreadGovernor`` turns that into a thread count: the cores the others leave
free, at least one, at most the runtime's own default.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

__all__ = ["CpuShare", "ThreadGovernor"]


class CpuShare:
    """CPU time used by other processes, in cores, averaged since the previous call (Linux).

    ``available`` is False where ``/proc/stat`` cannot be read; ``others()`` then returns None."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.cpus = os.cpu_count() or 1
        self.clock = clock
        self._last = self._read()
        self.available = self._last is not None

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        """(busy jiffies of all CPUs, this process's jiffies, all jiffies)."""
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state is fields[0]
        ours = int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of proc(5))
        idle = values[3] + values[4]  # idle + iowait
        total = sum(values)
        return total - idle, ours, total

    def others(self) -> float | None:
        """Cores' worth of CPU time the other processes took since the last call (None: unknown)."""
        now = self._read()
        if now is None or self._last is None:
            return None
        busy, ours, total = (a - b for a, b in zip(now, self._last, strict=True))
        if total <= 0:
            return None
        self._last = now
        return max(0.0, (busy - ours) / total * self.cpus)


class ThreadGovernor:
    """Sets torch's intra-op threads to the cores other processes leave free, re-read at most
    every ``interval`` seconds (the kernel counts CPU time in 10 ms ticks: much shorter intervals are
    noise), or after ``min_interval`` when forced. ``decide()`` returns the new thread count when it
    changed, else None.

    Args:
        max_threads: the most threads to use (default: torch's count when the governor is made).
        share: where the others' CPU use comes from (tests pass a function returning cores).
        set_threads: how to apply a count (default ``torch.set_num_threads``).
    """

    def __init__(self, max_threads: int | None = None, *, interval: float = 0.2, min_interval: float = 0.03,
                 share: Callable[[], float | None] | None = None, set_threads: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_threads = max_threads or torch.get_num_threads()
        self.threads = self.max_threads
        self.interval = interval
        self._share = share if share is not None else CpuShare().others
        self._set = set_threads or torch.set_num_threads
        self.min_interval = min_interval
        self.clock = clock
        self._read_at = clock()
        self._due = self._read_at + interval
        self.others: float | None = None

    def decide(self, force: bool = False) -> int | None:
        """``force``: read now if at least ``min_interval`` has passed (a request just went over its
        budget: a competitor may have arrived, and waiting out the interval costs more requests)."""
        now = self.clock()
        if now < self._due and not (force and now - self._read_at >= self.min_interval):
            return None
        self._read_at, self._due = now, now + self.interval
        self.others = self._share()
        if self.others is None:
            return None
        cpus = os.cpu_count() or 1
        # free cores, rounded with a little slack: a competitor at 1.3 cores leaves 0.7 free, not 1
        want = max(1, min(self.max_threads, int(cpus - self.others + 0.25)))
        if want == self.threads:
            return None
        self.threads = want
        self._set(want)
        return want

    def restore(self) -> None:
        """Back to ``max_threads`` (when serving stops)."""
        if self.threads != self.max_threads:
            self.threads = self.max_threads
            self._set(self.max_threads)
