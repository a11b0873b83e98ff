"""The incoming-request protocol of every server: the request scope and its record.

A server integration (:mod:`agent.wsgi`, :mod:`agent.asgi`, aiohttp's) calls
:func:`begin` with what the request's headers say, sets the scope (whose
``request`` is the record, which :func:`current_request` reads) for the time it
serves the request, and calls :func:`finish` once the response has been sent (or
the client went away). This module knows the metrics (``wsgi.*``); the header
protocol is :mod:`agent.propagation`.
"""

from __future__ import annotations

import time

from agent import _log, context, metrics, propagation
from agent.context import Scope

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

    from agent.config import Config

__all__ = ["CLIENT_CLOSED_REQUEST", "Request", "begin", "current_request", "finish", "scope_for"]

#: The status recorded for a response whose client went away before it was sent.
CLIENT_CLOSED_REQUEST = 499
_perf_counter = time.perf_counter
_thread_time = time.thread_time


class Request:
    """What the agent knows about the incoming request being served."""

    __slots__ = (
        "complete",
        "cpu",
        "error",
        "finished",
        "kind",
        "method",
        "request_id",
        "soft_timeout",
        "start",
        "status",
        "view",
    )

    def __init__(self, request_id: str, method: str, soft_timeout: float | None) -> None:
        self.request_id = request_id
        self.method = method
        self.soft_timeout = soft_timeout
        self.view: str | None = None
        self.status: int | None = None
        self.error: BaseException | None = None
        self.complete = False  # the server read the whole body
        self.finished = False
        self.kind = "wsgi"  # the metric family: wsgi.* or asgi.*
        self.start = _perf_counter()
        self.cpu = _thread_time()


_current_scope = context.current


def current_request() -> Request | None:
    """The incoming request being served in this context, or ``None``.

    The request scope a server integration sets carries its record, and every
    scope pushed inside it (a nested ``deadline()``, ``metric_names()``,
    ``request_context()``) keeps it: one context variable per request, not two.
    """
    request: Request | None = _current_scope().request
    return request


def begin(
    cfg: Config,
    method: str,
    incoming_id: str | None,
    deadline_header: str | None,
    timeout_header: str | None,
    priority_header: str | None = None,
) -> tuple[Request, Scope]:
    """The record and the scope of a request that came with these header values.

    The scope carries the record (``scope.request``): setting it makes the record
    :func:`current_request`.
    """
    scope = scope_for(cfg, incoming_id, deadline_header, timeout_header, priority_header)
    request = Request(scope.request_id, method, cfg.soft_request_timeout)  # type: ignore[arg-type]
    scope.request = request
    return request, scope


def scope_for(
    cfg: Config,
    incoming_id: str | None,
    deadline_header: str | None,
    timeout_header: str | None,
    priority_header: str | None = None,
) -> Scope:
    """The scope of a request that came with these header values (see :func:`begin`)."""
    request_id = _new_request_id()
    if incoming_id is not None:
        request_id = _request_id_for(incoming_id, request_id, cfg.compose_request_id)
    if (
        deadline_header is None
        and timeout_header is None
        and priority_header is None
        and not cfg.request_timeout
    ):
        return Scope(request_id)  # the common case
    deadline = None
    if deadline_header is not None or timeout_header is not None or cfg.request_timeout:
        deadline = _incoming_deadline(cfg, deadline_header, timeout_header)
    priority = None
    if priority_header is not None:
        priority = _parse_priority(priority_header)
        if priority is None:
            _log.debug("agent: ignoring an unusable %s header", propagation.PRIORITY_HEADER)
    return Scope(request_id, deadline, None, None, False, priority, priority)


_new_request_id = context.new_request_id
_request_id_for = propagation.request_id_for
_incoming_deadline = propagation.incoming_deadline
_parse_priority = context.parse_priority


def finish(request: Request) -> None:
    """Record the request once it is complete."""
    if request.finished:
        return
    request.finished = True
    try:
        cpu_ms = (_thread_time() - request.cpu) * 1000.0
        latency_ms = (_perf_counter() - request.start) * 1000.0
        status = request.status
        failed = request.error is not None
        if failed:
            # Its traceback holds the frames that hold this record: kept, that would be
            # a cycle (with the framework's request in it) only the collector frees.
            request.error = None
        if status is None:
            status = 500
        elif not failed and not request.complete:
            # Closed before the body was read to its end: the client went away.
            # nginx's 499 (and aio-request's), not an error of the application.
            status = CLIENT_CLOSED_REQUEST
        error = failed or status >= 500
        view = request.view or "unknown"
        kind = request.kind
        payload = (view, request.method, status, latency_ms, cpu_ms, error)
        (_wsgi_requests if kind == "wsgi" else _SINKS[kind]).append(payload)
        soft = request.soft_timeout
        if soft is not None and latency_ms > soft * 1000.0:
            name = kind + ".soft_timeouts"
            metrics.count(name, 1, (("view", view), ("method", request.method)))
            _log.logger().warning(
                "agent: request %s to %s took %.0f ms, over its soft timeout of %.0f ms",
                request.request_id,
                view,
                latency_ms,
                soft * 1000.0,
            )
    except Exception:
        _log.log_once("server-record", "agent: recording a request served failed", exc_info=True)


def expand_requests(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """``wsgi.*`` metrics of a flush (runs in the metrics thread)."""
    return _expand(payloads, "wsgi", True)


def expand_asgi_requests(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """``asgi.*`` metrics of a flush: no ``cpu``, which an event loop cannot give per request."""
    return _expand(payloads, "asgi", False)


_NO_GROUP: Any = object()  # what no request's view, method or status is


def _expand(
    payloads: list[tuple[Any, ...]], family: str, with_cpu: bool
) -> list[tuple[int, str, Any, Any]]:
    groups: dict[tuple[Any, ...], tuple[list[float], list[float], list[int]]] = {}
    # Consecutive requests mostly share their view, method and status: the group of
    # the one before is reused without hashing a key (a new method string each time).
    last_view: Any = _NO_GROUP
    last_method: Any = _NO_GROUP
    last_status: Any = _NO_GROUP
    latencies: list[float] = []
    cpus: list[float] = []
    errors: list[int] = []
    for view, method, status, latency_ms, cpu_ms, error in payloads:
        if status != last_status or view != last_view or method != last_method:
            key = (view, method, status)
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [], [0])
            latencies, cpus, errors = group
            last_view, last_method, last_status = key
        latencies.append(latency_ms)
        cpus.append(cpu_ms)
        if error:
            errors[0] += 1
    records: list[tuple[int, str, Any, Any]] = []
    for (view, method, status), (latencies, cpus, errors) in groups.items():
        tags = (("view", view), ("method", method), ("status", status))
        records.append((metrics.COUNT, family + ".requests", len(latencies), tags))
        records.append((metrics.TIMING, family + ".latency", latencies, tags))
        if with_cpu:
            records.append((metrics.TIMING, family + ".cpu", cpus, tags))
        if errors[0]:
            records.append((metrics.COUNT, family + ".errors", errors[0], tags))
    return records


def expand_aiohttp_requests(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """``aiohttp.*`` metrics of a flush: no ``cpu``, as for ASGI."""
    return _expand(payloads, "aiohttp", False)


#: metrics.record_deferred(expand, ...) for each kind of server, a frame and a lookup less.
_wsgi_requests = metrics.sink(expand_requests)
_SINKS = {
    "asgi": metrics.sink(expand_asgi_requests),
    "aiohttp": metrics.sink(expand_aiohttp_requests),
}
