"""Process CPU metrics: ``process.cpu.user``, ``process.cpu.system``, ``process.cpu.percent``.

A daemon thread per process reports every ``TALISKER_RUNTIME_METRICS_INTERVAL``
seconds the CPU time the whole process used during the interval (all threads,
from ``os.times()``), in milliseconds, and the share of one core it represents.

It starts with the process's first metric, and right after a fork in a child of
a process where the agent is active (each gunicorn worker reports from its
start, even before its first request). A child takes its own baseline, so it
never reports its parent's CPU as its own.
"""

from __future__ import annotations

import os
import sys
import time

from agent import metrics

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    import threading

_interval = 0.0
_thread: threading.Thread | None = None
_stop: threading.Event | None = None
_pid = 0


def configure(interval: float) -> None:
    """Report every ``interval`` seconds (0 stops reporting)."""
    global _interval
    _interval = interval
    if interval <= 0:
        stop()


def ensure_started() -> None:
    """Start this process's reporter if it is configured and not running."""
    global _thread, _stop, _pid
    if _interval <= 0 or (_thread is not None and _pid == os.getpid()):
        return
    try:
        import threading

        _stop = threading.Event()
        _pid = os.getpid()
        _thread = threading.Thread(
            target=_report, args=(_stop, _interval), name="talisker-cpu", daemon=True
        )
        _thread.start()
    except Exception:  # at interpreter shutdown, threads cannot start: nothing to report
        _thread = None


def stop() -> None:
    global _thread
    if _stop is not None:
        _stop.set()
    _thread = None


def _report(stop_event: threading.Event, interval: float) -> None:
    last = os.times()
    last_wall = time.monotonic()
    while not stop_event.wait(interval):
        try:
            now = os.times()
            wall = time.monotonic()
            user_ms = (now.user - last.user) * 1000.0
            system_ms = (now.system - last.system) * 1000.0
            elapsed_ms = (wall - last_wall) * 1000.0
            metrics.count("process.cpu.user", user_ms)
            metrics.count("process.cpu.system", system_ms)
            if elapsed_ms > 0:
                metrics.gauge("process.cpu.percent", 100.0 * (user_ms + system_ms) / elapsed_ms)
            last, last_wall = now, wall
        except Exception:
            from agent._log import log_once

            log_once("process-cpu", "agent: reading process CPU failed", exc_info=True)


def _after_fork_in_child() -> None:
    global _thread
    _thread = None  # the parent's thread does not exist here
    from agent import config

    if _interval > 0 and config.current is not None:
        ensure_started()


_child_hook_registered = False


def _before_fork() -> None:
    # The child's hook starts a thread, so it must run after threading's own child
    # hook, which forgets every thread but the current one: hooks run in the order
    # they were registered, so ours is registered once threading has registered its.
    global _child_hook_registered
    if not _child_hook_registered and "threading" in sys.modules:
        _child_hook_registered = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)
