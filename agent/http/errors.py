"""What failed in an outgoing call: ``(type, code)`` for the ``requests.errors`` tags.

Matched by class name anywhere in the MRO, so this module imports no HTTP library.
"""

from __future__ import annotations

import errno
import socket

from agent.context import DeadlineExceeded
from agent.http.breaker import CircuitOpen

_TIMEOUT_NAMES = frozenset(
    {
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "Timeout",
        "ReadTimeout",
        "ConnectTimeout",
        "TimeoutException",  # httpx's
        "TimeoutError",  # asyncio's, before Python 3.11 not the built-in one (aiohttp raises it)
    }
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
_DISCONNECTED_NAMES = frozenset({"ServerDisconnectedError"})  # aiohttp's
_EAI_NAMES: dict[int, str] = {}


def _eai_name(code: int) -> str:
    if not _EAI_NAMES:
        for name in dir(socket):
            if name.startswith("EAI_"):
                _EAI_NAMES.setdefault(getattr(socket, name), name)
    return _EAI_NAMES.get(code, f"EAI_{code}")


def classify_error(error: BaseException, deadline_bound: bool = False) -> tuple[str, str]:
    """``(type, code)`` of a failed call: ``deadline``, ``timeout`` or ``connection``.

    ``deadline_bound``: the call's timeouts were cut to its deadline, or the deadline
    has passed, so a timeout is the deadline's (the signature of
    :func:`agent.sql.record.classify_error` too).

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
        if isinstance(exc, CircuitOpen):
            return "circuit", "open"
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & _TLS_NAMES:
            return "connection", "ssl"
        if isinstance(exc, socket.gaierror):
            return "connection", _eai_name(exc.errno) if exc.errno is not None else "EAI"
        if not names & _NOT_TIMEOUT_NAMES and (
            names & _TIMEOUT_NAMES or isinstance(exc, TimeoutError)
        ):
            if deadline_bound:
                return "deadline", "deadline"
            return "timeout", "timeout"
        if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
            return "connection", errno.errorcode.get(exc.errno, str(exc.errno))
        for cls, code in _ERRNO_LESS:
            if isinstance(exc, cls):
                return "connection", code
        # Closed without a response, as httpx and aiohttp say it (no errno): the row
        # requests' RemoteDisconnected (a ConnectionResetError) gives.
        if names & _DISCONNECTED_NAMES or (
            "RemoteProtocolError" in names and "disconnected" in str(exc).lower()
        ):
            return "connection", "ECONNRESET"
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException):
            queue.append(reason)
        queue.extend(a for a in exc.args if isinstance(a, BaseException))
        if exc.__cause__ is not None:
            queue.append(exc.__cause__)
        if exc.__context__ is not None:
            queue.append(exc.__context__)
    return "connection", type(error).__name__
