"""Retries of the agent's own (opt-in), per peer: the policy and its retry budget.

``TALISKER_RETRY_POLICY=users-api:3,*:0`` gives each named peer (``*``: any
other) the most retries (extra attempts) its calls get. The policy replaces only
the library's default retries (requests' ``Retry(0, read=False)``, urllib3's
``Retry.DEFAULT``), never a ``Retry`` the application configured. What is
retried, and how, is fixed here with its reasons (``docs/resilience.md``):

- idempotent methods only, on 429, 502, 503 and 504 and on connection errors;
  an error while connecting is retried for any method, since nothing was sent;
- exponential backoff with full jitter: a random wait in ``[0, min(2 s, 50 ms *
  2^(n-1)))`` before the n-th retry (AWS's "full jitter": retries spread out
  instead of arriving together); a ``Retry-After`` is honoured;
- a response with ``X-Do-Not-Retry`` (aio-request's convention) is not retried;
- all under the deadline (:func:`agent.instrumentation.urllib3.retry_sleep_wrapper`);
- a retry budget per peer (:class:`Budget`).
"""

from __future__ import annotations

from _thread import allocate_lock

from agent import _fork

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Budget", "budget_for", "retries_for"]

#: The methods the policy retries (RFC 9110's idempotent ones).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
#: The statuses it retries: throttled, and the gateway's "try again".
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Full-jitter backoff: base and cap, in seconds.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
#: A response header that stops retrying (aio-request's).
DO_NOT_RETRY = "X-Do-Not-Retry"


def retries_for(policy: Mapping[str, int], peer: str | None) -> int | None:
    """The retries the policy gives calls to ``peer`` (``*`` for any other); None: not one."""
    if peer is not None:
        found = policy.get(peer)
        if found is not None:
            return found
    return policy.get("*")


class Budget:
    """A retry budget: gRPC's retry throttling, per peer.

    Tokens start at :data:`MAX_TOKENS`; a failed attempt costs one, a successful
    call returns :data:`TOKEN_RATIO`; a retry is made only while more than half
    the tokens remain. A peer that fails everything gets about one retry per
    ten failures at most, once the first five have drained the bucket; a
    healthy one is never throttled. gRPC's rule rather than Finagle's (20% of
    requests plus a few a second): it needs no clock and no window, and is the
    one aio-request's and Envoy's users meet in gRPC clients.
    """

    MAX_TOKENS = 10.0
    TOKEN_RATIO = 0.1

    __slots__ = ("_lock", "tokens")

    def __init__(self) -> None:
        self.tokens = self.MAX_TOKENS
        self._lock = allocate_lock()

    def failure(self) -> bool:
        """One failed attempt; returns whether a retry of it is allowed."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1.0)
            return self.tokens > self.MAX_TOKENS / 2

    def success(self) -> None:
        if self.tokens >= self.MAX_TOKENS:
            return  # full: nothing to give back (the common case, without the lock)
        with self._lock:
            self.tokens = min(self.MAX_TOKENS, self.tokens + self.TOKEN_RATIO)


_budgets: dict[str, Budget] = {}
_budgets_lock = allocate_lock()


def _after_fork_in_child() -> None:
    # A forked child starts with its parent's budgets, with locks of its own: one held
    # by a thread of the parent at the fork would never be released in the child.
    global _budgets_lock
    _budgets_lock = allocate_lock()
    for budget in list(_budgets.values()):
        budget._lock = allocate_lock()


_fork.after_in_child(_fork.RESET, _after_fork_in_child)


def budget_for(peer: str) -> Budget:
    """The budget of ``peer`` (one per process; a forked child starts with the parent's)."""
    found = _budgets.get(peer)
    if found is None:
        with _budgets_lock:
            found = _budgets.setdefault(peer, Budget())
    return found
