"""The server side: a request scope and metrics for every incoming WSGI request.

:class:`TaliskerMiddleware` wraps any WSGI application; Flask applications are
wrapped automatically (``agent/instrumentation/flask.py``). Per request:

- the request id: the incoming ``X-Request-Id`` if sane, else a new one (or
  ``<new>-<incoming>`` with ``TALISKER_COMPOSE_REQUEST_ID``);
- the deadline: the earliest of ``X-Request-Deadline`` (absolute), ``X-Request-Timeout``
  (relative seconds), ``TALISKER_REQUEST_TIMEOUT`` and the view's ``request_timeout``;
- the response carries ``X-Request-Id`` and ``X-View-Name``;
- ``environ['requests']`` is the thread's session (when the application uses requests);
- ``wsgi.requests``, ``wsgi.errors``, ``wsgi.latency`` and ``wsgi.cpu`` when the
  response has been sent and ``close()`` called; ``wsgi.soft_timeouts`` and one
  warning for a request slower than its soft timeout.

The request scope is set when the application is called and reset when the
server calls ``close()`` on the response (every WSGI server does, in a
``finally``), so it covers a streamed body too. Each request's scope is built
from its own headers, never from what is current, so nothing of one request can
reach the next.
"""

from __future__ import annotations

import math
import sys
import time
from contextvars import ContextVar

from agent import _log, config, context, metrics
from agent.context import Deadline, Scope

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])
    StartResponse = Callable[..., Any]
    WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

__all__ = ["TaliskerMiddleware", "current_request", "parse_deadline", "request_timeout"]

MAX_ID_LENGTH = 200
#: The status recorded for a response whose client went away before it was sent.
CLIENT_CLOSED_REQUEST = 499
VIEW_HEADER = "X-View-Name"
_perf_counter = time.perf_counter
_thread_time = time.thread_time


class Request:
    """What the agent knows about the incoming request being served."""

    __slots__ = (
        "complete",
        "cpu",
        "error",
        "finished",
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
        self.start = _perf_counter()
        self.cpu = _thread_time()


_request: ContextVar[Request | None] = ContextVar("talisker_wsgi_request", default=None)
#: The incoming request being served in this context, or ``None``.
current_request = _request.get


class TaliskerMiddleware:
    """WSGI middleware: request id, deadline, response headers and metrics.

    ``TaliskerMiddleware(app)``. The view name comes from ``environ["talisker.view"]``
    if the application sets it, else from an ``X-View-Name`` response header it
    sends, else ``unknown``. Flask applications need no middleware.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return handle(self.app, environ, start_response)


def handle(
    app: Callable[..., Iterable[bytes]],
    environ: dict[str, Any],
    start_response: StartResponse,
    view_of: Callable[[dict[str, Any]], str | None] | None = None,
) -> Iterable[bytes]:
    """Serve one request through ``app`` inside a request scope (shared by the integrations)."""
    cfg = config.current
    if cfg is None or "talisker.request" in environ:
        return app(environ, start_response)  # off, or an outer layer handles this request
    try:
        keys = _keys if _keys.config is cfg else _Keys(cfg)
        request, scope = _begin(environ, cfg, keys)
    except Exception:
        _log.log_once("wsgi-begin", "agent: reading a WSGI request failed", exc_info=True)
        return app(environ, start_response)
    scope_token = _set_scope(scope)
    request_token = _set_request(request)

    def talisker_start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        try:
            request.status = int(status[:3])
            has_id = False
            sent_view = None
            for name, value in headers:
                lowered = name.lower()
                if lowered == keys.id_lower:
                    has_id = True
                elif lowered == "x-view-name":
                    sent_view = value
            if not has_id:
                headers.append((keys.id_header, request.request_id))
            view = request.view or (view_of(environ) if view_of is not None else None)
            if not view:
                inner = environ.get("talisker.view_of")  # set by an integration inside us
                view = (inner(environ) if inner is not None else None) or environ.get(
                    "talisker.view"
                )
            if view:
                request.view = str(view)
                if sent_view is None:
                    headers.append((VIEW_HEADER, request.view))
            else:
                request.view = sent_view
        except Exception:
            _log.log_once("wsgi-headers", "agent: adding response headers failed", exc_info=True)
        return start_response(status, headers, *exc_info)

    try:
        body = app(environ, talisker_start_response)
    except BaseException as exc:
        request.error = exc
        _finish(request)
        _leave(scope_token, request_token)
        raise
    file_wrapper = environ.get("wsgi.file_wrapper")
    if file_wrapper is not None and _is_file(body, file_wrapper):
        # The server's own file wrapper: given back as it is, so the server still
        # sends it with sendfile(); the request is recorded when the server closes it.
        try:
            close = _FileClose(getattr(body, "close", None), request, scope_token, request_token)
            setattr(body, "close", close)  # noqa: B010 - an attribute Iterable does not declare
            return body
        except Exception:  # a wrapper that takes no attribute: iterated through _Body
            pass
    return _Body(body, request, scope_token, request_token)


def _is_file(body: object, file_wrapper: Any) -> bool:
    try:
        return isinstance(body, file_wrapper)
    except TypeError:  # not a class
        return False


class _FileClose:
    """``close`` of a response in the server's file wrapper: records the request.

    The server sends such a body itself (often with ``sendfile()``), so the agent
    cannot see whether it was sent whole; it is recorded as complete.
    """

    __slots__ = ("_close", "_request", "_tokens")

    def __init__(
        self,
        close: Callable[[], Any] | None,
        request: Request,
        scope_token: Any,
        request_token: Any,
    ) -> None:
        self._close = close
        self._request = request
        self._tokens: tuple[Any, ...] | None = (scope_token, request_token)

    def __call__(self) -> None:
        try:
            if self._close is not None:
                self._close()
        finally:
            self._request.complete = True
            _finish(self._request)
            tokens, self._tokens = self._tokens, None
            if tokens is not None:
                _leave(*tokens)


class _Body:
    """The response body; on ``close()`` the request is recorded and its scope left."""

    __slots__ = ("_body", "_request", "_tokens")

    def __init__(
        self, body: Iterable[bytes], request: Request, scope_token: Any, request_token: Any
    ) -> None:
        self._body = body
        self._request = request
        self._tokens: tuple[Any, ...] | None = (scope_token, request_token)

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body  # delegated in C: no per-chunk cost
        except GeneratorExit:
            raise  # the server stopped reading: the client went away (see _finish)
        except BaseException as exc:
            self._request.error = exc
            raise
        self._request.complete = True

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            _finish(self._request)
            tokens, self._tokens = self._tokens, None  # a second close() changes nothing
            if tokens is not None:
                _leave(*tokens)


def _leave(scope_token: Any, request_token: Any) -> None:
    try:
        _reset_request(request_token)
        _reset_scope(scope_token)
    except (ValueError, RuntimeError):  # closed from another context than it was called in
        context._scope.set(context.EMPTY)
        _request.set(None)


_set_scope = context._scope.set
_reset_scope = context._scope.reset
_set_request = _request.set
_reset_request = _request.reset


class _Keys:
    """What the hot path needs of a configuration, computed once per configuration."""

    __slots__ = ("config", "deadline_environ", "id_environ", "id_header", "id_lower")

    def __init__(self, cfg: config.Config | None) -> None:
        global _keys
        self.config = cfg
        if cfg is not None:
            self.id_header = cfg.id_header
            self.id_lower = cfg.id_header.lower()
            self.id_environ = _environ_key(cfg.id_header)
            self.deadline_environ = _environ_key(cfg.deadline_header)
            _keys = self


_keys = _Keys(None)


def _begin(environ: dict[str, Any], cfg: config.Config, keys: _Keys) -> tuple[Request, Scope]:
    incoming = environ.get(keys.id_environ)
    request_id = context.new_request_id()
    if incoming is not None:
        if _sane_id(incoming):
            request_id = f"{request_id}-{incoming}" if cfg.compose_request_id else incoming
        else:
            _log.debug("agent: ignoring an unusable incoming request id")
    deadline = None
    if cfg.request_timeout is not None:
        deadline = Deadline.after(cfg.request_timeout)
    header = environ.get(keys.deadline_environ)
    if header is not None:
        wall = parse_deadline(header)
        if wall is None:
            _log.debug("agent: ignoring an unparsable %s header", cfg.deadline_header)
        else:
            incoming = Deadline.at_wall_time(wall)
            if incoming is None:
                _log.debug("agent: ignoring a %s beyond a day away", cfg.deadline_header)
            deadline = context.earliest(deadline, incoming)
    relative = environ.get("HTTP_X_REQUEST_TIMEOUT")
    if relative is not None:
        seconds = _parse_seconds(relative)
        if seconds is None:
            _log.debug("agent: ignoring an unparsable X-Request-Timeout header")
        else:
            incoming = Deadline.after(seconds)
            if incoming is None:
                _log.debug("agent: ignoring an X-Request-Timeout beyond a day")
            deadline = context.earliest(deadline, incoming)
    method = str(environ.get("REQUEST_METHOD", "GET"))
    request = Request(request_id, method, cfg.soft_request_timeout)
    environ["talisker.request"] = request
    environ["REQUEST_ID"] = request_id  # talisker's name for it
    if _has_requests or _requests_installed():  # talisker's convention
        environ["requests"] = _get_session()
    return request, Scope(request_id, deadline)


_has_requests: bool | None = None


def _requests_installed() -> bool:
    global _has_requests, _get_session
    if _has_requests is None:
        found = "requests" in sys.modules
        if not found:
            import importlib.util

            found = importlib.util.find_spec("requests") is not None
        if found:
            from agent.sessions import get_session

            _get_session = get_session
        _has_requests = found
    return _has_requests


def _get_session() -> Any:  # replaced by agent.sessions.get_session once requests is found
    return None


def _environ_key(header: str) -> str:
    """The WSGI environ key of a request header (``X-Request-Id`` -> ``HTTP_X_REQUEST_ID``)."""
    return "HTTP_" + header.upper().replace("-", "_")


def _sane_id(value: str) -> bool:
    """Printable ASCII without spaces or control characters, at most 200 characters."""
    return 0 < len(value) <= MAX_ID_LENGTH and all("!" <= c <= "~" for c in value)


def _parse_seconds(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 < seconds < math.inf else None


_DEADLINE_RE: Any = None


def parse_deadline(value: str) -> float | None:
    """An ISO 8601 time with a zone (``Z`` or ``±HH:MM``) in seconds since the epoch.

    Fractional seconds are optional. Anything else, including a time without a
    zone, gives ``None``.
    """
    global _DEADLINE_RE
    if _DEADLINE_RE is None:
        import re

        _DEADLINE_RE = re.compile(
            r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d{1,9})?"
            r"(?:([Zz])|([+-])(\d\d):?(\d\d))"
        )
    match = _DEADLINE_RE.fullmatch(value.strip())
    if match is None:
        return None
    import calendar

    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        epoch: float = calendar.timegm(
            (int(year), int(month), int(day), int(hour), int(minute), int(second), 0, 0, 0)
        )
        if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31 and int(hour) < 24):
            return None
    except (ValueError, OverflowError):
        return None
    if fraction:
        epoch += float(fraction)
    if not zulu:
        offset = int(off_h) * 3600 + int(off_m) * 60
        epoch += -offset if sign == "+" else offset
    return float(epoch)


def _finish(request: Request) -> None:
    """Record the request once it is complete."""
    if request.finished:
        return
    request.finished = True
    try:
        cpu_ms = (_thread_time() - request.cpu) * 1000.0
        latency_ms = (_perf_counter() - request.start) * 1000.0
        status = request.status if request.status is not None else 500
        if request.error is None and not request.complete and request.status is not None:
            # Closed before the body was read to its end: the client went away.
            # nginx's 499 (and aio-request's), not an error of the application.
            status = CLIENT_CLOSED_REQUEST
        error = request.error is not None or status >= 500
        view = request.view or "unknown"
        metrics.record_deferred(_expand, (view, request.method, status, latency_ms, cpu_ms, error))
        soft = request.soft_timeout
        if soft is not None and latency_ms > soft * 1000.0:
            metrics.count("wsgi.soft_timeouts", 1, (("view", view), ("method", request.method)))
            _log.logger().warning(
                "agent: request %s to %s took %.0f ms, over its soft timeout of %.0f ms",
                request.request_id,
                view,
                latency_ms,
                soft * 1000.0,
            )
    except Exception:
        _log.log_once("wsgi-record", "agent: recording a WSGI request failed", exc_info=True)


def _expand(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """``wsgi.*`` metrics of a flush (runs in the metrics thread)."""
    groups: dict[tuple[Any, ...], tuple[list[float], list[float], list[int]]] = {}
    for view, method, status, latency_ms, cpu_ms, error in payloads:
        key = (view, method, status)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [], [0])
        group[0].append(latency_ms)
        group[1].append(cpu_ms)
        if error:
            group[2][0] += 1
    records: list[tuple[int, str, Any, Any]] = []
    for (view, method, status), (latencies, cpus, errors) in groups.items():
        tags = (("view", view), ("method", method), ("status", status))
        records.append((metrics.COUNT, "wsgi.requests", len(latencies), tags))
        records.append((metrics.TIMING, "wsgi.latency", latencies, tags))
        records.append((metrics.TIMING, "wsgi.cpu", cpus, tags))
        if errors[0]:
            records.append((metrics.COUNT, "wsgi.errors", errors[0], tags))
    return records


def request_timeout(timeout_ms: float | None = None, soft_timeout_ms: float | None = None) -> Any:
    """Decorator for a view: its own deadline and soft timeout, in milliseconds.

    The deadline applies to what the view does (the earliest of it and the
    request's wins); the soft timeout replaces ``TALISKER_SOFT_REQUEST_TIMEOUT``
    for requests served by this view.
    """

    def decorator(view: F) -> F:
        import functools

        @functools.wraps(view)
        def timed_view(*args: Any, **kwargs: Any) -> Any:
            request = _request.get()
            if request is not None and soft_timeout_ms is not None:
                request.soft_timeout = soft_timeout_ms / 1000.0
            if timeout_ms is None:
                return view(*args, **kwargs)
            with context.deadline(timeout_ms / 1000.0):
                return view(*args, **kwargs)

        return timed_view  # type: ignore[return-value]

    return decorator
