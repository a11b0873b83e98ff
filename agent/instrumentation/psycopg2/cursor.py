"""psycopg2's cursors: timed ``execute``, ``executemany`` and ``callproc``, bounded by the deadline.

:func:`timed_cursor_class` makes the subclass of whatever cursor class the
application chose; its statement methods are the per-query hot path. A plain
statement under a deadline whose session timeout is known gets its ``SET LOCAL``
prefix inline; anything else takes a slower path that asks the timeout policy
(:mod:`agent.sql.postgres`). ``cursor.query`` shows the statement without the
agent's prefix.
"""

from __future__ import annotations

import math
import time

from psycopg2 import extensions

from agent import config, context, metrics
from agent.context import DeadlineExceeded
from agent.sql import record
from agent.sql.postgres import (
    NO_EFFECT,
    State,
    after,
    agent_error,
    effect_of,
    plan,
    prefixed,
    restore_session,
    unbind,
)

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_BaseConnection = extensions.connection
_BaseCursor = extensions.cursor
_monotonic = time.monotonic
_perf_counter = time.perf_counter
_current_scope = context.current
_check = context.time_left
_operation = record.operation
_finish = record.finish
_expand_statements = record.expand_statements
#: metrics.record_deferred(_expand_statements, ...), for a frame and a lookup less.
_statements = metrics.sink(_expand_statements)
_NOT_PREFIXABLE = record.NOT_PREFIXABLE
#: Operations the inline path leaves to _bounded: no prefix, or a prefix only sometimes.
_NOT_INLINE = _NOT_PREFIXABLE | record.OUTSIDE_BLOCK_OPS
#: The operation of query strings seen before that have no effect on statement_timeout;
#: any other statement takes the slower _run_uncommon.
_plain_ops: dict[str, str] = {}
_plain_operation = _plain_ops.get
#: Those of them whose operation is not in _NOT_INLINE: the inline path's cache.
_inline_ops: dict[str, str] = {}
_inline_operation = _inline_ops.get
_PLAIN_LIMIT = 2048
_ceil = math.ceil
#: Whether the deadline's clock (monotonic) and the statement timer (perf_counter)
#: are one clock, as on Linux and macOS: then the inline path reads it once.
_ONE_CLOCK = (
    time.get_clock_info("monotonic").implementation
    == time.get_clock_info("perf_counter").implementation
)

__all__ = ["cursor_state", "execute_own", "timed_classes", "timed_cursor_class"]


_cursor_classes: dict[type, type] = {}
#: The timed subclass of each cursor class seen (read by ``connection.cursor()``).
timed_classes: dict[Any, Any] = _cursor_classes


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
            # so `query` can show the statement without it; and cursor_state().
            "__slots__": ("_talisker_prefix", "_talisker_state"),
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
    """A timed ``execute`` or ``executemany`` calling ``base``: the per-query hot path.

    The common case inline: an unnamed cursor of a connection the agent keeps a
    :class:`State` for (noted on the cursor when it is made), a query string seen
    before that the inline path may send with a prefix, the session's timeout known.
    A function call here is a measurable share of the overhead; anything else
    takes :func:`_run_other`.
    """

    def method(self: Any, query: Any, vars: Any = None) -> Any:
        if config.current is None:
            return base(self, query, vars)
        try:
            state: State | None = self._talisker_state
        except AttributeError:
            state = _cursor_state(self)
        scope = _current_scope()
        if state is None or scope.suppressed or type(query) is not str:
            return _run_other(self, base, state, query, vars)
        op = _inline_operation(query)
        if op is None:
            return _run_other(self, base, state, query, vars)
        deadline = scope.deadline
        if deadline is not None:
            # One reading for the deadline and the statement's start where the clocks
            # are one: the prefix built in between is timed with the statement.
            start = _perf_counter()
            left = deadline.expires - (start if _ONE_CLOCK else _monotonic())
            session_ms = state.session_ms
            if left <= 0.0 or session_ms is None:
                return _run_bounded(self, base, state, op, query, vars, deadline)
            ms = _ceil(left * 1000.0)  # >= 1: statement_timeout 0 would mean no limit
            if session_ms and session_ms < ms:  # never negative; 0: no timeout of its own
                ms = session_ms
                bound = False
            else:
                bound = True
            # In force until the transaction ends: an autocommit statement's own,
            # or one the application began (by hand, even in autocommit).
            state.ours_ms = ms
            self._talisker_prefix = ms  # an int: cheaper to keep than the prefix
            query = f"SET LOCAL statement_timeout = {ms}; {query}"
        else:
            bound = False
            if state.ours_ms:
                query = _unbounded(self, state, op, query)
            start = _perf_counter()
        try:
            result = base(self, query, vars)
        except Exception as exc:
            _finish(state.peer, state.db, op, start, exc, bound)
            raise
        except BaseException:  # interrupted (gevent's Timeout): counted, not an error
            _finish(state.peer, state.db, op, start)
            raise
        _statements.append((state, op, (_perf_counter() - start) * 1000.0))
        return result

    method.__name__ = method.__qualname__ = name
    return method


def cursor_state(cursor: Any) -> State | None:
    """What the inline path needs noted on a new cursor: its connection's State if it is unnamed.

    None for a named cursor (its ``DECLARE`` cannot take a prefix) or a connection the
    agent keeps nothing for: their statements take :func:`_run_other`.
    """
    if cursor.name is not None:
        return None
    state: State | None = getattr(cursor.connection, "_talisker", None)
    return state


def _cursor_state(cursor: Any) -> State | None:
    """A cursor not made by the agent's ``connection.cursor()``: noted at its first statement."""
    state = cursor_state(cursor)
    cursor._talisker_state = state
    return state


def _run_other(
    cursor: Any, base: Callable[..., Any], state: State | None, query: Any, vars: Any
) -> Any:
    """A statement the inline path leaves: suppressed, not a known plain string, a named cursor.

    ``state`` is the one noted on the cursor, None for a named cursor (or one made
    before the connection had one): then it is the connection's, if any.
    """
    if state is None:
        try:
            state = cursor.connection._talisker
        except AttributeError:
            return base(cursor, query, vars)
    scope = _current_scope()
    if scope.suppressed:
        return _run_suppressed(cursor, base, state, query, vars)
    op = _plain_operation(query) if type(query) is str else None
    deadline = scope.deadline
    if op is None:
        return _run_uncommon(cursor, base, state, query, vars, deadline)
    if deadline is not None:
        return _run_bounded(cursor, base, state, op, query, vars, deadline)
    if state.ours_ms:
        query = _unbounded(cursor, state, op, query)
    return _timed(base, cursor, query, vars, state, op, False, None)


def _run_uncommon(
    cursor: Any, base: Callable[..., Any], state: State, query: Any, vars: Any, deadline: Any
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
    effect = effect_of(query)
    if effect == NO_EFFECT and text:  # not the renderings, each with its own literals
        if len(_plain_ops) >= _PLAIN_LIMIT:
            _plain_ops.clear()
            _inline_ops.clear()
        _plain_ops[query] = op
        if op not in _NOT_INLINE:
            _inline_ops[query] = op
    if deadline is not None:
        query, bound, restore = _bounded(cursor, state, op, query, deadline)
    else:
        bound, restore = False, None
        if state.ours_ms:
            query = _unbounded(cursor, state, op, query)
    try:
        return _timed(base, cursor, query, vars, state, op, bound, restore)
    finally:
        if effect != NO_EFFECT:
            after(state, effect)


def _run_suppressed(
    cursor: Any, base: Callable[..., Any], state: State, query: Any, vars: Any
) -> Any:
    """Inside ``agent.suppress()``: as without the agent, and not under a deadline of ours.

    Nothing is recorded; a ``SET LOCAL`` of the agent's still in force in the
    transaction is undone first, as for any statement without a deadline.
    """
    if state.ours_ms:
        if type(query) is not str and type(query) is not bytes:
            query = _rendered(cursor, query)
        query = _unbounded(cursor, state, _operation(query), query)
    return base(cursor, query, vars)


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


def _run_bounded(
    cursor: Any,
    base: Callable[..., Any],
    state: State,
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
    state: State,
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
        except BaseException:  # as in the inline path: counted, not an error
            _finish(state.peer, state.db, op, start)
            raise
        _statements.append((state, op, (_perf_counter() - start) * 1000.0))
        failed = False
    finally:
        if restore is not None:
            # What the application's own statement raised wins over what ours does.
            restore_session(cursor.connection, state, restore, raising=not failed)
    return result


def _time_left(state: State, op: str, deadline: Any) -> float:
    """Seconds left; once none are, the query is recorded and DeadlineExceeded raised."""
    try:
        return _check(deadline, DeadlineExceeded, "; query not sent")
    except DeadlineExceeded as error:
        _finish(state.peer, state.db, op, _perf_counter(), error)
        raise


def _bounded(
    cursor: Any, state: State, op: str, query: Any, deadline: Any
) -> tuple[Any, bool, tuple[str, str] | None]:
    """Under a deadline: fail fast once it has passed, else bound the statement by it.

    Returns the statement to send, whether the deadline is its bound, and what
    :func:`restore_session` needs if the bound had to be set for the session.
    """
    left = deadline.expires - _monotonic()
    if left <= 0.0:
        _time_left(state, op, deadline)  # raises DeadlineExceeded, recorded
    conn = cursor.connection
    try:
        prefix, bound, restore = plan(conn, state, op, query, cursor.name is None, left)
    except Exception:
        agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
        return query, False, None
    if prefix is None:
        return query, bound, restore
    cursor._talisker_prefix = prefix
    return (prefix + query if type(query) is str else prefixed(query, prefix)), bound, None


def _unbounded(cursor: Any, state: State, op: str, query: Any) -> Any:
    """No deadline: undo a SET LOCAL of ours that may be in force in this transaction."""
    conn = cursor.connection
    try:
        prefix = unbind(conn, state, op, cursor.name is None)
    except Exception:
        agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
        return query
    if prefix is None:
        return query
    cursor._talisker_prefix = prefix
    return prefixed(query, prefix)


def _run_callproc(cursor: Any, base: Callable[..., Any], procname: Any, params: Any) -> Any:
    conn = cursor.connection
    state: State | None = getattr(conn, "_talisker", None)
    if state is None:
        return base(cursor, procname, params)
    effect = effect_of(procname)  # set_config by name
    scope = _current_scope()
    deadline = None if scope.suppressed else scope.deadline
    bound = False
    restore = None
    try:
        if deadline is not None:
            left = _time_left(state, "call", deadline)
            _, bound, restore = plan(conn, state, "call", procname, False, left)
        elif state.ours_ms:
            unbind(conn, state, "call", False)
    except DeadlineExceeded:
        raise
    except Exception:
        agent_error(conn, "psycopg2-prepare", "agent: preparing a query failed")
    try:
        if scope.suppressed:
            return base(cursor, procname, params)
        return _timed(base, cursor, procname, params, state, "call", bound, restore)
    finally:
        if effect != NO_EFFECT:
            after(state, effect)


def execute_own(conn: Any, statement: str, params: Any = None) -> Any:
    """One statement of the agent's on the application's connection: its first row, if any."""
    cur = _BaseConnection.cursor(conn, cursor_factory=_BaseCursor)  # tuples, whatever the factory
    try:
        cur.execute(statement, params)
        return cur.fetchone() if cur.description else None
    finally:
        cur.close()
