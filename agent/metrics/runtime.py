"""Process CPU metrics: ``process.cpu.user``, ``process.cpu.system``, ``process.cpu.percent``.

A collector polled by the metrics thread (:mod:`agent.metrics.worker`), no thread
of its own: every ``TALISKER_RUNTIME_METRICS_INTERVAL`` seconds it records the CPU
time the whole process used during the interval (all threads, from
``os.times()``), in milliseconds, and the share of one core it represents.

It starts with the metrics thread: at the process's first metric, and right
after a fork in a child of a process where the agent is active (each gunicorn
worker reports from its start, even before its first request). A child takes its
own baseline, so it never reports its parent's CPU as its own.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

COUNT, GAUGE = 0, 1  # agent.metrics.COUNT, GAUGE (this module does not import it)


class ProcessCPU:
    """Samples ``os.times()``; :meth:`collect` records the interval's use."""

    __slots__ = ("_last", "_last_wall", "due", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = os.times()
        self._last_wall = time.monotonic()
        self.due = self._last_wall + interval

    def collect(self, record: Callable[[tuple[int, str, float, Any]], None]) -> None:
        """Record the CPU used since the last call (``record`` takes a metric record)."""
        now = os.times()
        wall = time.monotonic()
        user_ms = (now.user - self._last.user) * 1000.0
        system_ms = (now.system - self._last.system) * 1000.0
        elapsed_ms = (wall - self._last_wall) * 1000.0
        record((COUNT, "process.cpu.user", user_ms, ()))
        record((COUNT, "process.cpu.system", system_ms, ()))
        if elapsed_ms > 0:
            record((GAUGE, "process.cpu.percent", 100.0 * (user_ms + system_ms) / elapsed_ms, ()))
        self._last, self._last_wall = now, wall
        self.due = wall + self.interval
