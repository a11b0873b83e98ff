"""A circuit breaker per peer (opt-in): aio-request's algorithm, safe across threads.

``TALISKER_CIRCUIT_BREAKER=users-api=0.5/20/30/10,*`` names peers (``*``: any
other) and, optionally, their thresholds: the failure ratio that opens the
circuit, the fewest calls in the window before it may, the seconds it stays
open, the seconds of the rolling window. A peer without thresholds gets
:data:`DEFAULTS`.

- Calls are counted in a rolling window of 10 buckets over the sampling
  duration. While **closed**, a failure opens the circuit when the window holds
  at least the minimum throughput and failures / calls reaches the threshold.
- While **open**, calls fail before connecting with :class:`agent.CircuitOpen`
  (a ``ConnectionError``; also the library's own connection error).
- Once the break duration has passed, exactly one call is let through
  (**half-open**): its success closes the circuit, its failure opens it again
  for another break; meanwhile the others still fail fast.
- A failure is a 5xx, a 429, a connection error or a timeout; a 4xx is a
  success (the peer answered). One outcome per logical request.

Each change of state is logged once as a warning and sets the gauge
``circuit.state`` (``peer``): 0 closed, 1 half-open, 2 open.
"""

from __future__ import annotations

import time
from _thread import allocate_lock

from agent import _fork, _log, metrics

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["CLOSED", "DEFAULTS", "HALF_OPEN", "OPEN", "Breaker", "CircuitOpen", "breaker_for"]

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}
#: failure ratio, minimum throughput, break seconds, sampling seconds
DEFAULTS = (0.5, 20, 30.0, 10.0)
#: Buckets of the rolling window.
WINDOWS = 10
_monotonic = time.monotonic


class CircuitOpen(ConnectionError):
    """The circuit to the peer is open: the call was not made.

    A ``ConnectionError``; raised through urllib3 it is also a
    ``urllib3.exceptions.MaxRetryError``, through requests a
    ``requests.exceptions.ConnectionError``: what handles a refused connection
    handles it.
    """


class Breaker:
    """The circuit of one peer."""

    __slots__ = (
        "_buckets",
        "_lock",
        "blocked_until",
        "break_s",
        "minimum",
        "peer",
        "sampling_s",
        "settings",
        "state",
        "threshold",
    )

    def __init__(self, peer: str, settings: tuple[float, int, float, float] = DEFAULTS) -> None:
        self.peer = peer
        self.settings = settings
        self.threshold, self.minimum, self.break_s, self.sampling_s = settings
        self.state = CLOSED
        self.blocked_until = 0.0
        self._buckets: list[list[float]] = []  # [started, successes, failures], oldest first
        self._lock = allocate_lock()

    def allow(self) -> bool:
        """Whether a call may be made now; the one that ends a break is the probe."""
        if self.state == CLOSED:
            return True
        with self._lock:
            if self.state == CLOSED:
                return True
            now = _monotonic()
            if now < self.blocked_until:
                return False
            self.blocked_until = now + self.break_s  # only this call is let through
            self._change(HALF_OPEN)
            return True

    def record(self, failed: bool) -> None:
        """The outcome of a call made when :meth:`allow` said it could be."""
        if not failed and self.state == CLOSED:
            # The common case without the lock: a success in the current bucket. Two
            # threads adding at once may lose one count; the ratio does not care.
            buckets = self._buckets
            if buckets and _monotonic() - buckets[-1][0] < self.sampling_s / WINDOWS:
                buckets[-1][1] += 1
                return
        with self._lock:
            state = self.state
            if state == HALF_OPEN:
                if failed:
                    self.blocked_until = _monotonic() + self.break_s
                    self._change(OPEN)
                else:
                    self._buckets.clear()
                    self.blocked_until = 0.0
                    self._change(CLOSED)
                return
            bucket = self._bucket()
            bucket[2 if failed else 1] += 1
            if state == CLOSED and failed:
                successes = sum(b[1] for b in self._buckets)
                failures = sum(b[2] for b in self._buckets)
                calls = successes + failures
                if calls >= self.minimum and failures / calls >= self.threshold:
                    self.blocked_until = _monotonic() + self.break_s
                    self._change(OPEN)

    def _bucket(self) -> list[float]:
        now = _monotonic()
        buckets = self._buckets
        if not buckets or now - buckets[-1][0] >= self.sampling_s / WINDOWS:
            buckets.append([now, 0, 0])
        while buckets and now - buckets[0][0] >= self.sampling_s:
            buckets.pop(0)
        return buckets[-1]

    def _change(self, state: int) -> None:
        """Called with the lock held: one warning and one gauge per change."""
        if state == self.state:
            return
        before, self.state = self.state, state
        metrics.gauge("circuit.state", state, (("peer", self.peer),))
        try:
            _log.logger().warning(
                "agent: the circuit to %s is %s (was %s)",
                self.peer,
                _NAMES[state],
                _NAMES[before],
            )
        except Exception:  # pragma: no cover - logging must not break a call
            pass


_breakers: dict[str, Breaker] = {}
_breakers_lock = allocate_lock()


def _after_fork_in_child() -> None:
    # A forked child keeps its parent's breakers, with locks of its own: one held by a
    # thread of the parent at the fork would never be released in the child.
    global _breakers_lock
    _breakers_lock = allocate_lock()
    for breaker in list(_breakers.values()):
        breaker._lock = allocate_lock()


_fork.after_in_child(_fork.RESET, _after_fork_in_child)


def breaker_for(config: Mapping[str, tuple[float, int, float, float]], peer: str) -> Breaker | None:
    """The breaker of ``peer`` if ``TALISKER_CIRCUIT_BREAKER`` names it (or ``*``).

    One per peer and settings: a configuration that no longer names the peer has
    no breaker for it, and one that changes its settings starts it afresh.
    """
    settings = config.get(peer) or config.get("*")
    if settings is None:
        return None
    found = _breakers.get(peer)
    if found is not None and found.settings == settings:
        return found
    with _breakers_lock:
        found = _breakers.get(peer)
        if found is None or found.settings != settings:
            found = _breakers[peer] = Breaker(peer, settings)
        return found
