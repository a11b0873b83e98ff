"""urllib3 (1.26 and 2.x): request ids, deadlines as timeouts, one record per logical request.

``HTTPConnectionPool.urlopen`` is every attempt: the pool's own retries and
redirects re-enter it, and so do ``PoolManager``, ``ProxyManager``, HTTPS pools
and requests' adapter. Each attempt checks the deadline, gets the headers and
the timeouts cut to the time left. ``PoolManager.urlopen`` is wrapped too, as the
outer record: it follows cross-pool redirects itself, so without it one call
with a redirect would be recorded twice.

Loaded by the registry when ``urllib3.connectionpool`` is imported.
"""

from __future__ import annotations

import socket
from types import MethodType as _MethodType

import urllib3
from urllib3 import connectionpool as _connectionpool
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util.timeout import Timeout

from agent import _log, config, context, naming, propagation
from agent.http import breaker, client
from agent.instrumentation import Patch
from agent.instrumentation.urllib3.errors import CircuitOpen, DeadlineExceeded
from agent.instrumentation.urllib3.retries import apply_policy as _apply_policy
from agent.instrumentation.urllib3.retries import retry_sleep_wrapper

try:  # 1.26 and 2.x both have it; the import keeps working if it moves
    from urllib3._collections import HTTPHeaderDict as _HeaderDict

    HTTPHeaderDict: Any = _HeaderDict
except ImportError:  # pragma: no cover
    HTTPHeaderDict = None

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from agent.config import Config

_time_left = context.time_left
_monotonic = context._monotonic
_getdefaulttimeout = socket.getdefaulttimeout
_attempt_headers = propagation.attempt_headers
_MILLIS = propagation.MILLIS
_TIMEOUT_HEADER = propagation.TIMEOUT_HEADER
_PRIORITY_HEADER = propagation.PRIORITY_HEADER
_client_begin = client.begin
_current_scope = context.current
_new_request_id = context.new_request_id
_Call = client.Call
_METHODS = client._METHODS
_method = client._method
_record = client.record
_finish = client.finish
#: client.finish's hand-over of a request's record (a Sink of metrics).
_requests = client._requests
_perf_counter = client._perf_counter
_abandoned = client.abandoned
_PREPARE_FAILED = "agent: preparing a urllib3 request failed"
_RECORD_FAILED = "agent: recording an outgoing call failed"
_current_call = client.current_sync_call
_cached_peer = naming.cached
_enter = client.enter_sync
_end = client.end_sync
_in_flight = client.in_flight
_new_in_flight = client.new_in_flight
_get_ident = client.get_ident
_modules = client.modules
_GREENLET = client.GREENLET
_DEFAULT_PORTS = {"http": 80, "https": 443}
# positions in urlopen(method, url, body, headers, retries, redirect, assert_same_host, timeout)
_HEADERS, _RETRIES, _TIMEOUT = 3, 4, 7


def _copy_headers(headers: Any) -> Any:
    if HTTPHeaderDict is not None and isinstance(headers, HTTPHeaderDict):
        return headers.copy()  # keeps repeated headers
    return dict(headers.items())


def urlopen_wrapper(
    wrapped: Callable[..., Any], pool: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``HTTPConnectionPool.urlopen``: an attempt, and the record when outermost.

    The outermost call is the logical request: it is made the call in flight,
    its attempts (this call and urllib3's own retries, which re-enter here) run
    :func:`_attempt`, and it is recorded once. On urllib3 2.x the class has
    :func:`direct_urlopen`'s function instead, which does the common first
    attempt inline and calls this for the rest.
    """
    cfg = config.current
    if cfg is None:
        return wrapped(*args, **kwargs)
    call = _current_call()
    if call is not None:
        return _attempt(wrapped, pool, args, kwargs, cfg, call)
    try:
        call = _client_begin(args[0] if args else kwargs.get("method", "GET"))
    except Exception:
        _log.log_once("urllib3-begin", "agent: starting a urllib3 record failed", exc_info=True)
    if call is None:
        return wrapped(*args, **kwargs)
    token = _enter(call)
    try:
        response = _attempt(wrapped, pool, args, kwargs, cfg, call)
    except Exception as exc:
        _end(token)
        _record(call, None, exc)
        raise
    except BaseException:  # cancelled or interrupted: the caller gave up on it
        _end(token)
        _abandoned(call)
        raise
    _end(token)
    try:
        _finish(call, response.status, response.headers, None)
    except Exception:
        _log.log_once("urllib3-record", _RECORD_FAILED, exc_info=True)
    try:
        return response
    finally:
        # A frame of ours can outlive the call: an exception urllib3 caught and
        # retried keeps the frames above it (ours) in a cycle until a garbage
        # collection. Without the response, that cycle holds no socket.
        del response


def direct_urlopen(original: Callable[..., Any]) -> Callable[..., Any]:
    """``HTTPConnectionPool.urlopen`` as a plain function around ``original`` (urllib3 2.x).

    What :func:`urlopen_wrapper` does, without wrapt: the class gets this function
    (``Patch(direct=)``), so a request binds no wrapper and packs no ``args`` tuple
    or ``kwargs`` dict; the parameters arrive by name and go to ``original`` in
    place. The common first attempt (no headers of the caller's or the pool's,
    the pool's timeout, no policy or breaker) is inline; every other call (an
    attempt of a call in flight: urllib3's own retries and redirects, requests)
    goes to :func:`urlopen_wrapper` with the arguments as urllib3 took them. The
    registry uses it only where urllib3's ``urlopen`` has exactly these
    parameters and defaults (2.x); urllib3 1.26 is wrapped through wrapt.
    """

    def urlopen(
        self: Any,
        method: Any,
        url: Any,
        body: Any = None,
        headers: Any = None,
        retries: Any = None,
        redirect: Any = True,
        assert_same_host: Any = True,
        timeout: Any = _POOL_DEFAULT,
        pool_timeout: Any = None,
        release_conn: Any = None,
        chunked: Any = False,
        body_pos: Any = None,
        preload_content: Any = True,
        decode_content: Any = True,
        **response_kw: Any,
    ) -> Any:
        cfg = config.current
        if cfg is None:
            return original(
                self, method, url, body, headers, retries, redirect, assert_same_host,
                timeout, pool_timeout, release_conn, chunked, body_pos, preload_content,
                decode_content, **response_kw,
            )  # fmt: skip
        slot = None
        if not (
            headers is not None
            or timeout is not _POOL_DEFAULT
            or self.headers
            or cfg.resilient  # a circuit breaker or a retry policy
            or _GREENLET in _modules
        ):
            # client.enter_sync, inline: this thread's InFlight, unless a call is in it.
            slot = _in_flight()
            if slot is None or slot.thread != _get_ident():
                slot = _new_in_flight()
            elif slot.call is not None:
                slot = None
        if slot is None:
            args = (
                method, url, body, headers, retries, redirect, assert_same_host, timeout,
                pool_timeout, release_conn, chunked, body_pos, preload_content, decode_content,
            )  # fmt: skip
            return urlopen_wrapper(_MethodType(original, self), self, args, response_kw)
        call = None
        try:
            scope = _current_scope()  # client.begin, inline (a frame fewer)
            if not scope.suppressed:
                call = _Call(
                    scope.request_id or _new_request_id(),
                    scope.deadline,
                    _METHODS.get(method) or _method(method),
                    scope.view,
                    scope.peer,
                    scope.priority,
                )
        except Exception:
            _log.log_once("urllib3-begin", "agent: starting a urllib3 record failed", exc_info=True)
        if call is None:
            return original(
                self, method, url, body, headers, retries, redirect, assert_same_host,
                timeout, pool_timeout, release_conn, chunked, body_pos, preload_content,
                decode_content, **response_kw,
            )  # fmt: skip
        slot.call = call
        try:
            # The common first attempt, inline, without helper frames (what
            # _attempt does for it): this is every request.
            deadline = call.deadline
            if call.peer is None:
                call.peer = _cached_peer((self.host, self.port)) or _pool_peer(self)
            left = None
            if deadline is not None:
                left = deadline.expires - _monotonic()
                if left <= 0.0:
                    _time_left(deadline, DeadlineExceeded, "; request not sent")  # raises
            call.attempts = 1
            try:
                # propagation.attempt_headers and seconds_left inline, for what this
                # path knows: no headers of the caller's or the pool's (two frames fewer).
                new = {cfg.id_header: call.request_id}
                if deadline is not None and left is not None:
                    mode = cfg.deadline_headers
                    if mode != "relative":
                        new[cfg.deadline_header] = deadline._header or deadline.header()
                    if mode != "absolute":
                        ms = int(left * 1000.0)
                        if ms > 0:
                            whole = ms // 1000
                            cached = deadline._whole
                            if cached[0] != whole:
                                cached = deadline._whole = (whole, str(whole))
                            sent = cached[1] + _MILLIS[ms - whole * 1000]
                        else:
                            sent = "0.000"
                        new[_TIMEOUT_HEADER] = call.timeout_sent = sent
                if call.priority is not None:
                    new[_PRIORITY_HEADER] = call.priority
                headers = new
                if left is not None:
                    default = self.timeout
                    if (
                        type(default) is Timeout
                        and default._connect is _SOCKET_DEFAULT
                        and default._read is _SOCKET_DEFAULT
                        and default.total is None
                        and _getdefaulttimeout() is None
                    ):
                        call.deadline_bound = True
                        timeout = left
                    else:
                        cut = _cut_timeout(_NOT_GIVEN, self, left, call)
                        if cut is not _NOT_GIVEN:
                            timeout = cut
            except Exception:
                _log.log_once("urllib3-attempt", _PREPARE_FAILED, exc_info=True)
            if response_kw:
                response = original(
                    self, method, url, body, headers, retries, redirect, assert_same_host,
                    timeout, pool_timeout, release_conn, chunked, body_pos, preload_content,
                    decode_content, **response_kw,
                )  # fmt: skip
            else:  # a call without ** is a vector call: no tuple and no dict (~1k instructions)
                response = original(
                    self, method, url, body, headers, retries, redirect, assert_same_host,
                    timeout, pool_timeout, release_conn, chunked, body_pos, preload_content,
                    decode_content,
                )  # fmt: skip
        except Exception as exc:
            slot.call = None
            _record(call, None, exc)
            raise
        except BaseException:  # cancelled or interrupted: the caller gave up on it
            slot.call = None
            _abandoned(call)
            raise
        slot.call = None
        try:
            found = response.headers
            view = call.view
            if view is None and type(found) is HTTPHeaderDict:
                # client.finish's X-View-Name, from the store of the type urllib3 2.x
                # always gives (half the cost of finish's lookup by type).
                item = found._container.get("x-view-name")
                view = call.view = item[-1] if item else "unknown"
            status = response.status
            if (
                view is not None
                and type(status) is int
                and status < 500
                and call.attempts == 1
                and call.budget is None
                and call.breaker is None
            ):
                # client.finish for a call that ended well at its first attempt, inline.
                took = (_perf_counter() - call.start) * 1000.0
                peer, method = call.peer or "unknown", call.method
                _requests.append(
                    (peer, view, method, status or "error", took, None, None, None, 0.0)
                )
            else:
                _finish(call, status, found, None)
        except Exception:
            _log.log_once("urllib3-record", _RECORD_FAILED, exc_info=True)
        try:
            return response
        finally:
            del response  # as in urlopen_wrapper

    return urlopen


def direct_poolmanager_urlopen(original: Callable[..., Any]) -> Callable[..., Any]:
    """``PoolManager.urlopen`` as a plain function around ``original`` (1.26 and 2.x).

    :func:`poolmanager_wrapper`, called without wrapt: a wrapt patch makes a bound
    wrapper on every access of ``manager.urlopen`` and packs and unpacks the
    arguments through it. ``urllib3.request()``, ``PoolManager`` and
    ``ProxyManager`` (whose ``urlopen`` calls this one) go through here.
    """

    def urlopen(self: Any, method: Any, url: Any, redirect: Any = True, **kw: Any) -> Any:
        return poolmanager_wrapper(_MethodType(original, self), self, (method, url, redirect), kw)

    return urlopen


def poolmanager_wrapper(
    wrapped: Callable[..., Any], manager: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``PoolManager.urlopen``: the record of a call that may cross pools."""
    if config.current is None or _current_call() is not None:
        return wrapped(*args, **kwargs)
    call = None
    try:
        call = _client_begin(args[0] if args else kwargs.get("method", "GET"))
    except Exception:
        _log.log_once("urllib3-begin", "agent: starting a urllib3 record failed", exc_info=True)
    if call is None:
        return wrapped(*args, **kwargs)
    token = _enter(call)
    try:
        response = wrapped(*args, **kwargs)
    except Exception as exc:
        _end(token)
        if call.peer is None:  # failed before an attempt named it
            call.peer = client.peer_from_url(args[1] if len(args) > 1 else kwargs.get("url"))
        _record(call, None, exc)
        raise
    except BaseException:  # cancelled or interrupted: the caller gave up on it
        _end(token)
        _abandoned(call)
        raise
    _end(token)
    _record(call, response, None)
    try:
        return response
    finally:
        del response  # as in urlopen_wrapper


def _attempt(
    wrapped: Callable[..., Any],
    pool: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cfg: Config,
    call: client.Call,
) -> Any:
    """One attempt: check the deadline, add the headers, cut the timeouts, send."""
    deadline = call.deadline
    if call.peer is None:
        call.peer = _cached_peer((pool.host, pool.port)) or _pool_peer(pool)
    left = 0.0
    if deadline is not None:
        left = deadline.expires - _monotonic()
        if left <= 0.0:
            _time_left(deadline, DeadlineExceeded, "; request not sent")  # raises
    if cfg.circuit_breaker:
        _check_circuit(cfg, call)
    try:
        call.attempts += 1
        if call.attempts > 1:
            retries = args[_RETRIES] if len(args) > _RETRIES else kwargs.get("retries")
            client.retried(call, getattr(retries, "history", None))
        elif cfg.retry_policy:
            args, kwargs = _apply_policy(cfg, call, pool, args, kwargs)
        if len(args) > _HEADERS:
            headers = args[_HEADERS]
            new_headers = _attempt_headers(
                pool.headers if headers is None else headers, call, cfg, _copy_headers, left
            )
            args = (*args[:_HEADERS], new_headers, *args[_HEADERS + 1 :])
        else:
            headers = kwargs.get("headers")
            kwargs["headers"] = _attempt_headers(
                pool.headers if headers is None else headers, call, cfg, _copy_headers, left
            )
        if deadline is not None:
            if len(args) > _TIMEOUT:
                cut = _cut_timeout(args[_TIMEOUT], pool, left, call)
                args = (*args[:_TIMEOUT], cut, *args[_TIMEOUT + 1 :])
            else:
                given = kwargs.get("timeout", _NOT_GIVEN)
                timeout = pool.timeout
                if (
                    given is _NOT_GIVEN
                    and type(timeout) is Timeout
                    and timeout._connect is _SOCKET_DEFAULT
                    and timeout._read is _SOCKET_DEFAULT
                    and timeout.total is None
                    and _getdefaulttimeout() is None
                ):
                    # The common case, inline: the pool's default timeout, no limit.
                    call.deadline_bound = True
                    kwargs["timeout"] = _make_timeout(None, left, left)
                else:
                    cut = _cut_timeout(given, pool, left, call)
                    if cut is not _NOT_GIVEN:
                        kwargs["timeout"] = cut
    except Exception:
        _log.log_once("urllib3-attempt", _PREPARE_FAILED, exc_info=True)
    return wrapped(*args, **kwargs)


def _check_circuit(cfg: Config, call: client.Call) -> None:
    """Fail fast while the peer's circuit is open (one probe once its break is over)."""
    found = call.breaker
    if found is None:
        if call.attempts:
            return  # its first attempt found no breaker
        found = call.breaker = breaker.breaker_for(cfg.circuit_breaker, call.peer or "unknown")
        if found is None:
            return
    if not found.allow():
        raise CircuitOpen(f"the circuit to {found.peer} is open; request not sent")


def _cut_timeout(timeout: Any, pool: Any, left: float, call: client.Call) -> Any:
    """The caller's (or the pool's) timeout, with no part longer than the time left.

    A value this does not understand (``timeout="1"``, a ``bool``) is returned
    as it is, so urllib3 answers it as it would without the agent.
    """
    total: Any
    connect: Any
    read: Any
    given = timeout
    if timeout is _NOT_GIVEN or timeout is _POOL_DEFAULT:
        timeout = pool.timeout  # urllib3 would use the pool's
    kind = type(timeout)
    if kind is float or kind is int:
        total, connect, read = None, timeout, timeout
    elif timeout is None:
        total = connect = read = None
    elif isinstance(timeout, Timeout):
        total, connect, read = timeout.total, timeout._connect, timeout._read
        if connect is _SOCKET_DEFAULT:
            connect = socket.getdefaulttimeout()
        if read is _SOCKET_DEFAULT:
            read = socket.getdefaulttimeout()
        if total is _SOCKET_DEFAULT:
            total = None
    elif timeout is _SOCKET_DEFAULT:  # 1.26: "the socket module's default" for both
        total, connect = None, socket.getdefaulttimeout()
        read = connect
    else:
        return given
    # Only None or a positive number can be compared with the time left (inline: per attempt).
    if not (
        (connect is None or (type(connect) in _NUMBERS and connect > 0))
        and (read is None or (type(read) in _NUMBERS and read > 0))
    ):
        return given
    if connect is not None and read is not None and connect <= left and read <= left:
        return given  # the caller's own timeouts already end before the deadline
    call.deadline_bound = True
    # `total` stays the caller's: urllib3 does measurably more work per request
    # with one, and connect and read bounded by the time left bound the attempt.
    return _make_timeout(
        total,
        left if connect is None or connect > left else connect,
        left if read is None or read > left else read,
    )


_SOCKET_DEFAULT = Timeout.DEFAULT_TIMEOUT  # "use the socket module's default"
_NOT_GIVEN = object()  # no timeout in the call: urllib3 uses the pool's
_NUMBERS = (float, int)  # not bool: urllib3 rejects a bool timeout, and so must the call
#: urlopen's own default argument, "the pool's timeout": a sentinel of its own in
#: 1.26 (``_Default``), ``Timeout.DEFAULT_TIMEOUT`` in 2.x.
_POOL_DEFAULT = getattr(_connectionpool, "_Default", _SOCKET_DEFAULT)


def _make_timeout(total: float | None, connect: float, read: float) -> Any:
    """A ``Timeout`` without its argument validation (the values are ours and valid)."""
    timeout = _new_timeout(Timeout)
    timeout._connect = connect
    timeout._read = read
    timeout.total = total
    timeout._start_connect = None
    return timeout


def _validated_timeout(total: float | None, connect: float, read: float) -> Any:
    return Timeout(total=total, connect=connect, read=read)


_new_timeout = object.__new__
# Fall back to the public constructor if this urllib3 keeps other state in a Timeout.
if vars(Timeout(total=1.0, connect=2.0, read=3.0)) != vars(_make_timeout(1.0, 2.0, 3.0)):
    _make_timeout = _validated_timeout  # pragma: no cover


def _pool_peer(pool: Any) -> str:
    port = pool.port or _DEFAULT_PORTS.get(getattr(pool, "scheme", "http"))
    return naming.peer_name(pool.host or "unknown", port)


#: The versions of urllib3 this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((1, 26), (3,))


def installed_version() -> str:
    """The version of urllib3 imported."""
    return str(getattr(urllib3, "__version__", ""))


PATCHES = (
    Patch(
        "urllib3.connectionpool",
        "HTTPConnectionPool.urlopen",
        urlopen_wrapper,
        direct=direct_urlopen,
    ),
    Patch(
        "urllib3.poolmanager",
        "PoolManager.urlopen",
        poolmanager_wrapper,
        direct=direct_poolmanager_urlopen,
    ),
    Patch("urllib3.util.retry", "Retry.sleep", retry_sleep_wrapper),
)

__all__ = [
    "PATCHES",
    "SUPPORTED",
    "CircuitOpen",
    "DeadlineExceeded",
    "HTTPConnectionPool",
    "installed_version",
]
