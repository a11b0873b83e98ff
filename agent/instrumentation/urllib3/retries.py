"""urllib3's retries under the agent: kept inside the deadline, and the opt-in policy.

:func:`retry_sleep_wrapper` wraps ``Retry.sleep`` (every ``Retry``, whoever made
it); :func:`apply_policy` gives a call to a peer under ``TALISKER_RETRY_POLICY``
the policy's :class:`PolicyRetry` instead of the library's default retries
(:mod:`agent.http.retry` says what and why).
"""

from __future__ import annotations

import random
import time

from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from agent import _log, config, context, metrics
from agent.http import client, retry
from agent.instrumentation.urllib3.errors import DeadlineExceeded

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from agent.config import Config

__all__ = ["PolicyRetry", "apply_policy", "retry_sleep_wrapper"]

_RETRIES = 4  # position in urlopen(method, url, body, headers, retries, ...)
_current_call = client.current_sync_call
_time_left = context.time_left
_plans: dict[str, tuple[Any, Any, Any]] = {}  # peer -> _plan(...)
_POLICIES_LIMIT = 1024


def apply_policy(
    cfg: Config, call: client.Call, pool: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first attempt of a call to a peer under TALISKER_RETRY_POLICY: if it has the
    library's default retries, the policy's instead (a Retry of the application's stays)."""
    peer = call.peer or "unknown"
    policies = cfg.retry_policy
    plan = _plans.get(peer)
    if plan is None or plan[0] is not policies:
        plan = _plan(policies, peer)
    if plan[1] is None:
        return args, kwargs
    given = args[_RETRIES] if len(args) > _RETRIES else kwargs.get("retries")
    if not _is_default_retry(given, pool):
        return args, kwargs
    call.budget = plan[2]
    policy = plan[1]
    if len(args) > _RETRIES:
        return (*args[:_RETRIES], policy, *args[_RETRIES + 1 :]), kwargs
    kwargs["retries"] = policy
    return args, kwargs


def _plan(policies: Any, peer: str) -> tuple[Any, Any, Any]:
    """``(policies, its PolicyRetry for peer or None, the peer's budget)``, cached per peer.

    A Retry is never changed by urllib3 (each retry is a new one): one per peer
    will do, and making one costs more than the rest of an attempt's work.
    """
    count = retry.retries_for(policies, peer)
    plan: tuple[Any, Any, Any] = (policies, None, None)
    if count is not None:
        budget = retry.budget_for(peer)
        plan = (policies, PolicyRetry.for_policy(count, budget, peer), budget)
    if len(_plans) >= _POLICIES_LIMIT:
        _plans.clear()
    _plans[peer] = plan
    return plan


def _is_default_retry(given: Any, pool: Any) -> bool:
    """urllib3's default (none given, the pool's is ``Retry.DEFAULT``) or requests' own
    (``Retry(0, read=False)``, what its adapter passes unless given ``max_retries``)."""
    if given is None:
        given = pool.retries
    if given is Retry.DEFAULT:
        return True
    return (
        type(given) is Retry
        and given.total == 0
        and given.read is False
        and given.connect is None
        and given.status is None
        and not given.status_forcelist
        and not given.history
        and given.backoff_factor == 0
    )


class PolicyRetry(Retry):
    """The retries of TALISKER_RETRY_POLICY (see :mod:`agent.http.retry`)."""

    _talisker: tuple[Any, str] | None = None  # (budget, peer)

    @classmethod
    def for_policy(cls, count: int, budget: Any, peer: str) -> PolicyRetry:
        policy = cls(
            total=count,
            connect=count,
            read=count,
            status=count,
            redirect=None,
            allowed_methods=retry.IDEMPOTENT_METHODS,
            status_forcelist=retry.RETRY_STATUSES,
            raise_on_status=False,  # the last response is returned, as without retries
            respect_retry_after_header=True,
        )
        policy._talisker = (budget, peer)
        return policy

    def new(self, **kw: Any) -> Any:
        made = super().new(**kw)
        made._talisker = self._talisker
        return made

    def get_backoff_time(self) -> float:
        """Full jitter: uniform in ``[0, min(cap, base * 2^(n-1)))`` before the n-th retry."""
        errors = 0
        for entry in reversed(self.history):
            if entry.redirect_location is not None:
                break
            errors += 1
        if errors == 0:
            return 0.0
        return float(_random() * min(retry.BACKOFF_CAP, retry.BACKOFF_BASE * 2 ** (errors - 1)))

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Any:
        redirect = response is not None and bool(response.get_redirect_location())
        if not redirect and self._talisker is not None:
            if response is not None and response.headers.get(retry.DO_NOT_RETRY):
                raise MaxRetryError(_pool, url or "", error or ResponseError("X-Do-Not-Retry"))
            budget, peer = self._talisker
            if not budget.failure():
                tags = (("peer", peer), ("method", (method or "unknown").upper()))
                metrics.count("requests.retries_throttled", 1, tags)
                raise MaxRetryError(_pool, url or "", error or ResponseError("retry budget"))
        return super().increment(method, url, response, error, _pool, _stacktrace)


def retry_sleep_wrapper(
    wrapped: Callable[..., Any], retry: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``Retry.sleep``: under a deadline, a wait that would end after it is not made.

    Whoever configured the ``Retry`` (the application, requests' adapter, urllib3's
    default): before a backoff or a ``Retry-After`` wait, if the wait would end
    after the deadline, the call stops at once with :class:`DeadlineExceeded`,
    without sleeping. Under a deadline a ``Retry-After`` waits at most
    ``TALISKER_RETRY_AFTER_MAX``. Outside a deadline the ``Retry`` is untouched.
    """
    cfg = config.current
    call = _current_call()
    deadline = call.deadline if call is not None else _current_scope().deadline
    if cfg is None or deadline is None:
        if call is None:
            return wrapped(*args, **kwargs)
        start = _perf_counter()
        try:
            return wrapped(*args, **kwargs)
        finally:
            slept = _perf_counter() - start
            if slept >= 0.001:  # a wait, not a Retry that had none to make
                call.backoff_ms += slept * 1000.0
    try:
        response = args[0] if args else kwargs.get("response")
        wait = None
        if retry.respect_retry_after_header and response is not None:
            after = retry.get_retry_after(response)
            if after:
                wait = min(float(after), cfg.retry_after_max)
        if wait is None:
            wait = float(retry.get_backoff_time())
    except Exception:
        _log.log_once("urllib3-retry", "agent: reading a urllib3 Retry failed", exc_info=True)
        return wrapped(*args, **kwargs)
    left = _time_left(deadline, DeadlineExceeded, "; not retried")
    if wait >= left:
        raise DeadlineExceeded(
            f"a retry would wait {wait:.3f}s, past the deadline ({left:.3f}s left); not retried"
        )
    if wait > 0:
        _sleep(wait)
        if call is not None:
            call.backoff_ms += wait * 1000.0
    return None


_sleep = time.sleep
_random = random.random
_perf_counter = time.perf_counter
_current_scope = context.current
