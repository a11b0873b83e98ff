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

import sys
import threading
import time

from agent import _fork, _log, config, context, propagation
from agent.context import Scope
from agent.http import server
from agent.http.server import Request
from agent.propagation import VIEW_HEADER, parse_deadline

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])
    StartResponse = Callable[..., Any]
    WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
    #: ``serve(app, environ, start_response)``: what :func:`app_server` makes.
    Serve = Callable[[WSGIApp, dict[str, Any], StartResponse], Iterable[bytes]]
    #: wrapt's wrapper signature: ``(wrapped, instance, args, kwargs)``.
    AppWrapper = Callable[
        [Callable[..., Iterable[bytes]], Any, tuple[Any, ...], dict[str, Any]], Iterable[bytes]
    ]

__all__ = ["TaliskerMiddleware", "current_request", "parse_deadline", "request_timeout"]

_finish = server.finish
_scope_for = server.scope_for
_new_request_id = context.new_request_id
_request_id_for = propagation.request_id_for
_perf_counter = time.perf_counter
_thread_time = time.thread_time
_new = object.__new__
_NO_EXC_INFO: Any = object()  # start_response called without exc_info
#: The incoming request being served in this context, or ``None`` (the request
#: scope carries it: see :func:`agent.http.server.current_request`).
current_request = server.current_request


class TaliskerMiddleware:
    """WSGI middleware: request id, deadline, response headers and metrics.

    ``TaliskerMiddleware(app)``. The view name comes from ``environ["talisker.view"]``
    if the application sets it, else from an ``X-View-Name`` response header it
    sends, else ``unknown``. Flask applications need no middleware.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _serve(self.app, environ, start_response)


def app_server(
    view_of: Callable[[dict[str, Any]], str | None] | None = None,
) -> Serve:
    """A function ``serve(app, environ, start_response)`` that serves one WSGI request.

    Each call ``app(environ, start_response)`` is served inside a request scope;
    ``view_of(environ)``, when given, names the view once the application starts its
    response. An outer layer that already handles the request (``TaliskerMiddleware``
    around an instrumented Flask application) is left to it, and told of ``view_of``.
    One function per integration, so that it is the request's one frame of the agent
    until the response is started (shared by the integrations). Its parameters are
    named as a WSGI application's, so that an application bound to it (see
    :func:`agent.registry`'s ``bound_call``) refuses a bad call as the original would.
    """

    exchange = _Exchange
    if view_of is not None:  # read from the class: one store less per request
        attrs = {"__slots__": (), "__doc__": _Exchange.__doc__, "_view_of": staticmethod(view_of)}
        exchange = type("_Exchange", (_Exchange,), attrs)  # type: ignore[assignment]

    def serve(
        wsgi_app: Callable[..., Iterable[bytes]],
        environ: dict[str, Any],
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        cfg = config.current
        if cfg is None:
            return wsgi_app(environ, start_response)  # off
        if "talisker.request" in environ:  # an outer layer handles this request
            outer = environ["talisker.request"]
            if view_of is not None and outer is not None and outer.view is None:
                environ.setdefault("talisker.view_of", view_of)  # let it name the view
            return wsgi_app(environ, start_response)
        try:
            keys = _keys
            if keys.config is not cfg:
                keys = _Keys(cfg)
            incoming_id = environ.get(keys.id_environ)
            deadline_header = environ.get(keys.deadline_environ)
            timeout_header = environ.get("HTTP_X_REQUEST_TIMEOUT")
            priority_header = environ.get("HTTP_X_REQUEST_PRIORITY")
            # An _Exchange without the cost of a Python __init__: every slot is set here
            # or, _body and _scope_token, before it is read (tests/test_wsgi.py checks
            # that none is left out).
            request = _new(exchange)
            if (
                deadline_header is None
                and timeout_header is None
                and priority_header is None
                and keys.no_timeout
            ):  # the common case, server.scope_for's first branch inline
                request_id: str = _new_request_id()
                if incoming_id is not None:
                    request_id = _request_id_for(incoming_id, request_id, keys.compose)
                scope = Scope(request_id, None, None, None, False, None, None, request)
            else:
                scope = _scope_for(
                    cfg, incoming_id, deadline_header, timeout_header, priority_header
                )
                scope.request = request
                request_id = scope.request_id  # type: ignore[assignment]  # always set here
            request.request_id = request_id
            method = environ.get("REQUEST_METHOD", "GET")
            request.method = method if type(method) is str else str(method)
            request.soft_timeout = keys.soft_timeout
            request.view = None
            request.status = None
            request.error = None
            request.complete = False
            request.finished = False
            request._environ = environ
            request._start_response = start_response
            request._keys = keys
            request.start = _perf_counter()  # where Request.__init__ reads them, as before
            request.cpu = _thread_time()
            environ["talisker.request"] = request
            environ["REQUEST_ID"] = request_id  # talisker's name for it
            if _has_requests or _requests_installed():  # talisker's convention
                try:
                    environ["requests"] = _thread.session
                except AttributeError:  # the thread's first request
                    environ["requests"] = _thread.session = _get_session()
        except Exception:
            _log.log_once("wsgi-begin", "agent: reading a WSGI request failed", exc_info=True)
            return wsgi_app(environ, start_response)
        scope_token = request._scope_token = _set_scope(scope)  # the scope carries the request
        try:
            body = wsgi_app(environ, request.start_response)
        except BaseException as exc:
            request.error = exc
            request._environ = None
            _finish(request)
            _leave(scope_token)
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is not None:
            try:
                is_file = isinstance(body, file_wrapper)
            except TypeError:  # not a class
                is_file = False
            if is_file:
                # The server's own file wrapper: given back as it is, so the server still
                # sends it with sendfile(); the request is recorded when the server closes it.
                try:
                    close = _FileClose(getattr(body, "close", None), request, scope_token)
                    setattr(body, "close", close)  # noqa: B010 - an attribute Iterable does not declare
                    request._scope_token = None
                    return body
                except Exception:
                    pass  # a wrapper that takes no attribute: iterated through the exchange
        request._body = body
        return request

    return serve


def app_wrapper(serve: Serve) -> AppWrapper:
    """The wrapt wrapper ``(wrapped, instance, args, kwargs)`` that hands a WSGI call to
    ``serve`` (from :func:`app_server`); any other call goes through untouched."""

    def wrapper(
        wrapped: Callable[..., Iterable[bytes]],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Iterable[bytes]:
        if kwargs or len(args) != 2:
            return wrapped(*args, **kwargs)  # not a WSGI call
        return serve(wrapped, args[0], args[1])

    return wrapper


class _Exchange(Request):
    """One request served: its record, the ``start_response`` the application is
    given (a bound method) and the body given back to the server.

    One object per request, not a record, a closure and a body wrapper. On
    ``close()`` the request is recorded and its scope left.
    """

    __slots__ = (
        "_body",
        "_environ",
        "_keys",
        "_scope_token",
        "_start_response",
    )
    _body: Iterable[bytes] | None
    _environ: dict[str, Any] | None
    _keys: _Keys
    _scope_token: Any
    _start_response: StartResponse
    #: Class attributes, never set on an exchange: read without a store per request.
    kind = "wsgi"
    #: Names the view from the environ: an integration's subclass sets it (app_server).
    _view_of: Callable[[dict[str, Any]], str | None] | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = _NO_EXC_INFO
    ) -> Any:
        """The application's ``start_response``: notes the status, adds the two headers."""
        try:
            try:
                self.status = _status_codes[status]
            except KeyError:
                self.status = _status_code(status)
            keys = self._keys
            kinds = keys.header_kinds
            has_id = False
            sent_view = None
            for name, value in headers:
                try:
                    kind = kinds[name]
                except KeyError:
                    kind = keys.header_kind(name)
                if kind:
                    if kind == _ID:
                        has_id = True
                    else:
                        sent_view = value
            if not has_id:
                headers.append((keys.id_header, self.request_id))
            view = self.view
            if not view:
                environ: Any = self._environ
                view_of = self._view_of
                if view_of is not None:
                    view = view_of(environ)  # a str or None
                if not view:
                    inner = environ.get("talisker.view_of")  # set by an integration inside us
                    view = (inner(environ) if inner is not None else None) or environ.get(
                        "talisker.view"
                    )
                    if view:
                        view = str(view)  # the application's: any object
            if view:
                self.view = view
                if sent_view is None:
                    headers.append((VIEW_HEADER, view))
            else:
                self.view = sent_view
        except Exception:
            _log.log_once("wsgi-headers", "agent: adding response headers failed", exc_info=True)
        if exc_info is _NO_EXC_INFO:
            return self._start_response(status, headers)
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body  # type: ignore[misc]  # delegated in C: no per-chunk cost
        except GeneratorExit:
            raise  # the server stopped reading: the client went away (see _finish)
        except BaseException as exc:
            self.error = exc
            raise
        self.complete = True

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._environ = None  # it holds this exchange: no cycle left for the collector
            _finish(self)
            scope_token = self._scope_token
            if scope_token is not None:  # a second close() changes nothing
                self._scope_token = None
                try:  # _leave(), inline
                    _reset_scope(scope_token)
                except (ValueError, RuntimeError):  # closed in another context than called in
                    context._scope.set(context.EMPTY)


class _FileClose:
    """``close`` of a response in the server's file wrapper: records the request.

    The server sends such a body itself (often with ``sendfile()``), so the agent
    cannot see whether it was sent whole; it is recorded as complete.
    """

    __slots__ = ("_close", "_request", "_token")

    def __init__(self, close: Callable[[], Any] | None, request: Request, scope_token: Any) -> None:
        self._close = close
        self._request = request
        self._token: Any = scope_token

    def __call__(self) -> None:
        try:
            if self._close is not None:
                self._close()
        finally:
            request = self._request
            if isinstance(request, _Exchange):
                request._environ = None  # it holds the exchange: no cycle left for the collector
            request.complete = True
            _finish(request)
            token, self._token = self._token, None
            if token is not None:
                _leave(token)


def _leave(scope_token: Any) -> None:
    try:
        _reset_scope(scope_token)
    except (ValueError, RuntimeError):  # closed from another context than it was called in
        context._scope.set(context.EMPTY)


_set_scope = context._scope.set
_reset_scope = context._scope.reset


#: ``status line -> code``: parsing it costs more than the rest of ``start_response``.
_status_codes: dict[str, int] = {}
#: What :class:`_Keys` caches at most, of status lines and of header names.
_CACHED = 256


def _status_code(status: str) -> int:
    code = int(status[:3])
    if len(_status_codes) < _CACHED:
        _status_codes[status] = code
    return code


_OTHER, _ID, _VIEW = 0, 1, 2  # what a response header is to the agent


class _Keys:
    """What the hot path needs of a configuration, computed once per configuration."""

    __slots__ = (
        "compose",
        "config",
        "deadline_environ",
        "header_kinds",
        "id_environ",
        "id_header",
        "id_lower",
        "no_timeout",
        "soft_timeout",
    )

    def __init__(self, cfg: config.Config | None) -> None:
        global _keys
        self.config = cfg
        #: ``response header name -> _ID, _VIEW or _OTHER``, as the application spells it.
        self.header_kinds: dict[str, int] = {}
        if cfg is not None:
            self.id_header = cfg.id_header
            self.id_lower = cfg.id_header.lower()
            self.id_environ = _environ_key(cfg.id_header)
            self.deadline_environ = _environ_key(cfg.deadline_header)
            self.compose = cfg.compose_request_id
            self.no_timeout = not cfg.request_timeout
            self.soft_timeout = cfg.soft_request_timeout
            _keys = self

    def header_kind(self, name: str) -> int:
        """What the response header ``name`` is (case-insensitive); remembered."""
        lowered = name.lower()
        kind = _ID if lowered == self.id_lower else _VIEW if lowered == "x-view-name" else _OTHER
        if len(self.header_kinds) < _CACHED:
            self.header_kinds[name] = kind
        return kind


_keys = _Keys(None)


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


#: ``session``: what :func:`agent.sessions.get_session` gave this thread (it keeps one per
#: thread, so asking it once per thread is enough); forgotten in a forked child, as it is.
_thread = threading.local()


def _forget_sessions_after_fork() -> None:
    global _thread
    _thread = threading.local()


_fork.after_in_child(_fork.RESET, _forget_sessions_after_fork)


def _environ_key(header: str) -> str:
    """The WSGI environ key of a request header (``X-Request-Id`` -> ``HTTP_X_REQUEST_ID``)."""
    return "HTTP_" + header.upper().replace("-", "_")


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
            request = current_request()
            if request is not None and soft_timeout_ms is not None:
                request.soft_timeout = soft_timeout_ms / 1000.0
            if timeout_ms is None:
                return view(*args, **kwargs)
            with context.deadline(timeout_ms / 1000.0):
                return view(*args, **kwargs)

        return timed_view  # type: ignore[return-value]

    return decorator


#: What ``TaliskerMiddleware`` serves a request with: no view_of of its own.
_serve = app_server()
