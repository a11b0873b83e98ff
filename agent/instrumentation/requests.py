"""requests: the outer record of a logical request, per-call names, requests-style deadline errors.

``Session.send`` is the logical request (requests follows redirects by calling
it again, nested: those are attempts). The urllib3 layer under it sees the
call in flight and only does the per-attempt work: headers, timeouts, the
deadline check. ``Session.request`` accepts talisker's per-call names,
``metric_api_name=`` and ``metric_host_name=``, and pops them before requests
sees them.

Loaded by the registry when ``requests.sessions`` is imported.
"""

from __future__ import annotations

import requests
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import Timeout as RequestsTimeout

from agent import _log, config, context
from agent.http import breaker, client
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class CircuitOpen(breaker.CircuitOpen, RequestsConnectionError):
    """The circuit to the peer is open; the request was not sent.

    An ``agent.CircuitOpen`` that is also a ``requests.exceptions.ConnectionError``,
    as a refused connection is.
    """


class DeadlineExceeded(context.DeadlineExceeded, RequestsTimeout):
    """The deadline has passed; the request was not sent.

    An ``agent.DeadlineExceeded`` (a built-in ``TimeoutError``) that is also a
    ``requests.exceptions.Timeout``, so ``except requests.exceptions.Timeout``
    handles it as it handles requests' own timeouts.
    """


def send_wrapper(
    wrapped: Callable[..., Any], session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``Session.send``: the record of the logical request."""
    if config.current is None:
        return wrapped(*args, **kwargs)
    request = args[0] if args else kwargs.get("request")
    slot = client.sync_slot()
    call = client.current_sync_call() if slot is None else slot.call
    if call is not None:  # a redirect, followed inside the outer send
        call.next_reason = "redirect"
        _check_deadline(call, request)
        try:
            return wrapped(*args, **kwargs)
        except Exception as exc:
            deadline_error = _deadline_error(exc)
            if deadline_error is not None:
                raise deadline_error from exc
            raise
    try:
        call = client.begin(getattr(request, "method", None) or "GET")
    except Exception:
        _log.log_once("requests-begin", "agent: starting a requests record failed", exc_info=True)
        call = None
    if call is None:  # inside agent.suppress(), or the agent failed
        return wrapped(*args, **kwargs)
    if slot is None:
        token = client.enter_sync(call)
    else:
        slot.call = call  # client.enter_sync, with the slot found once
        token = slot
    try:
        _check_deadline(call, request)
        response = wrapped(*args, **kwargs)
    except Exception as exc:
        deadline_error = _deadline_error(exc)
        _finish(call, request, None, deadline_error or exc)
        if deadline_error is not None:
            raise deadline_error from exc
        raise
    except BaseException:  # cancelled or interrupted: the caller gave up on it
        client.abandoned(call)
        raise
    finally:
        client.end_sync(token)
    _finish(call, request, response, None)
    try:
        return response
    finally:
        # A frame of ours can outlive the call: an exception urllib3 caught and
        # retried keeps the frames above it (ours) in a cycle until a garbage
        # collection. Without the response, that cycle holds no socket.
        del response


def request_wrapper(
    wrapped: Callable[..., Any], session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``Session.request``: pop ``metric_api_name`` / ``metric_host_name``."""
    if "metric_api_name" not in kwargs and "metric_host_name" not in kwargs:
        return wrapped(*args, **kwargs)
    view = kwargs.pop("metric_api_name", None)
    peer = kwargs.pop("metric_host_name", None)
    with context.metric_names(view=view, peer=peer):
        return wrapped(*args, **kwargs)


def _check_deadline(call: client.Call, request: Any) -> None:
    deadline = call.deadline
    if deadline is not None:
        try:
            context.time_left(deadline, DeadlineExceeded, "; request not sent")
        except DeadlineExceeded:
            if call.peer is None:
                call.peer = client.peer_from_url(getattr(request, "url", None))
            raise


def _deadline_error(exc: BaseException) -> DeadlineExceeded | CircuitOpen | None:
    """The requests-style error for a deadline that urllib3 saw pass, or an open circuit
    (requests wraps urllib3's)."""
    if isinstance(exc, (DeadlineExceeded, CircuitOpen)):
        return None
    if isinstance(exc, context.DeadlineExceeded):  # urllib3's, raised before a retry's wait
        return DeadlineExceeded(str(exc))
    inner = exc.args[0] if exc.args else None
    if isinstance(exc, RequestsConnectionError) and isinstance(inner, breaker.CircuitOpen):
        return CircuitOpen(str(inner))
    if isinstance(exc, RequestsConnectionError) and isinstance(inner, context.DeadlineExceeded):
        return DeadlineExceeded(str(inner))
    return None


def _finish(call: client.Call, request: Any, response: Any, error: BaseException | None) -> None:
    try:
        if call.peer is None:  # no urllib3 attempt named it (failed early; old chunked path)
            call.peer = client.peer_from_url(getattr(request, "url", None))
        if response is None:
            client.finish(call, None, None, error)
        else:
            client.finish(call, response.status_code, response.headers, error)
    except Exception:
        _log.log_once("requests-record", "agent: recording a requests call failed", exc_info=True)


#: The versions of requests this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((2, 28), (3,))


def installed_version() -> str:
    """The version of requests imported."""
    return str(requests.__version__)


PATCHES = (
    Patch("requests.sessions", "Session.send", send_wrapper),
    Patch("requests.sessions", "Session.request", request_wrapper),
)
#: What stays in when this instrumentation is off: the per-call name keywords are
#: still popped, so code written against them keeps working (``registry.API_TARGETS``).
API_PATCHES = (PATCHES[1],)

__all__ = [
    "API_PATCHES",
    "PATCHES",
    "SUPPORTED",
    "CircuitOpen",
    "DeadlineExceeded",
    "installed_version",
]
