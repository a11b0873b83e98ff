"""The server side for ASGI applications: a request scope and metrics per HTTP request.

``TaliskerMiddleware(app)`` wraps any ASGI 3 application; Starlette and FastAPI
applications are wrapped automatically (``agent/instrumentation/starlette.py``).
Per request, as for WSGI (:mod:`agent.wsgi`): the request id, the deadline
(``X-Request-Deadline``, ``X-Request-Timeout``, ``TALISKER_REQUEST_TIMEOUT``), the
priority; the response carries ``X-Request-Id`` and ``X-View-Name`` (the route's
name, never a path with ids in it); ``asgi.requests``, ``asgi.errors`` and
``asgi.latency`` once the response has been sent, a client that went away
recorded as 499.

There is no ``asgi.cpu``: on an event loop, the thread's CPU time between the
start and the end of a request counts every other request served meanwhile.
Lifespan and websocket scopes pass through untouched.
"""

from __future__ import annotations

import asyncio

from agent import _log, config, context
from agent.http import server
from agent.propagation import PRIORITY_HEADER, TIMEOUT_HEADER, VIEW_HEADER

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping
    from typing import Any

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["TaliskerMiddleware"]

_KEY = "talisker.request"  # in the ASGI scope: an outer layer handles this request


class TaliskerMiddleware:
    """ASGI middleware: request id, deadline, response headers and metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cfg = config.current
        if cfg is None or scope.get("type") != "http" or _KEY in scope:
            return await self.app(scope, receive, send)
        try:
            request, request_scope = _begin(scope, cfg)
        except Exception:
            _log.log_once("asgi-begin", "agent: reading an ASGI request failed", exc_info=True)
            return await self.app(scope, receive, send)
        scope[_KEY] = request
        id_header = cfg.id_header.lower().encode("latin-1")
        disconnected = False

        async def talisker_send(message: Message) -> None:
            nonlocal disconnected
            kind = message.get("type")
            if kind == "http.response.start":
                message = _with_headers(message, scope, request, id_header)
            try:
                await send(message)
            except BaseException:
                disconnected = True  # the client went away: not the application's error
                raise
            if kind == "http.response.body" and not message.get("more_body", False):
                request.complete = True

        scope_token = context._scope.set(request_scope)  # it carries the request (current_request)
        try:
            await self.app(scope, receive, talisker_send)
        except BaseException as exc:
            if disconnected or isinstance(exc, asyncio.CancelledError):
                # The client went away (the server cancels the task, or a send fails).
                if request.status is None:
                    request.status = server.CLIENT_CLOSED_REQUEST
            else:
                request.error = exc
            raise
        finally:
            server.finish(request)
            try:
                context._scope.reset(scope_token)
            except ValueError:  # left from another context than it was entered in
                context._scope.set(context.EMPTY)


_wanted: tuple[Any, dict[bytes, int]] = (None, {})  # (config, header name -> slot)


def _header_slots(cfg: config.Config) -> dict[bytes, int]:
    """The request headers read, lower-cased bytes -> slot: computed once per configuration."""
    global _wanted
    if _wanted[0] is not cfg:
        names = (cfg.id_header, cfg.deadline_header, TIMEOUT_HEADER, PRIORITY_HEADER)
        _wanted = (cfg, {name.lower().encode("latin-1"): i for i, name in enumerate(names)})
    return _wanted[1]


def _begin(scope: Scope, cfg: config.Config) -> tuple[server.Request, context.Scope]:
    wanted = _header_slots(cfg)
    found: list[str | None] = [None, None, None, None]
    for name, value in scope.get("headers") or ():
        index = wanted.get(bytes(name).lower())
        if index is not None and found[index] is None:
            found[index] = value.decode("latin-1")
    request, request_scope = server.begin(
        cfg, str(scope.get("method", "GET")), found[0], found[1], found[2], found[3]
    )
    request.kind = "asgi"
    return request, request_scope


def _with_headers(
    message: Message, scope: Scope, request: server.Request, id_header: bytes
) -> Message:
    """``http.response.start`` with the status noted and ``X-Request-Id``/``X-View-Name`` added."""
    try:
        request.status = int(message["status"])
        headers = list(message.get("headers") or ())
        names = {bytes(name).lower() for name, _ in headers}
        if id_header not in names:
            headers.append((id_header, request.request_id.encode("latin-1")))
        view = request.view or _view(scope)
        if view:
            request.view = view
            if b"x-view-name" not in names:
                headers.append((VIEW_HEADER.lower().encode(), view.encode("latin-1", "replace")))
        else:
            for name, value in headers:
                if bytes(name).lower() == b"x-view-name":
                    request.view = bytes(value).decode("latin-1")
        return {**message, "headers": headers}
    except Exception:
        _log.log_once("asgi-headers", "agent: adding response headers failed", exc_info=True)
        return message


def _view(scope: Scope) -> str | None:
    """The route's name (Starlette and FastAPI put the route matched in the scope)."""
    route = scope.get("route")
    name = getattr(route, "name", None) or getattr(route, "path", None)
    if isinstance(name, str) and name:
        return name
    endpoint = scope.get("endpoint")
    name = getattr(endpoint, "__name__", None)
    return name if isinstance(name, str) else None
