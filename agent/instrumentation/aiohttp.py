"""aiohttp's client: request ids, deadlines as its timeout, one record per logical request.

``ClientSession._request`` is wrapped: every ``session.get(...)``, ``.post``,
``.request`` and ``.ws_connect``'s handshake goes through it, and aiohttp follows
redirects inside it. It is the narrowest point that is stable across aiohttp 3.x
(its per-attempt client middlewares exist only from 3.12; trace configs must be
given when a session is made, which code written without the agent does not
do). So the headers are added once per logical request and the deadline bounds
the whole call through aiohttp's own ``ClientTimeout.total``: what a deadline
means. A redirect's request carries the same headers, but for
``X-Request-Timeout``, the time left then: ``ClientRequest.update_headers``, which
every request aiohttp makes runs, is wrapped for that.

The server: ``Application._handle`` (every request of the root application)
runs in a request scope, as WSGI and ASGI requests do; the response carries
``X-Request-Id`` and ``X-View-Name`` (the route's name, else its template);
``aiohttp.*`` metrics, without ``cpu`` (see ``docs/server.md``).

Loaded by the registry when ``aiohttp.client`` or ``aiohttp.web_app`` is imported.
"""

from __future__ import annotations

import sys

# aiohttp.client, not the package: the registry loads this module when
# aiohttp.client has been imported, while aiohttp's own __init__ may still be
# running (its names are not bound yet).
from aiohttp.client import ClientConnectionError, ClientTimeout, ServerTimeoutError
from multidict import CIMultiDict  # both imported by aiohttp.client already
from yarl import URL

from agent import _log, config, context, naming, propagation
from agent.http import breaker, client
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from agent.config import Config

#: The versions of aiohttp this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((3, 8), (4,))

_current_call = client.current_call
_time_left = context.time_left
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def installed_version() -> str:
    """The version of aiohttp imported."""
    return str(getattr(sys.modules.get("aiohttp"), "__version__", ""))  # its first line


class DeadlineExceeded(context.DeadlineExceeded, ServerTimeoutError):
    """The deadline has passed; the request was not sent.

    An ``agent.DeadlineExceeded`` that is also aiohttp's ``ServerTimeoutError``
    (an ``asyncio.TimeoutError``), as aiohttp's own timeouts are.
    """


class CircuitOpen(breaker.CircuitOpen, ClientConnectionError):
    """The circuit to the peer is open; the request was not sent (also aiohttp's
    ``ClientConnectionError``, as a refused connection is)."""


def request_wrapper(
    wrapped: Callable[..., Any], session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``ClientSession._request(method, url, **kwargs)``."""
    cfg = config.current
    if cfg is None or _current_call() is not None:
        return wrapped(*args, **kwargs)
    try:
        call = client.begin(str(args[0] if args else kwargs.get("method", "GET")))
    except Exception:
        _log.log_once("aiohttp-begin", "agent: starting an aiohttp record failed", exc_info=True)
        call = None
    if call is None:  # inside agent.suppress(), or the agent failed
        return wrapped(*args, **kwargs)
    return _request(cfg, call, wrapped, session, args, kwargs)


async def _request(
    cfg: Config,
    call: client.Call,
    wrapped: Callable[..., Any],
    session: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    token = client.enter(call)
    try:
        _prepare(cfg, call, session, args, kwargs)
        response = await wrapped(*args, **kwargs)
    except Exception as exc:
        _finish(call, None, exc)
        raise
    except BaseException:  # cancelled or interrupted: the caller gave up on it
        client.abandoned(call)
        raise
    finally:
        client.end(token)
    try:
        redirects = len(response.history)
        if redirects:
            call.attempts += redirects
            call.reasons = ["redirect"] * redirects
        if call.view is None:  # client.finish's X-View-Name, by aiohttp's own get
            call.view = response.headers.get(propagation.VIEW_HEADER) or "unknown"
        client.finish(call, response.status, None, None)
    except Exception:
        _log.log_once("aiohttp-record", "agent: recording an aiohttp call failed", exc_info=True)
    return response


def _prepare(
    cfg: Config, call: client.Call, session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """The deadline and circuit checks, the headers and the timeout of the call."""
    url = args[1] if len(args) > 1 else kwargs.get("str_or_url")
    call.peer = _peer(session, url)
    deadline = call.deadline
    left = None
    if deadline is not None:
        left = _time_left(deadline, DeadlineExceeded, "; request not sent")
    if cfg.circuit_breaker:
        found = call.breaker = breaker.breaker_for(cfg.circuit_breaker, call.peer or "unknown")
        if found is not None and not found.allow():
            raise CircuitOpen(f"the circuit to {found.peer} is open; request not sent")
    call.attempts = 1
    try:
        kwargs["headers"] = _headers(kwargs.get("headers"), session, call, cfg, left)
        if left is not None:
            cut = _cut_timeout(kwargs.get("timeout", _UNSET), session, left)
            if cut is not None:
                kwargs["timeout"] = cut
                call.deadline_bound = True
    except Exception:
        _log.log_once("aiohttp-attempt", "agent: preparing an aiohttp call failed", exc_info=True)


_UNSET = object()


def _headers(given: Any, session: Any, call: client.Call, cfg: Config, left: float | None) -> Any:
    """The call's headers with ours added, unless the call or the session set them.

    ``left`` is the time left, just read. A call without headers of its own or its
    session's (the common one) gets a plain dict of ours, as a caller would pass:
    aiohttp merges it with the session's defaults as it merges any.
    """
    defaults = getattr(session, "_default_headers", None)
    if not given and not defaults:
        return propagation.attempt_headers(None, call, cfg, None, left)
    merged = CIMultiDict(defaults or {})
    own = CIMultiDict(given or {})
    merged.update(own)
    added = propagation.attempt_headers(merged, call, cfg, lambda headers: headers.copy())
    for name in added:  # only what is ours goes into the call's own headers
        if name not in merged:
            own[name] = added[name]
    return own


def _cut_timeout(given: Any, session: Any, left: float) -> ClientTimeout | None:
    """aiohttp's timeout with its ``total`` (and no other part) longer than the time left.

    ``ceil_threshold`` is raised above the time left: aiohttp rounds a timeout of
    that many seconds or more up to a whole second, which would end it after the
    deadline.
    """
    timeout = session._timeout if given is _UNSET else given
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = ClientTimeout(total=timeout)
    elif timeout is None:
        timeout = ClientTimeout()
    if not isinstance(timeout, ClientTimeout):
        return None  # what aiohttp will refuse or reads otherwise: left as it is
    if timeout.total is not None and timeout.total <= left:
        return None  # already ends before the deadline
    # Each part that is set, bounded by the time left (written out: no helper frame).
    connect, sock_read, sock_connect = timeout.connect, timeout.sock_read, timeout.sock_connect
    return ClientTimeout(
        total=left,
        connect=left if connect is not None and connect > left else connect,
        sock_read=left if sock_read is not None and sock_read > left else sock_read,
        sock_connect=left if sock_connect is not None and sock_connect > left else sock_connect,
        ceil_threshold=max(getattr(timeout, "ceil_threshold", 5), left + 1),
    )


#: A call's absolute URL, as given -> its ``(host, port)``: a URL is parsed once, not
#: on every call to it. Not kept: a relative URL (its session's ``base_url`` decides),
#: one with user info, a query or a fragment. Cleared when full.
_ENDPOINTS: dict[str, tuple[str, int | None]] = {}
_ENDPOINTS_LIMIT = 1024
_cached_peer = naming.cached


def _peer(session: Any, url: Any) -> str | None:
    try:
        text = str(url)
        endpoint = _ENDPOINTS.get(text)
        if endpoint is None:
            target = URL(text)
            absolute = target.is_absolute()
            base = getattr(session, "_base_url", None)
            if not absolute and base is not None:
                target = base.join(target)
            if not target.host:
                return None
            endpoint = (target.host, target.port or _DEFAULT_PORTS.get(target.scheme))
            if absolute and not any(c in text for c in "@?#"):
                if len(_ENDPOINTS) >= _ENDPOINTS_LIMIT:
                    _ENDPOINTS.clear()
                _ENDPOINTS[text] = endpoint
        return _cached_peer(endpoint) or naming.peer_name(*endpoint)
    except Exception:
        return None


def _finish(call: client.Call, response: Any, error: BaseException | None) -> None:
    client.record(call, response, error, "status")


# -- the server ------------------------------------------------------------------------


def handle_wrapper(
    wrapped: Callable[..., Any], app: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``Application._handle(request)``: the root application's every request."""
    cfg = config.current
    if cfg is None or len(args) != 1 or kwargs:
        return wrapped(*args, **kwargs)
    return _handle(cfg, wrapped, args[0])


async def _handle(cfg: Config, wrapped: Callable[..., Any], web_request: Any) -> Any:
    from agent.http import server

    try:
        headers = web_request.headers
        request, scope = server.begin(
            cfg,
            str(web_request.method),
            headers.get(cfg.id_header),
            headers.get(cfg.deadline_header),
            headers.get(propagation.TIMEOUT_HEADER),
            headers.get(propagation.PRIORITY_HEADER),
        )
        request.kind = "aiohttp"
    except Exception:
        _log.log_once("aiohttp-begin", "agent: reading an aiohttp request failed", exc_info=True)
        return await wrapped(web_request)
    scope_token = context._scope.set(scope)  # it carries the request (current_request)
    try:
        response = await wrapped(web_request)
    except BaseException as exc:
        status = getattr(exc, "status", None)  # an HTTPException is a response
        if isinstance(status, int):
            request.status = status
            request.complete = True
            _name(request, web_request)
            if status >= 500:
                request.error = exc
        elif _is_cancelled(exc):  # the client went away and aiohttp cancelled the handler
            request.status = request.status or server.CLIENT_CLOSED_REQUEST
        else:
            request.error = exc
        raise
    else:
        try:
            request.status = int(response.status)
            request.complete = True
            _name(request, web_request)
            if not response.prepared:  # a streamed response has sent its headers already
                response_headers = response.headers
                if cfg.id_header not in response_headers:
                    response_headers[cfg.id_header] = request.request_id
                if request.view and propagation.VIEW_HEADER not in response_headers:
                    response_headers[propagation.VIEW_HEADER] = request.view
        except Exception:
            _log.log_once("aiohttp-headers", "agent: adding response headers failed", exc_info=True)
        return response
    finally:
        server.finish(request)
        try:
            context._scope.reset(scope_token)
        except ValueError:  # pragma: no cover - left from another context
            context._scope.set(context.EMPTY)


def _name(request: Any, web_request: Any) -> None:
    """The view: the route's name, else its resource's template (never a path with ids)."""
    try:
        route = web_request.match_info.route
        name = getattr(route, "name", None)
        if not name:
            resource = getattr(route, "resource", None)
            name = getattr(resource, "canonical", None)
        if isinstance(name, str) and name:
            request.view = name
    except Exception:
        pass


def _is_cancelled(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)


def update_headers_wrapper(
    wrapped: Callable[..., Any], request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Around ``ClientRequest.update_headers`` (wrapt's, where :func:`direct_update_headers`
    does not fit)."""
    wrapped(*args, **kwargs)
    call = _current_call()
    if call is not None and call.timeout_sent is not None:
        _redirect_timeout(call, request)


def direct_update_headers(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ClientRequest.update_headers`` as a plain function around ``original``: every
    request aiohttp makes runs it, and a wrapt patch costs twice this."""

    def update_headers(self: Any, headers: Any) -> None:
        original(self, headers)
        call = _current_call()
        if call is not None and call.timeout_sent is not None:
            _redirect_timeout(call, self)

    return update_headers


def _redirect_timeout(call: client.Call, request: Any) -> None:
    """A redirect's ``X-Request-Timeout`` is the time left when it is made, not what the
    first request was sent with; the caller's own is left alone."""
    try:
        call.hops += 1
        if call.hops == 1 or call.deadline is None:
            return  # the first request: its header was made just now
        headers = request.headers
        if headers.get(propagation.TIMEOUT_HEADER) == call.timeout_sent:  # ours
            left = propagation.seconds_left(call.deadline)
            headers[propagation.TIMEOUT_HEADER] = call.timeout_sent = left
    except Exception:
        _log.log_once(
            "aiohttp-redirect", "agent: updating a redirect's headers failed", exc_info=True
        )


PATCHES = (
    Patch("aiohttp.client", "ClientSession._request", request_wrapper),
    Patch(
        "aiohttp.client_reqrep",
        "ClientRequest.update_headers",
        update_headers_wrapper,
        direct=direct_update_headers,
    ),
    Patch("aiohttp.web_app", "Application._handle", handle_wrapper),
)

__all__ = ["PATCHES", "SUPPORTED", "CircuitOpen", "DeadlineExceeded", "installed_version"]
