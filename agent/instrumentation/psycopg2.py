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
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_BaseConnection = extensions.connection
_BaseCursor = extensions.cursor
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS
_INERROR = extensions.TRANSACTION_STATUS_INERROR
_monotonic = time.monotonic
_perf_counter = time.perf_counter
_current_scope = context.current
_operation = sql.operation
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
#: What a statement may do to the application's own statement_timeout (see _effect).
_NO_EFFECT, _MAY_ROLL_BACK, _MAY_SET = 0, 1, 2
_reset_words: Any = None
_rollback_words: Any = None
#: The operation of query strings seen before that have no effect on statement_timeout:
#: the inline path's cache. Any other statement takes the slower _run_uncommon.
_plain_ops: dict[str, str] = {}
_plain_operation = _plain_ops.get
_PLAIN_LIMIT = 2048
_ceil = math.ceil
# libpq treats connect_timeout=1 as 2 seconds: ask for what it will do.
_MIN_CONNECT_TIMEOUT = 2


class _State:
    """What the agent keeps per connection.

    The application's own ``statement_timeout`` is known as ``session_ms`` (its
    session's value, good for later transactions too, as long as it runs nothing
    that may change it) or, once it changed it inside the open transaction, as
    ``txn_ms`` (read in that transaction, good until it ends; kept only while a
    SET LOCAL of ours is noted, so that the agent sees where the transaction
    ends: statements without a deadline are looked at only then). ``ours_ms`` is the
    value of a ``SET LOCAL`` of the agent's that may be in force in the open
    transaction, ``under_ms`` the application's value beneath it: ``SHOW`` gives
    ours while it is in force.
    """

    __slots__ = ("db", "ours_ms", "peer", "session_ms", "txn_ms", "under_ms")

    def __init__(self, peer: str, db: str) -> None:
        self.peer = peer
        self.db = db
        self.session_ms: int | None = None
        self.txn_ms: int | None = None
        self.ours_ms = 0  # never 0 when set: statement_timeout 0 is not sent
        self.under_ms = 0


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

    def reset(self) -> None:
        """psycopg2's ``reset()`` (``ABORT; RESET ALL``...): the agent forgets the timeouts."""
        state: _State | None = getattr(self, "_talisker", None)
        try:
            _BaseConnection.reset(self)
        finally:
            if state is not None:
                state.session_ms = state.txn_ms = None
                state.ours_ms = 0


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
            "query": property(_query_reader(factory.query), doc=_BaseCursor.query.__doc__),
            # The prefix of ours on the last prefixed statement (or its milliseconds),
            # so `query` can show the statement without it.
            "__slots__": ("_talisker_prefix",),
            "__module__": factory.__module__,
            "__doc__": factory.__doc__,
        },
    )
    _cursor_classes[factory] = cls
    return cls


def _query_reader(base: Any) -> Callable[[Any], Any]:
    """``cursor.query`` as the application sent it: without a prefix of ours.

    psycopg2 shows the statement last sent to the server; under a deadline that
    starts with the ``SET LOCAL`` the agent added (``execute_batch`` callers and
    tests count its ``;``). Only the exact prefix recorded for that statement is cut.
    """

    def query(self: Any) -> Any:
        sent = base.__get__(self, type(self))
        try:
            prefix = self._talisker_prefix
        except AttributeError:
            return sent
        if type(prefix) is int:  # the inline path keeps only the milliseconds
            prefix = f"SET LOCAL statement_timeout = {prefix}; "
        if type(sent) is bytes:
            encoded = prefix.encode("ascii")
            if sent.startswith(encoded):
                return sent[len(encoded) :]
        return sent

    return query


def _statement_method(base: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A timed ``execute`` or ``executemany`` calling ``base``: the per-query hot path."""

    def method(self: Any, query: Any, vars: Any = None) -> Any:
        if config.current is None:
            return base(self, query, vars)
        try:
            state: _State = self.connection._talisker
        except AttributeError:
            return base(self, query, vars)
        op = _plain_operation(query) if type(query) is str else None
        if op is None:
            return _run_uncommon(self, base, state, query, vars)
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
                and op not in _NOT_INLINE
                and self.name is None
            ):
                ms = _ceil(left * 1000.0)  # >= 1: statement_timeout 0 would mean no limit
                bound = not 0 < session_ms < ms
                if not bound:
                    ms = session_ms
                # In force until the transaction ends: an autocommit statement's own,
                # or one the application began (by hand, even in autocommit).
                state.ours_ms = ms
                self._talisker_prefix = ms  # an int: cheaper to keep than the prefix
                query = f"SET LOCAL statement_timeout = {ms}; {query}"
            else:
                return _run_bounded(self, base, state, op, query, vars, deadline)
        elif state.ours_ms:
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


def _run_uncommon(
    cursor: Any, base: Callable[..., Any], state: _State, query: Any, vars: Any
) -> Any:
    """A statement the inline path does not know.

    Seen for the first time, bytes, a ``psycopg2.sql.Composed`` (sent as the
    text it renders to), or one that may change the application's
    ``statement_timeout``, which the agent then reads again when it needs it.
    """
    text = type(query) is str
    if not text and type(query) is not bytes:
        query = _rendered(cursor, query)
    op = _operation(query)
    effect = _effect(query)
    if effect == _NO_EFFECT and text:  # not the renderings, each with its own literals
        if len(_plain_ops) >= _PLAIN_LIMIT:
            _plain_ops.clear()
        _plain_ops[query] = op
    deadline = _current_scope().deadline
    if deadline is not None:
        query, bound, restore = _bounded(cursor, state, op, query, deadline)
    else:
        bound, restore = False, None
        if state.ours_ms:
            query = _unbounded(cursor, state, op, query)
    try:
        return _timed(base, cursor, query, vars, state, op, bound, restore)
    finally:
        if effect != _NO_EFFECT:
            _after(state, effect)


def _rendered(cursor: Any, query: Any) -> Any:
    """The text of a ``psycopg2.sql.Composable``, as psycopg2 renders it; else ``query``.

    psycopg2 calls ``query.as_string(connection)`` itself; given the text, it
    sends the same bytes. If rendering fails, psycopg2 gets the original and
    raises what it would have.
    """
    if getattr(type(query), "as_string", None) is None:
        return query
    try:
        from psycopg2 import sql as pgsql

        if not isinstance(query, pgsql.Composable):
            return query
        text = query.as_string(cursor.connection)
    except Exception:
        return query
    return text if text and isinstance(text, (str, bytes)) else query


def _effect(query: Any) -> int:
    """What a statement may do to the application's ``statement_timeout``.

    ``_MAY_SET``: any mention of ``statement_timeout`` (``SET [LOCAL|SESSION]``,
    in a multi-statement string or a ``DO`` block...), ``set_config`` (its name
    may be a parameter), the words ``RESET`` and ``DISCARD`` (``ALL``), a
    statement that is not text. ``_MAY_ROLL_BACK``: ``ROLLBACK`` (``TO
    SAVEPOINT`` may undo the application's change). Only the words are looked
    at (erring towards an effect, which costs a ``SHOW`` later); a function
    whose body sets it, called by a statement that names neither, is not seen.
    Substring tests first: ``execute_batch`` sends kilobytes at a time.
    """
    global _reset_words, _rollback_words
    if isinstance(query, bytes):
        text = query.decode("latin-1").lower()
    elif isinstance(query, str):
        text = query.lower()
    else:
        return _MAY_SET
    if "statement_timeout" in text or "set_config" in text:
        return _MAY_SET
    if _reset_words is None:
        import re

        _reset_words = re.compile(r"\b(?:reset|discard)\b")
        _rollback_words = re.compile(r"\b(?:rollback|abort)\b")
    if ("reset" in text or "discard" in text) and _reset_words.search(text):
        return _MAY_SET
    if ("rollback" in text or "abort" in text) and _rollback_words.search(text):
        return _MAY_ROLL_BACK
    return _NO_EFFECT


def _after(state: _State, effect: int) -> None:
    """After a statement that may have changed the application's statement_timeout.

    A ``ROLLBACK TO SAVEPOINT`` may undo a change made in the transaction: what
    was read in it is forgotten either way.
    """
    if effect == _MAY_SET:
        if state.session_ms is not None:
            state.under_ms = state.session_ms  # beneath a SET LOCAL of ours of the inline path
        state.session_ms = None
    state.txn_ms = None


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
    restore: tuple[str, str] | None,
) -> Any:
    """``base(cursor, query, vars)``, recorded; then the session's timeout put back."""
    start = _perf_counter()
    failed = True
    try:
        try:
            result = base(cursor, query, vars)
        except Exception as exc:
            _finish(state.peer, state.db, op, start, exc, bound)
            raise
        _finish(state.peer, state.db, op, start)
        failed = False
    finally:
        if restore is not None:
            # What the application's own statement raised wins over what ours does.
            _restore_session(cursor.connection, state, restore, raising=not failed)
    return result


def _time_left(state: _State, op: str, deadline: Any) -> float:
    """Seconds left; once none are, the query is recorded and DeadlineExceeded raised."""
    left: float = deadline.expires - _monotonic()
    if left <= 0:
        error = DeadlineExceeded(f"deadline exceeded {-left:.3f}s ago; query not sent")
        _finish(state.peer, state.db, op, _perf_counter(), error)
        raise error
    return left


def _agent_error(conn: Any, key: str, message: str) -> None:
    """An agent statement or step failed: re-raised if it broke the connection, else logged.

    Called in an ``except`` block. A failed wait callback closes the connection,
    a lost server too, and an error in a transaction fails it: the application's
    own statement would have met that error, and without it it would get a
    different one ("cursor already closed", "current transaction is aborted").
    Otherwise the connection is as it was and the call goes through.
    """
    try:
        broken = bool(conn.closed) or conn.info.transaction_status == _INERROR
    except Exception:
        broken = False
    if broken:
        raise  # noqa: PLE0704 - always called while handling an exception
    _log.log_once(key, message, exc_info=True)


def _usable(conn: Any, state: _State) -> int | None:
    """The transaction status if the agent's statements can run, else None.

    Idle: the transaction in which a SET LOCAL of ours, or a value read in it,
    was in force has ended.
    """
    if conn.closed:
        return None  # psycopg2 raises its own error for the application's statement
    status: int = conn.info.transaction_status
    if status == _IDLE:
        state.ours_ms = 0
        state.txn_ms = None
        return status
    if status == _INTRANS:
        return status
    return None  # a failed transaction: only its end (or a rollback to a savepoint) runs


def _bounded(
    cursor: Any, state: _State, op: str, query: Any, deadline: Any
) -> tuple[Any, bool, tuple[str, str] | None]:
    """Under a deadline: fail fast once it has passed, else bound the statement by it.

    Returns the statement to send, whether the deadline (not the application's
    own ``statement_timeout``) is its bound, and what :func:`_restore_session`
    needs if the bound had to be set for the session.
    """
    left = _time_left(state, op, deadline)
    conn = cursor.connection
    try:
        status = _usable(conn, state)
        if status is None:
            return query, False, None
        named = cursor.name is not None
        if (
            named
            or op in _NOT_PREFIXABLE
            or (conn.autocommit and _outside_transaction_only(op, query))
        ):
            # A named cursor's DECLARE, COPY, VACUUM, CREATE INDEX CONCURRENTLY, CALL
            # of a procedure that commits...: a prefix would make a transaction
            # block of the query string, which they cannot be in or must not be in.
            if conn.autocommit and status == _IDLE:
                if named or op in _SESSION_BOUND_OPS:
                    return (query, *_bound_session(conn, state, left))
                return query, False, None  # LOCK, SHOW, LISTEN...: only the check above
            # In a transaction: bound what follows with a separate SET LOCAL.
            return query, _set_local_separately(conn, state, left), None
        ms, bound = _ours(conn, state, left)
        prefix = cursor._talisker_prefix = f"SET LOCAL statement_timeout = {ms}; "
        return _prefixed(query, prefix), bound, None
    except Exception:
        _agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
        return query, False, None


def _unbounded(cursor: Any, state: _State, op: str, query: Any) -> Any:
    """No deadline: undo a SET LOCAL of ours that may be in force in this transaction."""
    conn = cursor.connection
    try:
        restore = _restore_statement(conn, state)
        if restore is None:
            return query
        if cursor.name is None and op not in _NOT_PREFIXABLE:
            prefix = cursor._talisker_prefix = restore + "; "
            return _prefixed(query, prefix)
        _execute_own(conn, restore)
    except Exception:
        _agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
    return query


def _run_callproc(cursor: Any, base: Callable[..., Any], procname: Any, params: Any) -> Any:
    conn = cursor.connection
    state: _State | None = getattr(conn, "_talisker", None)
    if state is None:
        return base(cursor, procname, params)
    effect = _effect(procname)  # set_config by name
    deadline = _current_scope().deadline
    bound = False
    restore = None
    if deadline is not None:
        left = _time_left(state, "call", deadline)
        try:
            status = _usable(conn, state)
            if status == _IDLE and conn.autocommit:
                bound, restore = _bound_session(conn, state, left)
            elif status is not None:
                bound = _set_local_separately(conn, state, left)
        except Exception:
            _agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
    elif state.ours_ms:
        try:
            statement = _restore_statement(conn, state)
            if statement is not None:
                _execute_own(conn, statement)
        except Exception:
            _agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
    try:
        return _timed(base, cursor, procname, params, state, "call", bound, restore)
    finally:
        if effect != _NO_EFFECT:
            _after(state, effect)


def _restore_statement(conn: Any, state: _State) -> str | None:
    """What undoes a SET LOCAL of ours still in force in this transaction, if one may be.

    ``SET LOCAL statement_timeout = <the application's value>`` (``TO DEFAULT``
    would ignore a session-level ``SET`` of the application's).
    """
    if _usable(conn, state) != _INTRANS:
        return None  # ended; or failed, where nothing runs: ours stays noted until it ends
    ms = _app_timeout_ms(conn, state)
    # Statements without a deadline are not looked at from here on: what was
    # read in this transaction cannot be known to be of it later.
    state.ours_ms = 0
    state.txn_ms = None
    return f"SET LOCAL statement_timeout = {ms}"


def _app_timeout_ms(conn: Any, state: _State) -> int:
    """The application's own statement_timeout now; a round trip if it is not known.

    Read at the start of a transaction, it is the session's and is kept as
    such; read inside one, it may be a ``SET LOCAL`` of the application's and is
    kept for that transaction only. ``SHOW`` gives the agent's own value while
    it is in force: the application's is then the one beneath it.
    """
    if state.session_ms is not None:
        return state.session_ms
    status = conn.info.transaction_status
    if status != _IDLE and state.txn_ms is not None:
        return state.txn_ms
    row = _execute_own(conn, "SHOW statement_timeout")
    ms = parse_duration_ms(row[0]) if row else 0
    if status == _IDLE:
        state.session_ms = ms
        return ms
    if state.ours_ms and ms == state.ours_ms:
        ms = state.under_ms
    state.txn_ms = ms
    return ms


def _limit(app_ms: int, left: float) -> tuple[int, bool]:
    """Milliseconds for statement_timeout: the time left, never more than the application's.

    Also whether the deadline is the bound (not the application's own timeout).
    """
    ms = _ceil(left * 1000.0) or 1  # never 0: 0 means no limit
    if 0 < app_ms < ms:
        return app_ms, False
    return ms, True


def _ours(conn: Any, state: _State, left: float) -> tuple[int, bool]:
    """The value for a SET LOCAL of ours, noted as in force from here on."""
    app_ms = _app_timeout_ms(conn, state)
    ms, bound = _limit(app_ms, left)
    state.ours_ms = ms
    state.under_ms = app_ms
    return ms, bound


def _execute_own(conn: Any, statement: str, params: Any = None) -> Any:
    """One statement of the agent's on the application's connection: its first row, if any."""
    cur = _BaseConnection.cursor(conn, cursor_factory=_BaseCursor)  # tuples, whatever the factory
    try:
        cur.execute(statement, params)
        return cur.fetchone() if cur.description else None
    finally:
        cur.close()


def _set_local_separately(conn: Any, state: _State, left: float) -> bool:
    """In a transaction (or one psycopg2 begins): a SET LOCAL of ours as its own statement."""
    ms, bound = _ours(conn, state, left)
    _execute_own(conn, f"SET LOCAL statement_timeout = {ms}")
    return bound


def _bound_session(conn: Any, state: _State, left: float) -> tuple[bool, tuple[str, str] | None]:
    """Autocommit, a statement that cannot take a prefix: set the session's timeout.

    One round trip before (reading the value to put back) and one after, in
    :func:`_restore_session`; nothing if the application's own timeout is shorter.
    Returns whether the deadline is the bound, and the session's value and ours.
    """
    ms, bound = _limit(_app_timeout_ms(conn, state), left)
    if not bound:
        return False, None  # the application's own, shorter timeout is in force already
    row = _execute_own(
        conn,
        "SELECT current_setting('statement_timeout'), set_config('statement_timeout', %s, false)",
        (str(ms),),
    )
    return True, ((row[0], row[1]) if row else None)


def _restore_session(conn: Any, state: _State, values: tuple[str, str], raising: bool) -> None:
    """Put back the session's statement_timeout after :func:`_bound_session`.

    Only if it is still ours: a statement that set its own (a ``DO`` block
    calling ``set_config``) keeps it. Raises only what :func:`_agent_error` does,
    and only if ``raising``.
    """
    try:
        if conn.closed:
            return
        row = _execute_own(
            conn,
            "SELECT set_config('statement_timeout', %s, false)"
            " WHERE current_setting('statement_timeout') = %s",
            values,
        )
        if row is None:
            state.session_ms = state.txn_ms = None  # the statement changed it: read it again
    except Exception:
        message = "agent: restoring a session's statement_timeout failed"
        if raising:
            _agent_error(conn, "psycopg2-restore", message)
        else:
            _log.log_once("psycopg2-restore", message, exc_info=True)


def _prefixed(query: Any, prefix: str) -> Any:
    if isinstance(query, str):
        return prefix + query
    if isinstance(query, bytes):
        return prefix.encode() + query
    return query  # not text (a Composable that failed to render): psycopg2 raises its own


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
