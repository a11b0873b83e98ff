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

import math
import os
import time

from psycopg2 import extensions

from agent import _log, config, context, metrics, naming, sql
from agent.context import DeadlineExceeded
from agent.registry import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_BaseConnection = extensions.connection
_BaseCursor = extensions.cursor
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INERROR = extensions.TRANSACTION_STATUS_INERROR
_monotonic = time.monotonic
_perf_counter = time.perf_counter
_current_scope = context.current
_operation = sql.operation
_cached_operation = sql.cached_operation
_finish = sql.finish
_expand = sql.expand_queries
_record_deferred = metrics.record_deferred
_NOT_PREFIXABLE = sql.NOT_PREFIXABLE
#: Operations the inline path leaves to _bounded: no prefix, or a prefix only sometimes.
_NOT_INLINE = _NOT_PREFIXABLE | sql.OUTSIDE_BLOCK_OPS
_outside_transaction_only = sql.outside_transaction_only
#: Statements that, in autocommit, get the deadline as a session-level timeout
#: for their duration (two extra round trips): they cannot take a prefix and may
#: run long. Others that cannot (SHOW, LISTEN, LOCK...) only get the check.
_SESSION_BOUND_OPS = frozenset(
    {"vacuum", "reindex", "cluster", "copy", "declare", "call", "do", "create", "drop", "alter"}
)
#: Statements after which the session's statement_timeout is read again.
_SESSION_CHANGES = frozenset({"set", "reset", "discard"})
_ceil = math.ceil
# libpq treats connect_timeout=1 as 2 seconds: ask for what it will do.
_MIN_CONNECT_TIMEOUT = 2


class _State:
    """What the agent keeps per connection."""

    __slots__ = ("db", "dirty", "peer", "session_ms")

    def __init__(self, peer: str, db: str) -> None:
        self.peer = peer
        self.db = db
        self.session_ms: int | None = None  # the session's own statement_timeout, once read
        self.dirty = False  # a SET LOCAL of ours is in force in the open transaction


class ConnectionMixin(_BaseConnection):
    """Gives every cursor of the connection timed ``execute``/``executemany``/``callproc``."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if len(args) > 1:
                factory = args[1] or getattr(self, "cursor_factory", None) or _BaseCursor
                args = (args[0], timed_cursor_class(factory), *args[2:])
            else:
                chosen = kwargs.get("cursor_factory") or getattr(self, "cursor_factory", None)
                factory = chosen or _BaseCursor
                kwargs["cursor_factory"] = timed_cursor_class(factory)
        except Exception:
            _log.log_once(
                "psycopg2-cursor", "agent: timing a psycopg2 cursor failed", exc_info=True
            )
        return _BaseConnection.cursor(self, *args, **kwargs)


_connection_classes: dict[type, type] = {}
_cursor_classes: dict[type, type] = {}


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


def timed_cursor_class(factory: Any) -> Any:
    """A subclass of the cursor class ``factory`` whose statements are timed (cached)."""
    cls = _cursor_classes.get(factory)
    if cls is not None:
        return cls
    if factory in _cursor_classes.values():
        return factory  # already timed
    if not (isinstance(factory, type) and issubclass(factory, _BaseCursor)):
        return factory  # psycopg2 rejects it as it would have anyway
    base_callproc = factory.callproc

    def callproc(self: Any, procname: Any, parameters: Any = None) -> Any:
        if config.current is None:
            return base_callproc(self, procname, parameters)
        return _run_callproc(self, base_callproc, procname, parameters)

    cls = type(
        factory.__name__,
        (factory,),
        {
            "execute": _statement_method(factory.execute, "execute"),
            "executemany": _statement_method(factory.executemany, "executemany"),
            "callproc": callproc,
            "__slots__": (),
            "__module__": factory.__module__,
            "__doc__": factory.__doc__,
        },
    )
    _cursor_classes[factory] = cls
    return cls


def _statement_method(base: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A timed ``execute`` or ``executemany`` calling ``base``: the per-query hot path."""

    def method(self: Any, query: Any, vars: Any = None) -> Any:
        if config.current is None:
            return base(self, query, vars)
        try:
            state: _State = self.connection._talisker
        except AttributeError:
            return base(self, query, vars)
        op = _cached_operation(query) if type(query) is str else None
        if op is None:
            op = _operation(query)
        deadline = _current_scope().deadline
        bound = False
        if deadline is not None:
            # The common case inline (a plain statement, the session's timeout
            # known): a function call here is a measurable share of the overhead.
            left = deadline.expires - _monotonic()
            session_ms = state.session_ms
            if (
                left > 0.0
                and session_ms is not None
                and type(query) is str
                and op not in _NOT_INLINE
                and self.name is None
            ):
                ms = _ceil(left * 1000.0)  # >= 1: statement_timeout 0 would mean no limit
                bound = not 0 < session_ms < ms
                if not bound:
                    ms = session_ms
                # In force until the transaction ends: an autocommit statement's own,
                # or one the application began (by hand, even in autocommit).
                state.dirty = True
                query = f"SET LOCAL statement_timeout = {ms}; {query}"
            else:
                return _run_bounded(self, base, state, op, query, vars, deadline)
        elif state.dirty or op in _SESSION_CHANGES:
            query = _unbounded(self, state, op, query)
        start = _perf_counter()
        try:
            result = base(self, query, vars)
        except Exception as exc:
            _finish(state.peer, state.db, op, start, exc, bound)
            raise
        _record_deferred(
            _expand, (state.peer, state.db, op, (_perf_counter() - start) * 1000.0, None, None)
        )
        return result

    method.__name__ = method.__qualname__ = name
    return method


def _run_bounded(
    cursor: Any,
    base: Callable[..., Any],
    state: _State,
    op: str,
    query: Any,
    vars: Any,
    deadline: Any,
) -> Any:
    """A statement under a deadline that the inline path does not handle."""
    query, bound, restore = _bounded(cursor, state, op, query, deadline)
    return _timed(base, cursor, query, vars, state, op, bound, restore)


def _timed(
    base: Callable[..., Any],
    cursor: Any,
    query: Any,
    vars: Any,
    state: _State,
    op: str,
    bound: bool,
    restore: str | None,
) -> Any:
    """``base(cursor, query, vars)``, recorded; then the session's timeout put back."""
    start = _perf_counter()
    try:
        try:
            result = base(cursor, query, vars)
        except Exception as exc:
            _finish(state.peer, state.db, op, start, exc, bound)
            raise
        _finish(state.peer, state.db, op, start)
    finally:
        if restore is not None:
            _restore_session(cursor.connection, restore)
    return result


def _time_left(state: _State, op: str, deadline: Any) -> float:
    """Seconds left; once none are, the query is recorded and DeadlineExceeded raised."""
    left: float = deadline.expires - _monotonic()
    if left <= 0:
        error = DeadlineExceeded(f"deadline exceeded {-left:.3f}s ago; query not sent")
        _finish(state.peer, state.db, op, _perf_counter(), error)
        raise error
    return left


def _bounded(
    cursor: Any, state: _State, op: str, query: Any, deadline: Any
) -> tuple[Any, bool, str | None]:
    """Under a deadline: fail fast once it has passed, else bound the statement by it.

    Returns the statement to send, whether the deadline (not the session's own
    ``statement_timeout``) is its bound, and the session's ``statement_timeout``
    to put back after it if the bound had to be set for the session.
    """
    left = _time_left(state, op, deadline)
    try:
        conn = cursor.connection
        named = cursor.name is not None
        if (
            named
            or op in _NOT_PREFIXABLE
            or (conn.autocommit and _outside_transaction_only(op, query))
        ):
            # A named cursor's DECLARE, COPY, VACUUM, CREATE INDEX CONCURRENTLY, CALL
            # of a procedure that commits...: a prefix would make a transaction
            # block of the query string, which they cannot be in or must not be in.
            if op in _SESSION_CHANGES:
                state.session_ms = None  # the application may be changing statement_timeout
            if conn.autocommit and conn.info.transaction_status == _IDLE:
                if named or op in _SESSION_BOUND_OPS:
                    return (query, *_bound_session(conn, state, left))
                return query, False, None  # LOCK, SHOW, LISTEN...: only the check above
            # In a transaction: bound what follows with a separate SET LOCAL.
            return query, _set_local_separately(conn, state, left), None
        ms, bound = _timeout_ms(conn, state, left)
        state.dirty = True
        if type(query) is str:
            return f"SET LOCAL statement_timeout = {ms}; {query}", bound, None
        return _prefixed(query, f"SET LOCAL statement_timeout = {ms}; "), bound, None
    except Exception:
        _log.log_once("psycopg2-prepare", "agent: preparing a query failed", exc_info=True)
        return query, False, None


def _unbounded(cursor: Any, state: _State, op: str, query: Any) -> Any:
    """No deadline: undo a SET LOCAL of ours still in force in this transaction."""
    try:
        if op in _SESSION_CHANGES:
            state.session_ms = None  # the application may be changing statement_timeout
        if state.dirty:
            return _without_timeout(cursor.connection, cursor, state, op, query)
    except Exception:
        _log.log_once("psycopg2-prepare", "agent: preparing a query failed", exc_info=True)
    return query


def _run_callproc(cursor: Any, base: Callable[..., Any], procname: Any, params: Any) -> Any:
    conn = cursor.connection
    state: _State | None = getattr(conn, "_talisker", None)
    if state is None:
        return base(cursor, procname, params)
    deadline = _current_scope().deadline
    bound = False
    restore = None
    if deadline is not None:
        left = _time_left(state, "call", deadline)
        try:
            if conn.autocommit and conn.info.transaction_status == _IDLE:
                bound, restore = _bound_session(conn, state, left)
            else:
                bound = _set_local_separately(conn, state, left)
        except Exception:
            _log.log_once("psycopg2-prepare", "agent: preparing a query failed", exc_info=True)
    elif state.dirty:
        _reset_separately(conn, state)
    return _timed(base, cursor, procname, params, state, "call", bound, restore)


def _without_timeout(conn: Any, cursor: Any, state: _State, op: str, query: Any) -> Any:
    """Outside a deadline: undo a SET LOCAL of ours still in force in this transaction."""
    status = conn.info.transaction_status
    if status == _IDLE:
        state.dirty = False  # the transaction that had it has ended
        return query
    if cursor.name is not None or op in _NOT_PREFIXABLE:
        _reset_separately(conn, state)
        return query
    state.dirty = False
    return _prefixed(query, _restore_statement(state) + "; ")


def _restore_statement(state: _State) -> str:
    """Back to the session's own statement_timeout for the rest of the transaction.

    ``TO DEFAULT`` would ignore a session-level ``SET`` of the application's; it
    is used only when that value is not known (the application changed it since).
    """
    if state.session_ms is None:
        return "SET LOCAL statement_timeout TO DEFAULT"
    return f"SET LOCAL statement_timeout = {state.session_ms}"


def _timeout_ms(conn: Any, state: _State, left: float) -> tuple[int, bool]:
    """Milliseconds for statement_timeout: the time left, never more than the session's own.

    Also whether the deadline is the bound (not the session's own timeout).
    """
    ms = _ceil(left * 1000.0) or 1  # never 0: 0 means no limit
    session_ms = state.session_ms
    if session_ms is None:
        session_ms = state.session_ms = _session_timeout_ms(conn)
    if 0 < session_ms < ms:
        return session_ms, False
    return ms, True


def _session_timeout_ms(conn: Any) -> int:
    """The session's statement_timeout (one round trip, once per connection)."""
    if conn.info.transaction_status == _INERROR:
        return 0
    cur = _BaseConnection.cursor(conn)
    try:
        cur.execute("SHOW statement_timeout")
        row = cur.fetchone()
    finally:
        cur.close()
    return parse_duration_ms(row[0]) if row else 0


def _set_local_separately(conn: Any, state: _State, left: float) -> bool:
    if conn.autocommit and conn.info.transaction_status == _IDLE:
        return False  # no transaction for a SET LOCAL to live in
    ms, bound = _timeout_ms(conn, state, left)
    cur = _BaseConnection.cursor(conn)
    try:
        cur.execute(f"SET LOCAL statement_timeout = {ms}")
    finally:
        cur.close()
    state.dirty = True
    return bound


def _bound_session(conn: Any, state: _State, left: float) -> tuple[bool, str | None]:
    """Autocommit, a statement that cannot take a prefix: set the session's timeout.

    One round trip before (reading the value to put back) and one after, in
    :func:`_restore_session`; nothing if the session's own timeout is shorter.
    Returns whether the deadline is the bound, and the value to put back.
    """
    ms, bound = _timeout_ms(conn, state, left)
    if not bound:
        return False, None  # the session's own, shorter timeout is in force already
    cur = _BaseConnection.cursor(conn)
    try:
        cur.execute(
            "SELECT current_setting('statement_timeout'),"
            " set_config('statement_timeout', %s, false)",
            (str(ms),),
        )
        row = cur.fetchone()
    finally:
        cur.close()
    return True, (row[0] if row else "0")


def _restore_session(conn: Any, value: str) -> None:
    """Put back the session's statement_timeout after :func:`_bound_session`. Never raises."""
    try:
        if conn.closed:
            return
        cur = _BaseConnection.cursor(conn)
        try:
            cur.execute("SELECT set_config('statement_timeout', %s, false)", (value,))
        finally:
            cur.close()
    except Exception:
        _log.log_once(
            "psycopg2-restore",
            "agent: restoring a session's statement_timeout failed",
            exc_info=True,
        )


def _reset_separately(conn: Any, state: _State) -> None:
    if conn.info.transaction_status not in (_IDLE, _INERROR):
        cur = _BaseConnection.cursor(conn)
        try:
            cur.execute(_restore_statement(state))
        finally:
            cur.close()
    state.dirty = False


def _prefixed(query: Any, prefix: str) -> Any:
    if isinstance(query, str):
        return prefix + query
    if isinstance(query, bytes):
        return prefix.encode() + query
    from psycopg2 import sql as pgsql

    if isinstance(query, pgsql.Composable):
        return pgsql.Composed([pgsql.SQL(prefix), query])
    return query


_UNITS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """PostgreSQL's ``SHOW`` form of a duration (``0``, ``500ms``, ``5s``, ``1min``) in ms."""
    text = text.strip()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :] or "ms"
    try:
        return max(0, math.ceil(float(number) * _UNITS[unit]))
    except (ValueError, KeyError):
        return 0


# -- connect ---------------------------------------------------------------------


def connect_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``psycopg2.connect``: the agent's connection class, the connect deadline."""
    if config.current is None or kwargs.get("async_") or kwargs.get("async"):
        return wrapped(*args, **kwargs)  # asynchronous connections are left alone
    try:
        if len(args) > 1:
            args = (args[0], connection_class(args[1]), *args[2:])
        else:
            kwargs["connection_factory"] = connection_class(kwargs.get("connection_factory"))
        deadline = _current_scope().deadline
        if deadline is not None:
            left = deadline.expires - _monotonic()
            if left <= 0:
                error = DeadlineExceeded(f"deadline exceeded {-left:.3f}s ago; not connecting")
                peer, db = _target(args, kwargs)
                _finish(peer, db, "connect", _perf_counter(), error)
                raise error
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
        conn._talisker = _State(
            naming.peer_name(info.host or "localhost", info.port), info.dbname or "unknown"
        )
    except Exception:
        _log.log_once(
            "psycopg2-state", "agent: reading a psycopg2 connection failed", exc_info=True
        )
    return conn


def _connect_timeout(args: tuple[Any, ...], kwargs: dict[str, Any], left: float) -> int:
    """Whole seconds: the time left, never more than the caller's own connect_timeout."""
    ours = max(_MIN_CONNECT_TIMEOUT, math.ceil(left))
    theirs = kwargs.get("connect_timeout")
    if theirs is None:
        theirs = _dsn_params(args, kwargs).get("connect_timeout") or os.environ.get(
            "PGCONNECT_TIMEOUT"
        )
    try:
        value = int(theirs) if theirs is not None else 0
    except (TypeError, ValueError):
        value = 0
    return ours if value <= 0 else min(ours, value)


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
    params = _dsn_params(args, kwargs)
    host = kwargs.get("host") or params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = kwargs.get("port") or params.get("port") or os.environ.get("PGPORT") or 5432
    db = kwargs.get("dbname") or kwargs.get("database") or params.get("dbname")
    db = db or os.environ.get("PGDATABASE") or "unknown"
    try:
        port_number: int | None = int(str(port).split(",")[0])
    except ValueError:
        port_number = None
    return naming.peer_name(str(host).split(",")[0], port_number), str(db)


PATCHES = (Patch("psycopg2", "connect", connect_wrapper),)

__all__ = ["PATCHES", "ConnectionMixin", "connection_class", "timed_cursor_class"]
