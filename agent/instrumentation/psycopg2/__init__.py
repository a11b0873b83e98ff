"""psycopg2: timed cursors, deadlines as connect and statement timeouts, query metrics.

``psycopg2.connect`` is wrapped; the application still gets a real
``psycopg2.extensions.connection`` (C-level type checks in ``register_type``,
``quote_ident`` or ``adapt().prepare`` reject proxies). It is an instance of a
subclass of the application's ``connection_factory`` (or of ``connection``)
with :class:`ConnectionMixin` just above psycopg2's own class, so factories
that choose a cursor class (``DictConnection``...) still choose it. The mixin's
``cursor()`` then swaps whatever class was chosen (the connection's
``cursor_factory``, a per-call ``cursor_factory=RealDictCursor``, a named cursor)
for a subclass whose ``execute``, ``executemany`` and ``callproc`` are timed.

Deadlines: see ``docs/postgresql.md``. In short, a statement run under a
deadline is sent as ``SET LOCAL statement_timeout = <ms>; <statement>`` in the
same ``execute`` (no extra round trip; the server cancels it when the time is
up; nothing outlives the transaction), and connecting uses a ``connect_timeout``
no longer than the time left.

Loaded by the registry when ``psycopg2`` is imported.
"""

from __future__ import annotations

import time

import psycopg2
from psycopg2 import extensions

from agent import _log, config, context, naming
from agent.context import DeadlineExceeded
from agent.instrumentation import Patch
from agent.instrumentation.psycopg2.cursor import execute_own, timed_cursor_class
from agent.instrumentation.psycopg2.cursor import timed_classes as _timed_classes
from agent.sql import postgres, record
from agent.sql.postgres import State

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_BaseConnection = extensions.connection
_BaseCursor = extensions.cursor
_perf_counter = time.perf_counter
_current_scope = context.current
_check = context.time_left
_finish = record.finish


class ConnectionMixin(_BaseConnection):
    """Gives every cursor of the connection timed ``execute``/``executemany``/``callproc``."""

    _talisker: State  # set by connect_wrapper once connected

    def cursor(
        self,
        name: Any = None,
        cursor_factory: Any = None,
        withhold: Any = False,
        scrollable: Any = None,
    ) -> Any:
        """psycopg2's ``cursor()`` (the same parameters), of the timed subclass of the class chosen.

        psycopg2 gets them positionally: parsing keywords costs it more than the rest of
        making a cursor. The cursor notes its connection's State for the inline path.
        """
        try:
            factory: Any = cursor_factory or self.cursor_factory or _BaseCursor  # type: ignore[truthy-function]
            timed = _timed_classes.get(factory) or timed_cursor_class(factory)
        except Exception:
            _log.log_once(
                "psycopg2-cursor", "agent: timing a psycopg2 cursor failed", exc_info=True
            )
            timed = cursor_factory
        if withhold is False and scrollable is None:
            cursor = _BaseConnection.cursor(self, name, timed)
        else:
            cursor = _BaseConnection.cursor(self, name, timed, withhold, scrollable)
        try:
            cursor._talisker_state = self._talisker if cursor.name is None else None
        except AttributeError:
            pass  # not a timed class, or no State (cursor.py notes it at the first statement)
        return cursor

    def reset(self) -> None:
        """psycopg2's ``reset()`` (``ABORT; RESET ALL``...): the agent forgets the timeouts."""
        state: State | None = getattr(self, "_talisker", None)
        try:
            _BaseConnection.reset(self)
        finally:
            if state is not None:
                state.session_ms = state.txn_ms = None
                state.ours_ms = 0


_connection_classes: dict[type, type] = {}


def connection_class(factory: type | None) -> type:
    """The agent's subclass of a connection factory (cached)."""
    if factory is None or factory is _BaseConnection:
        return ConnectionMixin
    cls = _connection_classes.get(factory)
    if cls is None:
        cls = type(
            factory.__name__,
            (factory, ConnectionMixin),
            {"__module__": factory.__module__, "__doc__": factory.__doc__},
        )
        _connection_classes[factory] = cls
    return cls


# -- connect ---------------------------------------------------------------------


def connect_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``psycopg2.connect``: the agent's connection class, the connect deadline."""
    if config.current is None or kwargs.get("async_") or kwargs.get("async"):
        return wrapped(*args, **kwargs)  # asynchronous connections are left alone
    suppressed = False
    try:
        if len(args) > 1:
            args = (args[0], connection_class(args[1]), *args[2:])
        else:
            kwargs["connection_factory"] = connection_class(kwargs.get("connection_factory"))
        scope = _current_scope()
        suppressed = scope.suppressed  # still the agent's class: later statements are timed
        deadline = None if suppressed else scope.deadline
        if deadline is not None:
            try:
                left = _check(deadline, DeadlineExceeded, "; not connecting")
            except DeadlineExceeded as error:
                peer, db = _target(args, kwargs)
                _finish(peer, db, "connect", _perf_counter(), error)
                raise
            kwargs["connect_timeout"] = _connect_timeout(args, kwargs, left)
    except DeadlineExceeded:
        raise
    except Exception:
        _log.log_once(
            "psycopg2-connect", "agent: preparing a psycopg2 connect failed", exc_info=True
        )
    start = _perf_counter()
    try:
        conn = wrapped(*args, **kwargs)
    except Exception as exc:
        if suppressed:
            raise
        try:
            peer, db = _target(args, kwargs)
            _finish(peer, db, "connect", start, exc)
        except Exception:
            _log.log_once(
                "psycopg2-record", "agent: recording a failed connect failed", exc_info=True
            )
        raise
    try:
        info = conn.info
        conn._talisker = State(
            naming.peer_name(info.host or "localhost", info.port),
            info.dbname or "unknown",
            execute_own,
        )
    except Exception:
        _log.log_once(
            "psycopg2-state", "agent: reading a psycopg2 connection failed", exc_info=True
        )
    return conn


def _connect_timeout(args: tuple[Any, ...], kwargs: dict[str, Any], left: float) -> int:
    """Whole seconds: the time left, never more than the caller's own connect_timeout."""
    return postgres.connect_timeout(left, kwargs, _dsn_params(args, kwargs))


def _dsn_params(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    dsn = args[0] if args else kwargs.get("dsn")
    if not dsn:
        return {}
    try:
        params: dict[str, str] = extensions.parse_dsn(dsn)
        return params
    except Exception:
        return {}


def _target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
    """``peer`` and ``db`` of a connection that failed: never the password."""
    return postgres.target(kwargs, _dsn_params(args, kwargs))


#: The versions of psycopg2 this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((2, 9), (3,))


def installed_version() -> str:
    """The version of psycopg2 imported."""
    return str(getattr(psycopg2, "__version__", ""))


PATCHES = (Patch("psycopg2", "connect", connect_wrapper),)

__all__ = [
    "PATCHES",
    "SUPPORTED",
    "ConnectionMixin",
    "connection_class",
    "installed_version",
    "timed_cursor_class",
]
