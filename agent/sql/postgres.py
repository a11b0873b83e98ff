"""PostgreSQL's timeouts under a deadline: the policy, whatever the driver.

What :mod:`agent.instrumentation.psycopg2` (and psycopg 3 when it comes) asks
here: what the application's own ``statement_timeout`` is (:func:`app_timeout_ms`),
which bound a statement gets (:func:`limit`), how a statement may change it
(:func:`effect_of`), the ``SET LOCAL`` prefix (:func:`prefixed`), and the slower
ways for statements that cannot take one (:func:`set_local_separately`,
:func:`bound_session` and :func:`restore_session`). See ``docs/postgresql.md``.

A connection is used only through what both drivers have: ``closed``,
``autocommit``, ``info.transaction_status`` (libpq's numbers) and, to run a
statement of the agent's, the driver's ``run(conn, statement, params)`` kept on
the connection's :class:`State`.
"""

from __future__ import annotations

import math
import os

from agent import _log, naming
from agent.sql.record import NOT_PREFIXABLE, OUTSIDE_BLOCK_OPS, outside_transaction_only

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    Run = Callable[..., Any]

#: libpq's PQtransactionStatus, as both drivers report it.
IDLE, INTRANS, INERROR = 0, 2, 3
#: Statements that, in autocommit, get the deadline as a session-level timeout
#: for their duration (two extra round trips): they cannot take a prefix and may
#: run long. Others that cannot (SHOW, LISTEN, LOCK...) only get the check.
SESSION_BOUND_OPS = frozenset(
    {"vacuum", "reindex", "cluster", "copy", "declare", "call", "do", "create", "drop", "alter"}
)
#: Statements that cannot take a prefix and are over in microseconds inside a transaction:
#: there they get only the deadline check, not a SET LOCAL of their own (a round trip).
#: Not COMMIT, END or PREPARE (deferred triggers run then), nor SET (``SET CONSTRAINTS
#: ... IMMEDIATE`` runs them too), nor FETCH, MOVE, COPY or what is not known.
INSTANT_OPS = frozenset(
    {"begin", "start", "savepoint", "release", "rollback", "abort", "show", "reset", "close",
     "listen", "unlisten", "discard"}
)  # fmt: skip
#: What a statement may do to the application's own statement_timeout (see effect_of).
NO_EFFECT, MAY_ROLL_BACK, MAY_SET = 0, 1, 2
#: libpq treats connect_timeout=1 as 2 seconds: ask for what it will do.
MIN_CONNECT_TIMEOUT = 2
_reset_words: Any = None
_rollback_words: Any = None
_ceil = math.ceil


class State:
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

    __slots__ = ("db", "ours_ms", "peer", "run", "session_ms", "txn_ms", "under_ms")

    def __init__(self, peer: str, db: str, run: Run) -> None:
        self.peer = peer
        self.db = db
        self.run = run  # the driver's way to run one statement of the agent's
        self.session_ms: int | None = None
        self.txn_ms: int | None = None
        self.ours_ms = 0  # never 0 when set: statement_timeout 0 is not sent
        self.under_ms = 0


def effect_of(query: Any) -> int:
    """What a statement may do to the application's ``statement_timeout``.

    ``MAY_SET``: any mention of ``statement_timeout`` (``SET [LOCAL|SESSION]``,
    in a multi-statement string or a ``DO`` block...), ``set_config`` (its name
    may be a parameter), the words ``RESET`` and ``DISCARD`` (``ALL``), a
    statement that is not text. ``MAY_ROLL_BACK``: ``ROLLBACK`` (``TO
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
        return MAY_SET
    if "statement_timeout" in text or "set_config" in text:
        return MAY_SET
    if _reset_words is None:
        import re

        _reset_words = re.compile(r"\b(?:reset|discard)\b")
        _rollback_words = re.compile(r"\b(?:rollback|abort)\b")
    if ("reset" in text or "discard" in text) and _reset_words.search(text):
        return MAY_SET
    if ("rollback" in text or "abort" in text) and _rollback_words.search(text):
        return MAY_ROLL_BACK
    return NO_EFFECT


def after(state: State, effect: int) -> None:
    """After a statement that may have changed the application's statement_timeout.

    A ``ROLLBACK TO SAVEPOINT`` may undo a change made in the transaction: what
    was read in it is forgotten either way.
    """
    if effect == MAY_SET:
        if state.session_ms is not None:
            state.under_ms = state.session_ms  # beneath a SET LOCAL of ours of the inline path
        state.session_ms = None
    state.txn_ms = None


def agent_error(conn: Any, key: str, message: str) -> None:
    """An agent statement or step failed: re-raised if it broke the connection, else logged.

    Called in an ``except`` block. A failed wait callback closes the connection,
    a lost server too, and an error in a transaction fails it: the application's
    own statement would have met that error, and without it it would get a
    different one ("cursor already closed", "current transaction is aborted").
    Otherwise the connection is as it was and the call goes through.
    """
    try:
        broken = bool(conn.closed) or conn.info.transaction_status == INERROR
    except Exception:
        broken = False
    if broken:
        raise  # noqa: PLE0704 - always called while handling an exception
    _log.log_once(key, message, exc_info=True)


def usable(conn: Any, state: State) -> int | None:
    """The transaction status if the agent's statements can run, else None.

    Idle: the transaction in which a SET LOCAL of ours, or a value read in it,
    was in force has ended.
    """
    if conn.closed:
        return None  # psycopg2 raises its own error for the application's statement
    status: int = conn.info.transaction_status
    if status == IDLE:
        state.ours_ms = 0
        state.txn_ms = None
        return status
    if status == INTRANS:
        return status
    return None  # a failed transaction: only its end (or a rollback to a savepoint) runs


def restore_statement(conn: Any, state: State) -> str | None:
    """What undoes a SET LOCAL of ours still in force in this transaction, if one may be.

    ``SET LOCAL statement_timeout = <the application's value>`` (``TO DEFAULT``
    would ignore a session-level ``SET`` of the application's).
    """
    if usable(conn, state) != INTRANS:
        return None  # ended; or failed, where nothing runs: ours stays noted until it ends
    ms = app_timeout_ms(conn, state)
    # Statements without a deadline are not looked at from here on: what was
    # read in this transaction cannot be known to be of it later.
    state.ours_ms = 0
    state.txn_ms = None
    return f"SET LOCAL statement_timeout = {ms}"


def app_timeout_ms(conn: Any, state: State) -> int:
    """The application's own statement_timeout now; a round trip if it is not known.

    Read at the start of a transaction, it is the session's and is kept as
    such; read inside one, it may be a ``SET LOCAL`` of the application's and is
    kept for that transaction only. ``SHOW`` gives the agent's own value while
    it is in force: the application's is then the one beneath it.
    """
    if state.session_ms is not None:
        return state.session_ms
    status = conn.info.transaction_status
    if status != IDLE and state.txn_ms is not None:
        return state.txn_ms
    row = state.run(conn, "SHOW statement_timeout")
    ms = parse_duration_ms(row[0]) if row else 0
    if status == IDLE:
        state.session_ms = ms
        return ms
    if state.ours_ms and ms == state.ours_ms:
        ms = state.under_ms
    state.txn_ms = ms
    return ms


def limit(app_ms: int, left: float) -> tuple[int, bool]:
    """Milliseconds for statement_timeout: the time left, never more than the application's.

    Also whether the deadline is the bound (not the application's own timeout).
    """
    ms = _ceil(left * 1000.0) or 1  # never 0: 0 means no limit
    if 0 < app_ms < ms:
        return app_ms, False
    return ms, True


def ours(conn: Any, state: State, left: float) -> tuple[int, bool]:
    """The value for a SET LOCAL of ours, noted as in force from here on."""
    app_ms = state.session_ms
    if app_ms is None:
        app_ms = app_timeout_ms(conn, state)
    ms = _ceil(left * 1000.0) or 1  # as limit(), inline
    bound = not 0 < app_ms < ms
    if not bound:
        ms = app_ms
    state.ours_ms = ms
    state.under_ms = app_ms
    return ms, bound


def set_local_separately(conn: Any, state: State, left: float) -> bool:
    """In a transaction (or one psycopg2 begins): a SET LOCAL of ours as its own statement."""
    ms, bound = ours(conn, state, left)
    state.run(conn, f"SET LOCAL statement_timeout = {ms}")
    return bound


def bound_session(conn: Any, state: State, left: float) -> tuple[bool, tuple[str, str] | None]:
    """Autocommit, a statement that cannot take a prefix: set the session's timeout.

    One round trip before (reading the value to put back) and one after, in
    :func:`restore_session`; nothing if the application's own timeout is shorter.
    Returns whether the deadline is the bound, and the session's value and ours.
    """
    ms, bound = limit(app_timeout_ms(conn, state), left)
    if not bound:
        return False, None  # the application's own, shorter timeout is in force already
    row = state.run(
        conn,
        "SELECT current_setting('statement_timeout'), set_config('statement_timeout', %s, false)",
        (str(ms),),
    )
    return True, ((row[0], row[1]) if row else None)


def restore_session(conn: Any, state: State, values: tuple[str, str], raising: bool) -> None:
    """Put back the session's statement_timeout after :func:`bound_session`.

    Only if it is still ours: a statement that set its own (a ``DO`` block
    calling ``set_config``) keeps it. Raises only what :func:`agent_error` does,
    and only if ``raising``.
    """
    try:
        if conn.closed:
            return
        row = state.run(
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
            agent_error(conn, "psycopg2-restore", message)
        else:
            _log.log_once("psycopg2-restore", message, exc_info=True)


def prefixed(query: Any, prefix: str) -> Any:
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


def plan(
    conn: Any, state: State, op: str, query: Any, prefixable: bool, left: float
) -> tuple[str | None, bool, tuple[str, str] | None]:
    """How a statement is bound by the ``left`` seconds of its deadline.

    Returns the ``SET LOCAL`` prefix to send it with (None: sent as it is),
    whether the deadline (not the application's own ``statement_timeout``) is its
    bound, and what :func:`restore_session` needs if the bound had to be set for
    the session. ``prefixable`` is False for what the driver sends itself
    (``callproc``) or as its own statement (a named cursor's ``DECLARE``).
    """
    status = usable(conn, state)
    if status is None:
        return None, False, None
    if (
        not prefixable
        or op in NOT_PREFIXABLE
        or (op in OUTSIDE_BLOCK_OPS and conn.autocommit and outside_transaction_only(op, query))
    ):
        # A named cursor's DECLARE, COPY, VACUUM, CREATE INDEX CONCURRENTLY, CALL
        # of a procedure that commits...: a prefix would make a transaction
        # block of the query string, which they cannot be in or must not be in.
        if conn.autocommit and status == IDLE:
            if not prefixable or op in SESSION_BOUND_OPS:
                return (None, *bound_session(conn, state, left))
            return None, False, None  # LOCK, SHOW, LISTEN...: only the deadline check
        if prefixable and op in INSTANT_OPS:
            return None, False, None  # SAVEPOINT, ROLLBACK, SHOW...: only the deadline check
        # In a transaction: bound what follows with a separate SET LOCAL.
        return None, set_local_separately(conn, state, left), None
    ms, bound = ours(conn, state, left)
    return f"SET LOCAL statement_timeout = {ms}; ", bound, None


def unbind(conn: Any, state: State, op: str, prefixable: bool) -> str | None:
    """No deadline: what undoes a SET LOCAL of ours that may be in force in this transaction.

    The prefix to send the statement with; or None, when there is nothing to undo
    or it could not take a prefix (it was undone by a statement of its own).
    """
    restore = restore_statement(conn, state)
    if restore is None:
        return None
    if prefixable and op not in NOT_PREFIXABLE:
        return restore + "; "
    state.run(conn, restore)
    return None


# -- connecting ---------------------------------------------------------------------


def connect_timeout(left: float, kwargs: Mapping[str, Any], params: Mapping[str, str]) -> int:
    """Whole seconds for libpq's ``connect_timeout``: the time left, never more than the
    caller's own (from the call's keywords, its DSN's ``params`` or ``PGCONNECT_TIMEOUT``)."""
    ours = max(MIN_CONNECT_TIMEOUT, math.ceil(left))
    theirs = kwargs.get("connect_timeout")
    if theirs is None:
        theirs = params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT")
    try:
        value = int(theirs) if theirs is not None else 0
    except (TypeError, ValueError):
        value = 0
    return ours if value <= 0 else min(ours, value)


def target(kwargs: Mapping[str, Any], params: Mapping[str, str]) -> tuple[str, str]:
    """``peer`` and ``db`` of a connection (one that failed: no ``info`` to read).

    From the call's keywords, its DSN's ``params``, libpq's environment, libpq's
    defaults; never the password.
    """
    host = kwargs.get("host") or params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = kwargs.get("port") or params.get("port") or os.environ.get("PGPORT") or 5432
    db = kwargs.get("dbname") or kwargs.get("database") or params.get("dbname")
    db = db or os.environ.get("PGDATABASE") or "unknown"
    try:
        port_number: int | None = int(str(port).split(",")[0])
    except ValueError:
        port_number = None
    return naming.peer_name(str(host).split(",")[0], port_number), str(db)
