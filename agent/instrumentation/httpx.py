"""httpx (sync and async): request ids, deadlines as timeouts, one record per logical request.

``Client.send`` / ``AsyncClient.send`` is the logical request: httpx follows
redirects inside it, each one a new request to the transport. The transports'
``HTTPTransport.handle_request`` / ``AsyncHTTPTransport.handle_async_request``
are the attempts (OpenTelemetry wraps the transports too: mounted and custom
transports built on them are covered): each checks the deadline and the
peer's circuit, gets the id, deadline and priority headers and the timeouts cut
to the time left. A transport used without a client records the call itself.

What the transport is given is put back after it has read it: the application's
``Request`` (``response.request``) keeps its own headers and timeout extension.

Loaded by the registry when ``httpx`` is imported.
"""

from __future__ import annotations

from types import MethodType as _MethodType

import httpx

from agent import _log, config, context, naming, propagation
from agent.http import breaker, client
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from agent.config import Config

#: The versions of httpx this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((0, 23), (1,))

_current_call = client.current_call
_current_sync_call = client.current_sync_call
_time_left = context.time_left
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def installed_version() -> str:
    """The version of httpx imported."""
    return str(getattr(httpx, "__version__", ""))


class DeadlineExceeded(context.DeadlineExceeded, httpx.TimeoutException):
    """The deadline has passed; the request was not sent.

    An ``agent.DeadlineExceeded`` (a built-in ``TimeoutError``) that is also an
    ``httpx.TimeoutException``, so code that handles httpx's timeouts handles it.
    """

    def __init__(self, message: str, *, request: Any = None) -> None:
        Exception.__init__(self, message)
        self._request = request

    def __reduce__(self) -> Any:
        return (type(self), (str(self),))


class CircuitOpen(breaker.CircuitOpen, httpx.ConnectError):
    """The circuit to the peer is open; the request was not sent (also ``httpx.ConnectError``)."""

    def __init__(self, message: str, *, request: Any = None) -> None:
        Exception.__init__(self, message)
        self._request = request

    def __reduce__(self) -> Any:
        return (type(self), (str(self),))


# -- the logical request -------------------------------------------------------------


def send_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``Client.send``: the record of the logical request."""
    call = _begin(args, kwargs, _current_sync_call)
    if call is None:
        return wrapped(*args, **kwargs)
    token = client.enter_sync(call)
    try:
        response = wrapped(*args, **kwargs)
    except Exception as exc:
        _finish(call, None, exc)
        raise
    except BaseException:  # cancelled or interrupted: the caller gave up on it
        client.abandoned(call)
        raise
    finally:
        client.end_sync(token)
    _finish(call, response, None)
    return response


def send_async_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``AsyncClient.send``: the record of the logical request."""
    call = _begin(args, kwargs, _current_call)
    if call is None:
        return wrapped(*args, **kwargs)
    return _send_async(call, wrapped, args, kwargs)


async def _send_async(
    call: client.Call, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    token = client.enter(call)
    try:
        response = await wrapped(*args, **kwargs)
    except Exception as exc:
        _finish(call, None, exc)
        raise
    except BaseException:  # cancelled or interrupted: the caller gave up on it
        client.abandoned(call)
        raise
    finally:
        client.end(token)
    _finish(call, response, None)
    return response


def _begin(
    args: tuple[Any, ...], kwargs: dict[str, Any], current: Callable[[], client.Call | None]
) -> client.Call | None:
    """A new logical request for ``send(request, ...)``; None when there is none to make.

    ``current`` is the call in flight of the layer's kind (synchronous or asynchronous).
    """
    if config.current is None or current() is not None:
        return None
    try:
        request = args[0] if args else kwargs.get("request")
        call = client.begin(str(getattr(request, "method", "GET")))
        if call is not None:
            call.peer = _peer(request)
        return call
    except Exception:
        _log.log_once("httpx-begin", "agent: starting an httpx record failed", exc_info=True)
        return None


def _finish(call: client.Call, response: Any, error: BaseException | None) -> None:
    client.record(call, response, error, "status_code")


# -- attempts ------------------------------------------------------------------------------


def handle_request_wrapper(
    wrapped: Callable[..., Any], transport: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``HTTPTransport.handle_request``: one attempt."""
    cfg = config.current
    if cfg is None:
        return wrapped(*args, **kwargs)
    call = _current_sync_call()
    if call is None:  # the transport used without a client: the call is this attempt
        call = _begin(args, kwargs, _current_sync_call)
        if call is None:
            return wrapped(*args, **kwargs)
        token = client.enter_sync(call)
        try:
            response = handle_request_wrapper(wrapped, transport, args, kwargs)
        except Exception as exc:
            _finish(call, None, exc)
            raise
        except BaseException:  # cancelled or interrupted: the caller gave up on it
            client.abandoned(call)
            raise
        finally:
            client.end_sync(token)
        _finish(call, response, None)
        return response
    request = args[0] if args else kwargs.get("request")
    saved = _prepare(request, call, cfg)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _restore(request, saved)


def handle_async_request_wrapper(
    wrapped: Callable[..., Any], transport: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``AsyncHTTPTransport.handle_async_request``: one attempt."""
    if config.current is None:
        return wrapped(*args, **kwargs)
    return _handle_async(wrapped, args, kwargs)


async def _handle_async(
    wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    cfg = config.current
    call = _current_call()
    if cfg is None:
        return await wrapped(*args, **kwargs)
    if call is None:
        call = _begin(args, kwargs, _current_call)
        if call is None:
            return await wrapped(*args, **kwargs)
        token = client.enter(call)
        try:
            response = await _handle_async(wrapped, args, kwargs)
        except Exception as exc:
            _finish(call, None, exc)
            raise
        except BaseException:  # cancelled or interrupted: the caller gave up on it
            client.abandoned(call)
            raise
        finally:
            client.end(token)
        _finish(call, response, None)
        return response
    request = args[0] if args else kwargs.get("request")
    saved = _prepare(request, call, cfg)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        _restore(request, saved)


def _prepare(request: Any, call: client.Call, cfg: Config) -> tuple[Any, Any] | None:
    """Check the deadline and the circuit; give ``request`` the headers and the timeouts.

    Returns what :func:`_restore` puts back (None when nothing was changed).
    """
    deadline = call.deadline
    left = None
    if deadline is not None:
        left = _time_left(deadline, DeadlineExceeded, "; request not sent")
    if cfg.circuit_breaker:
        found = call.breaker
        if found is None and not call.attempts:
            found = call.breaker = breaker.breaker_for(cfg.circuit_breaker, call.peer or "unknown")
        if found is not None and not found.allow():
            raise CircuitOpen(f"the circuit to {found.peer} is open; request not sent")
    try:
        call.attempts += 1
        if call.attempts > 1:
            call.next_reason = "redirect"  # httpx follows redirects, and retries nothing
            client.retried(call, None)
        headers, extensions = request.headers, request.extensions
        added = _with_ours(headers, call, cfg, left)
        if left is not None:
            cut = _cut_timeouts(extensions.get("timeout"), left, call)
            if cut is not None:
                request.extensions = {**extensions, "timeout": cut}
        request.headers = added
        return headers, extensions
    except Exception:
        _log.log_once("httpx-attempt", "agent: preparing an httpx request failed", exc_info=True)
        return None


def _with_ours(headers: Any, call: client.Call, cfg: Config, left: float | None) -> Any:
    """``headers`` with ours added: what ``propagation.attempt_headers`` gives, made cheaply.

    The common case, an ``httpx.Headers`` without any header of ours, is a copy
    of it with ours appended to its list as ``Headers.__setitem__`` appends a name
    it does not have: ``(name, lower-case name, value)``, encoded as it encodes.
    The general way's ``.copy()`` (which works out the encoding), three ``in``
    checks and three ``__setitem__`` calls (each lists or scans the names) cost
    about 40k instructions more a request, 2.4% of a keep-alive GET. Anything else
    goes ``attempt_headers``' general way.
    """
    store = getattr(headers, "_list", None)
    if type(headers) is httpx.Headers and type(store) is list:
        sent = call.timeout_sent
        ours = propagation.attempt_headers(None, call, cfg, None, left)
        present = {item[1] for item in store}
        encoding = headers._encoding or "utf-8"
        added = []
        for name, value in ours.items():
            key = name.encode(encoding)
            lower = key.lower()
            if lower in present:
                call.timeout_sent = sent  # as it was: the general way decides
                break
            added.append((key, lower, value.encode(encoding)))
        else:
            new = httpx.Headers(headers)  # a copy of its list, as .copy() makes
            new._list.extend(added)
            return new
    return propagation.attempt_headers(headers, call, cfg, _copy_headers, left)


def _copy_headers(headers: Any) -> Any:
    return headers.copy()  # an httpx.Headers: repeated headers kept


def _restore(request: Any, saved: tuple[Any, Any] | None) -> None:
    if saved is not None:
        request.headers, request.extensions = saved


def _cut_timeouts(timeout: Any, left: float, call: client.Call) -> dict[str, Any] | None:
    """The request's timeouts with none longer than the time left (None: already shorter)."""
    if not isinstance(timeout, dict):
        timeout = {}
    cut = {}
    changed = False
    for key in _TIMEOUT_KEYS:
        value = timeout.get(key)
        if value is None or (isinstance(value, (int, float)) and value > left):
            cut[key] = left
            changed = True
        else:
            cut[key] = value
    if not changed:
        return None
    call.deadline_bound = True
    return {**timeout, **cut}


def _peer(request: Any) -> str | None:
    url: Any = getattr(request, "url", None)
    host = getattr(url, "host", None)
    if not host:
        return None
    port = url.port or _DEFAULT_PORTS.get(url.scheme)
    return naming.peer_name(host, port)


def direct_send(original: Callable[..., Any]) -> Callable[..., Any] | None:
    """``Client.send`` as a plain function around ``original``: :func:`send_wrapper`
    called without wrapt's binding (``Patch(direct=)``). The keyword defaults are
    the original's own (``USE_CLIENT_DEFAULT``); None if it has others."""
    defaults = original.__kwdefaults__ or {}
    if set(defaults) != {"stream", "auth", "follow_redirects"}:
        return None

    def send(
        self: Any,
        request: Any,
        *,
        stream: Any = defaults["stream"],
        auth: Any = defaults["auth"],
        follow_redirects: Any = defaults["follow_redirects"],
    ) -> Any:
        kwargs = {"stream": stream, "auth": auth, "follow_redirects": follow_redirects}
        return send_wrapper(_MethodType(original, self), self, (request,), kwargs)

    return send


def direct_handle_request(original: Callable[..., Any]) -> Callable[..., Any]:
    """``HTTPTransport.handle_request`` as a plain function: :func:`handle_request_wrapper`
    called without wrapt's binding."""

    def handle_request(self: Any, request: Any) -> Any:
        return handle_request_wrapper(_MethodType(original, self), self, (request,), {})

    return handle_request


PATCHES = (
    Patch("httpx", "Client.send", send_wrapper, direct=direct_send),
    Patch("httpx", "AsyncClient.send", send_async_wrapper),
    Patch(
        "httpx",
        "HTTPTransport.handle_request",
        handle_request_wrapper,
        direct=direct_handle_request,
    ),
    Patch("httpx", "AsyncHTTPTransport.handle_async_request", handle_async_request_wrapper),
)

__all__ = ["PATCHES", "SUPPORTED", "CircuitOpen", "DeadlineExceeded", "installed_version"]
