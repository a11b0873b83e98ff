"""Outgoing HTTP calls, whatever library makes them: one record per logical request.

A *logical request* is one call by the application: ``requests.get(...)``,
``pool.urlopen(...)``. Its retries and redirects are *attempts* of the same
logical request: they share its request id, each gets the deadline header and
timeouts recomputed from the time left, and each is checked against the
deadline first. A context variable holds the logical request in flight, so
nested layers (requests over urllib3, urllib3's own recursion on retries)
record it once, at the outermost layer.

The instrumentation modules call :func:`begin`, :func:`attempt_headers` and
:func:`finish`; they know their library, this module knows the metrics.
"""

from __future__ import annotations

import errno
import socket
import time
from contextvars import ContextVar

from agent import context, metrics, naming
from agent.context import DeadlineExceeded

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

    from agent.config import Config

__all__ = [
    "Call",
    "attempt_headers",
    "begin",
    "classify_error",
    "current_call",
    "end",
    "enter",
    "finish",
]

#: Response header naming the remote view (the ``view`` tag), as talisker sends it.
VIEW_HEADER = "X-View-Name"

_perf_counter = time.perf_counter
_monotonic = time.monotonic
_record_deferred = metrics.record_deferred
_COUNT, _TIMING = metrics.COUNT, metrics.TIMING


class Call:
    """One logical outgoing request and what its attempts learned."""

    __slots__ = (
        "attempts",
        "deadline",
        "deadline_bound",
        "method",
        "peer",
        "request_id",
        "start",
        "view",
    )

    def __init__(
        self,
        request_id: str,
        deadline: context.Deadline | None,
        method: str,
        view: str | None = None,
        peer: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.method = method
        self.view = view  # per-call name (metric_names / metric_api_name)
        self.peer = peer  # per-call name, else set by the first attempt
        self.attempts = 0
        self.deadline_bound = False  # an attempt's timeout was cut to the deadline
        self.start = _perf_counter()


_call: ContextVar[Call | None] = ContextVar("talisker_outgoing_call", default=None)
current_call = _call.get
enter = _call.set  #: make a call the one in flight; returns the token for :func:`end`
end = _call.reset  #: leave it (with the token from :func:`enter`)
_current_scope = context.current
_new_request_id = context.new_request_id


def begin(method: str) -> Call:
    """A logical request in the current scope (not yet in flight: see :func:`enter`)."""
    scope = _current_scope()
    return Call(
        scope.request_id or _new_request_id(),
        scope.deadline,
        method.upper(),
        scope.view,
        scope.peer,
    )


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


def view_header(headers: Any) -> str | None:
    """The response's ``X-View-Name``, read from the mapping's own lower-cased store.

    requests' CaseInsensitiveDict keeps ``{name: (Name, value)}`` in ``_store``,
    urllib3's HTTPHeaderDict ``{name: [Name, value, ...]}`` in ``_container``:
    several times cheaper than their Python-level ``get``, which is the fallback.
    """
    store = getattr(headers, "_store", None)
    if type(store) is not dict:
        store = getattr(headers, "_container", None)
    if type(store) is dict:
        item = store.get("x-view-name")
        return item[-1] if item else None
    value: str | None = headers.get(VIEW_HEADER)
    return value


def attempt_headers(headers: Any, call: Call, cfg: Config, copy_mapping: Any = None) -> Any:
    """A copy of ``headers`` with the request id and deadline headers added.

    Headers the caller set are never overwritten (matched case-insensitively).
    The caller's mapping is never mutated. ``copy_mapping`` copies a non-dict
    mapping that must keep its type (urllib3's multi-valued ``HTTPHeaderDict``).
    """
    id_name = cfg.id_header
    deadline = call.deadline
    if not headers:
        new = {id_name: call.request_id}
        if deadline is not None:
            new[cfg.deadline_header] = deadline.header()
        return new
    if type(headers) is dict:
        new = headers.copy()
        present = {k.lower() for k in new}
        has_id = id_name.lower() in present
        has_deadline = cfg.deadline_header.lower() in present
    else:
        store = getattr(headers, "_store", None)
        if type(store) is dict:
            # requests' CaseInsensitiveDict keeps {lower-case name: (name, value)}:
            # reading it directly is several times cheaper than its Python methods.
            has_id = id_name.lower() in store
            has_deadline = cfg.deadline_header.lower() in store
            new = dict(store.values())
        else:
            # Other case-insensitive mappings (urllib3's HTTPHeaderDict).
            has_id = id_name in headers
            has_deadline = cfg.deadline_header in headers
            new = copy_mapping(headers) if copy_mapping is not None else dict(headers.items())
    if not has_id:
        new[id_name] = call.request_id
    if deadline is not None and not has_deadline:
        new[cfg.deadline_header] = deadline.header()
    return new


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
        view = view_header(headers)
    elapsed_ms = (_perf_counter() - call.start) * 1000.0
    kind: str | None
    code: str | None
    if error is not None:
        kind, code = classify_error(error, call)
    elif status is not None and status >= 500:
        kind, code = "http", str(status)
    else:
        kind = code = None
    _record_deferred(
        expand_requests,
        (
            call.peer or "unknown",
            view or "unknown",
            call.method,
            status or "error",
            elapsed_ms,
            kind,
            code,
            call.attempts - 1,
        ),
    )


def expand_requests(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """The metrics of a flush's logical requests (runs in the metrics thread).

    Requests with the same tags are summed first, so tags are built once per
    distinct combination, not once per request.
    """
    counts: dict[tuple[Any, ...], list[Any]] = {}
    errors: dict[tuple[Any, ...], int] = {}
    retries: dict[tuple[Any, ...], int] = {}
    for peer, view, method, status, elapsed_ms, kind, code, extra_attempts in payloads:
        key = (peer, view, method, status)
        samples = counts.get(key)
        if samples is None:
            counts[key] = [elapsed_ms]
        else:
            samples.append(elapsed_ms)
        if kind is not None:
            error_key = (peer, view, method, kind, code)
            errors[error_key] = errors.get(error_key, 0) + 1
        if extra_attempts > 0:
            retry_key = (peer, view, method)
            retries[retry_key] = retries.get(retry_key, 0) + extra_attempts
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
    for (peer, view, method), n in retries.items():
        retry_tags = (("peer", peer), ("view", view), ("method", method))
        records.append((_COUNT, "requests.retries", n, retry_tags))
    return records


# -- error classification ------------------------------------------------------

# Matched by class name anywhere in the MRO, so this module imports no HTTP library.
_TIMEOUT_NAMES = frozenset(
    {"ReadTimeoutError", "ConnectTimeoutError", "Timeout", "ReadTimeout", "ConnectTimeout"}
)
# urllib3 1.26 makes NewConnectionError a ConnectTimeoutError: it is not a timeout.
_NOT_TIMEOUT_NAMES = frozenset({"NewConnectionError", "NameResolutionError"})
_TLS_NAMES = frozenset({"SSLError", "CertificateError", "SSLCertVerificationError"})
_ERRNO_LESS = (
    (ConnectionRefusedError, "ECONNREFUSED"),
    (ConnectionResetError, "ECONNRESET"),  # includes http.client.RemoteDisconnected
    (ConnectionAbortedError, "ECONNABORTED"),
    (BrokenPipeError, "EPIPE"),
)
_EAI_NAMES: dict[int, str] = {}


def _eai_name(code: int) -> str:
    if not _EAI_NAMES:
        for name in dir(socket):
            if name.startswith("EAI_"):
                _EAI_NAMES.setdefault(getattr(socket, name), name)
    return _EAI_NAMES.get(code, f"EAI_{code}")


def classify_error(error: BaseException, call: Call | None = None) -> tuple[str, str]:
    """``(type, code)`` of a failed call: ``deadline``, ``timeout`` or ``connection``.

    Walks the exception, what it wraps (``MaxRetryError.reason``, exception
    arguments, ``__cause__``, ``__context__``) and takes the first thing that
    says what failed: the deadline, a timeout, a TLS failure, a resolver error
    (``EAI_NONAME``), an errno (``ECONNREFUSED``).
    """
    queue: list[BaseException] = [error]
    seen: set[int] = set()
    while queue and len(seen) < 32:
        exc = queue.pop(0)
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, DeadlineExceeded):
            return "deadline", "deadline"
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & _TLS_NAMES:
            return "connection", "ssl"
        if isinstance(exc, socket.gaierror):
            return "connection", _eai_name(exc.errno) if exc.errno is not None else "EAI"
        if not names & _NOT_TIMEOUT_NAMES and (
            names & _TIMEOUT_NAMES or isinstance(exc, TimeoutError)
        ):
            deadline = call.deadline if call is not None else None
            if (
                call is not None
                and deadline is not None
                and (call.deadline_bound or deadline.expired())
            ):
                return "deadline", "deadline"
            return "timeout", "timeout"
        if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
            return "connection", errno.errorcode.get(exc.errno, str(exc.errno))
        for cls, code in _ERRNO_LESS:
            if isinstance(exc, cls):
                return "connection", code
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException):
            queue.append(reason)
        queue.extend(a for a in exc.args if isinstance(a, BaseException))
        if exc.__cause__ is not None:
            queue.append(exc.__cause__)
        if exc.__context__ is not None:
            queue.append(exc.__context__)
    return "connection", type(error).__name__
