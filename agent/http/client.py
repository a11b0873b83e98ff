"""The outgoing-call protocol of every HTTP client: one record per logical request.

A *logical request* is one call by the application: ``requests.get(...)``,
``pool.urlopen(...)``. Its retries and redirects are *attempts* of the same
logical request: they share its request id, each gets the deadline header and
timeouts recomputed from the time left, and each is checked against the
deadline first. The logical request in flight is kept in the context (see
:class:`InFlight`), so nested layers (requests over urllib3, urllib3's own
recursion on retries) record it once, at the outermost layer.

The instrumentation modules call :func:`begin`, :func:`enter_sync` (:func:`enter` in an
asynchronous layer), per attempt :func:`agent.context.time_left` and
:func:`agent.propagation.attempt_headers`, then :func:`end_sync` (:func:`end`) and
:func:`finish`; they know their library, this module knows the metrics.
Errors are classified by :mod:`agent.http.errors`.
"""

from __future__ import annotations

import sys
import time
from _thread import get_ident as _get_ident
from contextvars import ContextVar

from agent import _log, context, metrics, naming, propagation
from agent.http.errors import classify_error

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any


__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "Call",
    "abandoned",
    "begin",
    "current_call",
    "current_sync_call",
    "end",
    "end_sync",
    "enter",
    "enter_sync",
    "finish",
    "sync_slot",
]

_perf_counter = time.perf_counter
_monotonic = time.monotonic
_COUNT, _TIMING = metrics.COUNT, metrics.TIMING
#: The status of a call its caller gave up on: nginx's "client closed request" (the
#: server side's ``agent.http.server.CLIENT_CLOSED_REQUEST`` for a client gone away).
CLIENT_CLOSED_REQUEST = 499


class Call:
    """One logical outgoing request and what its attempts learned.

    Not slotted: the fields only retries, a retry policy or a breaker change are
    class-level defaults, so making a call stores eleven attributes, not fifteen
    (measured on Python 3.13: 2.4k instructions against 4.0k for the slotted
    class, with seven). The fields every call writes are set in ``__init__`` and
    have no class default: on Python 3.12 and 3.13 an instance attribute that
    shadows a class attribute is read and written by the generic lookup, never
    by a specialised instruction (250-350 instructions more each time).
    """

    reasons: list[str] | None = None  # why each extra attempt was made
    next_reason: str | None = None  # the next attempt's, when its layer knows it
    backoff_ms = 0.0  # time slept between attempts
    budget: Any = None  # the retry budget of its peer, under a retry policy
    breaker: Any = None  # the circuit breaker of its peer, if it has one

    def __init__(
        self,
        request_id: str,
        deadline: context.Deadline | None,
        method: str,
        view: str | None = None,
        peer: str | None = None,
        priority: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.method = method
        self.view = view  # per-call name (metric_names / metric_api_name)
        self.peer = peer  # per-call name, else set by the first attempt
        self.priority = priority  # sent as X-Request-Priority
        self.timeout_sent: str | None = None  # the X-Request-Timeout of the last attempt
        self.attempts = 0
        self.deadline_bound = False  # an attempt's timeout was cut to the deadline
        self.hops = 0  # requests made so far, where a layer counts them (aiohttp's redirects)
        self.start = _perf_counter()


_call: ContextVar[Call | None] = ContextVar("talisker_outgoing_call", default=None)
#: The call in flight of the asynchronous layers (aiohttp, httpx's ``AsyncClient``).
current_call = _call.get
enter = _call.set  #: make a call the one in flight; returns the token for :func:`end`
end = _call.reset  #: leave it (with the token from :func:`enter`)


class InFlight:
    """The synchronous call in flight in one context, on one thread (:func:`enter_sync`).

    A synchronous layer (urllib3, requests, httpx's ``Client``) runs its call to
    the end without letting other code of its thread run, so the call in flight
    can be a field of an object kept in a context variable, set once per context
    and thread, where setting the variable and resetting it per call costs 3.8-4.7k
    instructions (a new mapping and a token each time): 2k less a urllib3 request. The
    thread is checked because a copied context (``asyncio.to_thread``,
    ``copy_context().run`` in a pool) shares the object with the thread it came
    from. Greenlets do switch inside a synchronous call, and may share it too:
    once ``greenlet`` is imported, the synchronous layers use the context
    variable of the asynchronous ones (:data:`GREENLET`).
    """

    __slots__ = ("call", "thread")

    def __init__(self) -> None:
        self.call: Call | None = None
        self.thread = _get_ident()


_in_flight: ContextVar[InFlight | None] = ContextVar("talisker_sync_call", default=None)
in_flight = _in_flight.get  #: the :class:`InFlight` of this context (it may be another thread's)
get_ident = _get_ident
modules = sys.modules
#: In :data:`modules` once greenlets may switch inside a synchronous call.
GREENLET = "greenlet"


def new_in_flight() -> InFlight:
    """This thread's :class:`InFlight` in the current context, with no call in it."""
    found = InFlight()
    _in_flight.set(found)
    return found


def current_sync_call() -> Call | None:
    """The call in flight of a synchronous layer (urllib3, requests, httpx's ``Client``)."""
    if GREENLET in modules:
        return _call.get()
    found = _in_flight.get()
    if found is None or found.thread != _get_ident():
        return None
    return found.call


def enter_sync(call: Call) -> Any:
    """Make ``call`` a synchronous layer's call in flight (there is none); the token is
    for :func:`end_sync`."""
    if GREENLET in modules:
        return _call.set(call)
    found = _in_flight.get()
    if found is None or found.thread != _get_ident():
        found = new_in_flight()
    found.call = call
    return found


def sync_slot() -> InFlight | None:
    """This thread's :class:`InFlight` in the current context, made if there is none.

    :func:`current_sync_call` and :func:`enter_sync` in one lookup, for a layer
    that asks for the call in flight and then enters its own: the call in flight
    is its ``call``; ``slot.call = call`` enters one and :func:`end_sync` with the
    slot leaves it. None once greenlets may switch (:data:`GREENLET`): then use
    the two functions.
    """
    if GREENLET in modules:
        return None
    found = _in_flight.get()
    if found is None or found.thread != _get_ident():
        found = new_in_flight()
    return found


def end_sync(token: Any) -> None:
    """Leave the call of :func:`enter_sync` (with its token)."""
    if type(token) is InFlight:
        token.call = None
    else:
        _call.reset(token)


_current_scope = context.current
_new_request_id = context.new_request_id
_view_header = propagation.view_header
_STORES = propagation._STORES


def begin(method: str) -> Call | None:
    """A logical request in the current scope (not yet in flight: see :func:`enter`).

    None inside :class:`agent.suppress`: the call is made as without the agent.
    """
    scope = _current_scope()
    if scope.suppressed:
        return None
    return Call(
        scope.request_id or _new_request_id(),
        scope.deadline,
        _METHODS.get(method) or _method(method),
        scope.view,
        scope.peer,
        scope.priority,
    )


#: ``method as given -> upper case``, the same string object each time: no new string per
#: call, and the metrics thread's keys hash and compare by identity.
_METHODS: dict[str, str] = {}


def _method(method: str) -> str:
    upper = method.upper()
    upper = _METHODS.get(upper, upper)
    if len(_METHODS) < 64:  # a bounded cache: methods are few, but a caller may make up any
        _METHODS[method] = _METHODS[upper] = upper
    return upper


def peer_from_url(url: Any) -> str | None:
    """The ``peer`` of a URL (host and port only: never user info or path), or None."""
    try:
        from urllib.parse import urlsplit

        parts = urlsplit(str(url))
        if not parts.hostname:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return naming.peer_name(parts.hostname, port)
    except Exception:
        return None


def finish(call: Call, status: int | None, headers: Any, error: BaseException | None) -> None:
    """Record the logical request: count, latency, error and retries.

    ``status`` and ``headers`` are the response's (None when there is none);
    the ``view`` tag is the per-call name, else the response's ``X-View-Name``.
    One tuple is handed to the metrics pipeline; the metrics thread builds the
    tags (:func:`expand_requests`). Errors are classified here, on the caller's
    thread, so no exception (and its traceback) is kept alive until the flush.
    """
    view = call.view
    if view is None and headers is not None:
        # propagation.view_header, its common case inline (a frame fewer a call): the
        # mapping's type is known and keeps a lower-cased dict.
        attr = _STORES.get(type(headers))
        store = None if attr is None else getattr(headers, attr, None)
        if type(store) is dict:
            item = store.get("x-view-name")
            view = item[-1] if item else None
        else:
            view = _view_header(headers)
    elapsed_ms = (_perf_counter() - call.start) * 1000.0
    kind: str | None
    code: str | None
    if error is not None:
        deadline = call.deadline
        bound = call.deadline_bound or (deadline is not None and deadline.expired())
        kind, code = classify_error(error, bound)
    elif status is not None and status >= 500:
        kind, code = "http", str(status)
    else:
        kind = code = None
    if call.budget is not None and kind is None and status != 429:
        call.budget.success()
    if call.breaker is not None and kind != "circuit":
        if kind == "deadline" and not call.deadline_bound:
            pass  # stopped before the peer was asked: no outcome of the peer's
        else:
            call.breaker.record(kind is not None or status == 429)
    payload = (
        call.peer or "unknown",
        view or "unknown",
        call.method,
        status or "error",
        elapsed_ms,
        kind,
        code,
        None if call.attempts <= 1 else _retry_reasons(call),
        call.backoff_ms,
    )
    _requests.append(payload)


def record(call: Call, response: Any, error: BaseException | None, status: str = "status") -> None:
    """:func:`finish` from a response (its ``status`` attribute named) or an error; never raises."""
    try:
        if response is None:
            finish(call, None, None, error)
        else:
            finish(call, getattr(response, status), response.headers, error)
    except Exception:
        _log.log_once("http-record", "agent: recording an outgoing call failed", exc_info=True)


def abandoned(call: Call) -> None:
    """Record a call its caller gave up on before it ended: status 499, not an error.

    Cancelled (``asyncio.CancelledError``: ``asyncio.wait_for`` or ``asyncio.timeout``
    around the call, a hedged attempt that lost, a task cancelled) or interrupted
    (``KeyboardInterrupt``, gevent's ``Timeout``): any ``BaseException`` that is not an
    ``Exception``. The request may have reached the peer, whose own record is then a
    499 too, as aio-request records a cancelled call. The peer did not fail, so
    neither the circuit breaker nor the retry budget is told of an outcome. Never raises.
    """
    try:
        _requests.append(
            (
                call.peer or "unknown",
                call.view or "unknown",
                call.method,
                CLIENT_CLOSED_REQUEST,
                (_perf_counter() - call.start) * 1000.0,
                None,
                None,
                None if call.attempts <= 1 else _retry_reasons(call),
                call.backoff_ms,
            )
        )
    except Exception:
        _log.log_once("http-abandoned", "agent: recording an abandoned call failed", exc_info=True)


def retried(call: Call, history: Any) -> None:
    """Note why the attempt about to be made is one: from the layer that knows
    (``call.next_reason``, a redirect followed by requests), else from urllib3's
    ``Retry.history``: the last entry's redirect, status or error."""
    reason = call.next_reason
    call.next_reason = None
    if reason is None:
        reason = "unknown"
        if history:
            last = history[-1]
            if getattr(last, "redirect_location", None):
                reason = "redirect"
            elif getattr(last, "status", None):
                reason = str(last.status)
            elif isinstance(getattr(last, "error", None), BaseException):
                reason = classify_error(last.error)[1]
    if call.reasons is None:
        call.reasons = [reason]
    else:
        call.reasons.append(reason)


def _retry_reasons(call: Call) -> tuple[str, ...]:
    """One reason per extra attempt (``unknown`` where no layer said)."""
    extra = call.attempts - 1
    reasons = call.reasons or []
    return (*reasons[:extra], *["unknown"] * (extra - len(reasons)))


_NO_GROUP: Any = object()  # what no request's peer, view, method or status is


def expand_requests(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """The metrics of a flush's logical requests (runs in the metrics thread).

    Requests with the same tags are summed first, so tags are built once per
    distinct combination, not once per request. Consecutive requests mostly share
    their peer, view, method and status: the group of the one before is reused
    without building and hashing a key (a new view string each time, from the
    response's ``X-View-Name``), as :func:`agent.http.server.expand_requests` does.
    """
    counts: dict[tuple[Any, ...], list[Any]] = {}
    errors: dict[tuple[Any, ...], int] = {}
    retries: dict[tuple[Any, ...], int] = {}
    backoffs: dict[tuple[Any, ...], list[float]] = {}
    last_peer: Any = _NO_GROUP
    last_view: Any = _NO_GROUP
    last_method: Any = _NO_GROUP
    last_status: Any = _NO_GROUP
    samples: list[Any] = []
    for peer, view, method, status, elapsed_ms, kind, code, reasons, backoff_ms in payloads:
        if status != last_status or view != last_view or peer != last_peer or method != last_method:
            key = (peer, view, method, status)
            group = counts.get(key)
            if group is None:
                group = counts[key] = []
            samples = group
            last_peer, last_view, last_method, last_status = key
        samples.append(elapsed_ms)
        if kind is not None:
            error_key = (peer, view, method, kind, code)
            errors[error_key] = errors.get(error_key, 0) + 1
        if reasons is not None:
            for reason in reasons:
                retry_key = (peer, view, method, reason)
                retries[retry_key] = retries.get(retry_key, 0) + 1
            if backoff_ms > 0:
                backoffs.setdefault((peer, view, method), []).append(backoff_ms)
    records: list[tuple[int, str, Any, Any]] = []
    for (peer, view, method, status), samples in counts.items():
        tags = (("peer", peer), ("view", view), ("method", method), ("status", status))
        records.append((_COUNT, "requests.count", len(samples), tags))
        records.append((_TIMING, "requests.latency", samples, tags))
    for (peer, view, method, kind, code), n in errors.items():
        error_tags = (
            ("peer", peer),
            ("view", view),
            ("method", method),
            ("type", kind),
            ("code", code),
        )
        records.append((_COUNT, "requests.errors", n, error_tags))
    for (peer, view, method, reason), n in retries.items():
        retry_tags = (("peer", peer), ("view", view), ("method", method), ("reason", reason))
        records.append((_COUNT, "requests.retries", n, retry_tags))
    for (peer, view, method), slept in backoffs.items():
        backoff_tags = (("peer", peer), ("view", view), ("method", method))
        records.append((_TIMING, "requests.backoff", slept, backoff_tags))
    return records


#: metrics.record_deferred(expand_requests, ...), for a frame and a lookup less.
_requests = metrics.sink(expand_requests)
