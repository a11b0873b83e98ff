"""Request context: the request id, the deadline and per-call metric names.

One :class:`~contextvars.ContextVar` holds an immutable :class:`Scope`; the
context managers here push a changed copy and restore the previous one on
exit. Because it is a context variable, the scope follows ``asyncio`` tasks
automatically; a thread pool needs ``contextvars.copy_context().run`` (see
``docs/context.md``).

Deadlines are kept on the monotonic clock, so a wall-clock step cannot move
them; they are rendered in wall-clock UTC only for the deadline header.
"""

from __future__ import annotations

import math
import os
import time
from contextvars import ContextVar

from agent import _fork

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextvars import Token
    from types import TracebackType
    from typing import Any, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "Deadline",
    "DeadlineExceeded",
    "Scope",
    "current",
    "deadline",
    "deadline_timeout",
    "metric_names",
    "new_request_id",
    "priority",
    "request_context",
    "suppress",
]

_monotonic = time.monotonic

#: Seconds: a deadline further away than this behaves as no deadline. Anyone can
#: send ``X-Request-Deadline: 9999-12-31T...``; timeouts derived from such a value
#: overflow (a socket timeout, libpq's ``connect_timeout``, PostgreSQL's
#: ``statement_timeout``, at most 2147483647 ms, about 24.8 days). A day is
#: beyond any request's useful deadline and far inside every one of those limits.
MAX_DEADLINE = 86_400.0


class DeadlineExceeded(TimeoutError):
    """The deadline has passed: raised before a network call is attempted.

    A subclass of :class:`TimeoutError`. Raised through ``requests`` it is
    also a ``requests.exceptions.Timeout``.
    """


class Deadline:
    """A point in time on the monotonic clock by which work must be done."""

    __slots__ = ("_header", "_whole", "expires")

    def __init__(self, expires: float) -> None:
        self.expires = expires  # time.monotonic() seconds
        self._header: str | None = None
        #: (whole seconds, their text) of the last X-Request-Timeout: one tuple, so a
        #: thread never pairs one second's text with another's number.
        self._whole: tuple[int, str] = (-1, "")

    @classmethod
    def after(cls, seconds: float) -> Deadline | None:
        """The deadline ``seconds`` from now; ``None`` beyond :data:`MAX_DEADLINE` (or NaN)."""
        if not seconds <= MAX_DEADLINE:
            return None
        return cls(_monotonic() + seconds)

    @classmethod
    def at_wall_time(cls, epoch_seconds: float) -> Deadline | None:
        """The deadline at a wall-clock time (seconds since the epoch, UTC).

        ``None`` when it is more than :data:`MAX_DEADLINE` away.
        """
        return cls.after(epoch_seconds - time.time())

    def remaining(self) -> float:
        """Seconds left; zero or negative once passed."""
        return self.expires - _monotonic()

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return _monotonic() >= self.expires

    def header(self) -> str:
        """ISO 8601 UTC with milliseconds and ``Z``, truncated so it is never later."""
        if self._header is None:
            wall_ms = int((time.time() + (self.expires - _monotonic())) * 1000)
            seconds, ms = divmod(wall_ms, 1000)
            self._header = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"
        return self._header

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f}s)"


class Scope:
    """What the current request knows: its id, its deadline, names for its calls.

    Not slotted, and every field is set by ``__init__``, with no class default: a
    slotted scope costs 0.9k instructions more to make, and on Python 3.12 and 3.13
    an instance attribute that shadows a class attribute is read by the generic
    lookup (250 instructions more a read; an outgoing call reads six).
    """

    def __init__(
        self,
        request_id: str | None = None,
        deadline: Deadline | None = None,
        view: str | None = None,
        peer: str | None = None,
        suppressed: bool = False,
        priority: str | None = None,
        incoming_priority: str | None = None,
        request: Any = None,
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.view = view  # per-call metric name of outgoing calls (`view` tag)
        self.peer = peer  # per-call peer name of outgoing calls (`peer` tag)
        self.suppressed = suppressed  # inside agent.suppress(): calls are not instrumented
        self.priority = priority  # "high", "normal" or "low", sent on outgoing calls
        self.incoming_priority = incoming_priority  # the request's own: what rules `priority()`
        #: The incoming request being served (an ``agent.http.server.Request``), set by the
        #: server integration that built the request's scope; every scope pushed inside keeps it.
        self.request = request
        self._token: Token[Scope] | None = None  # set by the context manager that pushed it

    def replace(self, **changes: Any) -> Scope:
        """A copy with some fields changed."""
        scope = Scope(
            self.request_id,
            self.deadline,
            self.view,
            self.peer,
            self.suppressed,
            self.priority,
            self.incoming_priority,
            self.request,
        )
        for name, value in changes.items():
            setattr(scope, name, value)
        return scope

    def __repr__(self) -> str:
        return (
            f"Scope(request_id={self.request_id!r}, deadline={self.deadline!r}, "
            f"view={self.view!r}, peer={self.peer!r}, suppressed={self.suppressed!r}, "
            f"priority={self.priority!r})"
        )


EMPTY = Scope()
_scope: ContextVar[Scope] = ContextVar("talisker_scope", default=EMPTY)

#: The current scope; a C-level call, cheap enough for every wrapped call.
current = _scope.get


_generator: Any = None


def new_request_id() -> str:
    """A new random request id: 32 hex digits (128 random bits).

    From a private generator seeded with ``os.urandom`` and reseeded in every
    forked child: a system call per id costs microseconds in some VMs, and the
    application's own ``random.seed()`` cannot make ids repeat.
    """
    global _generator
    if _generator is None:
        from _random import Random

        _generator = Random(int.from_bytes(os.urandom(32), "big"))
    bits: int = _generator.getrandbits(128)
    return bits.to_bytes(16, "big").hex()


def _reseed_after_fork() -> None:
    global _generator
    _generator = None


_fork.after_in_child(_fork.RESET, _reseed_after_fork)


def earliest(a: Deadline | None, b: Deadline | None) -> Deadline | None:
    """The earlier of two deadlines; ``None`` means no deadline."""
    if a is None:
        return b
    if b is None or a.expires <= b.expires:
        return a
    return b


def deadline_timeout() -> float | None:
    """Seconds left before the current deadline; ``None`` without one.

    Raises :class:`DeadlineExceeded` once the deadline has passed.
    """
    d = _scope.get().deadline
    if d is None:
        return None
    return time_left(d)


def time_left(
    deadline: Deadline, error: type[DeadlineExceeded] = DeadlineExceeded, what: str = ""
) -> float:
    """Seconds left before ``deadline``; once it has passed, raises ``error``.

    The one deadline check of the agent: ``error`` is the caller's flavour of
    :class:`DeadlineExceeded` (also the library's own timeout exception), ``what``
    ends its message (``"; request not sent"``).
    """
    left = deadline.expires - _monotonic()
    if left <= 0.0:  # a float to a float: a specialised comparison
        raise error(f"deadline exceeded {-left:.3f}s ago{what}")
    return left


class _ScopeChange:
    """Base of the context managers: push a changed scope, restore it on exit.

    Reusable and re-entrant: the token that restores the previous scope is kept
    on the scope pushed, not on the manager, so one instance may be entered
    again inside itself, from several threads or tasks at once, or used as a
    decorator of a function that recurses.
    """

    __slots__ = ()

    def _changed(self, scope: Scope) -> Scope:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> Scope:
        scope = self._changed(_scope.get())
        scope._token = _scope.set(scope)
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = _scope.get()._token
        if token is None:  # pragma: no cover - a scope pushed by someone else was not left
            _log_unbalanced()
            return
        _scope.reset(token)

    def __call__(self, func: F) -> F:
        import functools

        @functools.wraps(func)
        def decorated(*args: Any, **kwargs: Any) -> Any:
            with self:
                return func(*args, **kwargs)

        return decorated  # type: ignore[return-value]


def _log_unbalanced() -> None:  # pragma: no cover
    from agent._log import log_once

    log_once("scope-unbalanced", "agent: a request scope was left that this block did not enter")


class deadline(_ScopeChange):
    """Context manager (or decorator): a deadline ``seconds`` from now.

    Deadlines nest and the earliest wins: an inner ``deadline(10)`` under an
    outer one with 2 s left keeps the 2 s. ``None`` changes nothing. Inside
    it, outgoing calls carry the deadline header, use the time left as their
    timeouts, and raise :class:`DeadlineExceeded` once it has passed.
    """

    __slots__ = ("seconds",)

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and math.isnan(seconds):
            raise ValueError("deadline seconds must be a number")
        self.seconds = seconds

    def _changed(self, scope: Scope) -> Scope:
        if self.seconds is None:
            return scope.replace()
        return scope.replace(deadline=earliest(scope.deadline, Deadline.after(self.seconds)))


class request_context(_ScopeChange):
    """Context manager (or decorator): a request scope, for non-WSGI servers and tests.

    ``request_id`` defaults to a new id. ``deadline`` is seconds from now, or
    a :class:`Deadline`; the earliest of it and any enclosing deadline wins.
    """

    __slots__ = ("deadline", "request_id")

    def __init__(
        self, request_id: str | None = None, deadline: float | Deadline | None = None
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline

    def _changed(self, scope: Scope) -> Scope:
        d = self.deadline
        if isinstance(d, Deadline):
            d = d if d.remaining() <= MAX_DEADLINE else None
        elif d is not None:
            d = Deadline.after(d)
        return Scope(
            request_id=self.request_id or new_request_id(),
            deadline=earliest(scope.deadline, d),
            view=scope.view,
            peer=scope.peer,
            suppressed=scope.suppressed,
            priority=scope.priority,
            incoming_priority=scope.incoming_priority,
            request=scope.request,
        )


class metric_names(_ScopeChange):
    """Context manager (or decorator) naming the outgoing calls made inside it.

    ``view`` becomes the ``view`` tag (overriding the response's
    ``X-View-Name``), ``peer`` the ``peer`` tag (overriding registered endpoint
    names). ``None`` keeps the enclosing name.
    """

    __slots__ = ("peer", "view")

    def __init__(self, view: str | None = None, peer: str | None = None) -> None:
        self.view = view
        self.peer = peer

    def _changed(self, scope: Scope) -> Scope:
        return scope.replace(
            view=self.view if self.view is not None else scope.view,
            peer=self.peer if self.peer is not None else scope.peer,
        )


class suppress(_ScopeChange):
    """Context manager (or decorator): the calls made inside it are not instrumented.

    Outgoing HTTP calls and SQL statements inside it are made as without the
    agent: no request id or deadline header, no timeout cut to the deadline, no
    ``DeadlineExceeded``, no metric. For an application's own health checks, or
    the calls of another agent. Nests; ``request_context`` inside it stays
    suppressed. (OpenTelemetry's ``suppress_http_instrumentation`` is the model.)
    """

    __slots__ = ()

    def _changed(self, scope: Scope) -> Scope:
        return scope.replace(suppressed=True)


#: The priorities of ``X-Request-Priority``, as aio-request names them.
PRIORITIES = ("high", "normal", "low")


def parse_priority(value: object) -> str | None:
    """``high``, ``normal`` or ``low`` (any case, spaces around); anything else is None."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if value in PRIORITIES else None


def outgoing_priority(explicit: str, context_priority: str | None) -> str:
    """aio-request's rule for an explicit priority under a request's own.

    ``low`` under an incoming ``high``, or ``high`` under an incoming ``low``, is
    sent as ``normal``: a request cannot demote or promote its calls to the
    opposite extreme.
    """
    if context_priority == "high" and explicit == "low":
        return "normal"
    if context_priority == "low" and explicit == "high":
        return "normal"
    return explicit


class priority(_ScopeChange):
    """Context manager (or decorator): the priority of the calls made inside it.

    ``agent.priority("high")`` sends ``X-Request-Priority: high`` on outgoing calls
    (``high``, ``normal`` or ``low``, any case). Inside a request that came with a
    priority of its own, aio-request's rule applies: ``low`` under ``high`` and
    ``high`` under ``low`` become ``normal``. Anything else raises ``ValueError``.
    """

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        parsed = parse_priority(value)
        if parsed is None:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {value!r}")
        self.value = parsed

    def _changed(self, scope: Scope) -> Scope:
        return scope.replace(priority=outgoing_priority(self.value, scope.incoming_priority))
