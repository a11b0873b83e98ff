"""SQL queries, whatever driver runs them: operation names, error types, the record.

Instrumentation modules (:mod:`agent.instrumentation.psycopg2`) call
:func:`operation` and :func:`finish`; this module knows the metrics. No SQL
text, parameter or password ever becomes a tag or a log line: the only thing
taken from a statement is its first keyword, from a fixed set.
"""

from __future__ import annotations

import time
from itertools import groupby
from operator import itemgetter

from agent import metrics

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "classify_error",
    "expand_queries",
    "expand_statements",
    "finish",
    "operation",
    "outside_transaction_only",
]

#: First keywords reported as the ``operation`` tag; any other is ``other``.
OPERATIONS = frozenset(
    {
        "select", "insert", "update", "delete", "merge", "with", "values", "table",
        "create", "alter", "drop", "truncate", "comment", "grant", "revoke",
        "begin", "start", "commit", "end", "rollback", "savepoint", "release", "abort",
        "prepare", "execute", "deallocate", "declare", "fetch", "move", "close",
        "set", "reset", "show", "copy", "call", "do", "explain", "analyze", "vacuum",
        "lock", "listen", "unlisten", "notify", "refresh", "reindex", "cluster", "discard",
    }
)  # fmt: skip

#: Operations that must not run inside a transaction block: a ``SET LOCAL`` prefix
#: would make one of the query string (or they control transactions themselves).
NOT_PREFIXABLE = frozenset(
    {
        "vacuum", "reindex", "cluster", "begin", "start", "commit", "end", "rollback",
        "savepoint", "release", "abort", "prepare", "copy", "set", "reset", "show",
        "declare", "fetch", "move", "close", "discard", "listen", "unlisten", "other",
    }
)  # fmt: skip

#: First keywords of statements that behave differently inside a transaction block:
#: a procedure or ``DO`` block may ``COMMIT`` (which fails in one), and ``LOCK``
#: outside one fails (and must keep failing).
_OWN_TRANSACTION_OPS = frozenset({"call", "do", "lock"})
#: DDL that may be one of those that cannot run in a transaction block.
_DDL_OPS = frozenset({"create", "drop", "alter"})
#: The operations :func:`outside_transaction_only` may answer True for.
OUTSIDE_BLOCK_OPS = _OWN_TRANSACTION_OPS | _DDL_OPS
_no_block_words: Any = None


def outside_transaction_only(op: str, query: Any) -> bool:
    """Whether a statement must not be made part of a transaction block.

    ``CREATE INDEX CONCURRENTLY``, ``CREATE``/``DROP DATABASE``, ``ALTER SYSTEM``,
    ``CREATE TABLESPACE``, ``DROP SUBSCRIPTION``... cannot run in one; ``CALL``
    and ``DO`` may commit; ``LOCK`` outside one is an error the application must
    still get. DDL is told apart by its words (erring towards True, which only
    costs the statement its prefix); a query that is not text counts as True.
    """
    global _no_block_words
    if op in _OWN_TRANSACTION_OPS:
        return True
    if op not in _DDL_OPS:
        return False
    if isinstance(query, bytes):
        text = query.decode("ascii", "replace")
    elif isinstance(query, str):
        text = query
    else:
        return True
    if _no_block_words is None:
        import re

        _no_block_words = re.compile(
            r"\b(?:concurrently|database|tablespace|system|subscription)\b", re.IGNORECASE
        )
    return _no_block_words.search(text) is not None


_ops: dict[Any, str] = {}
_OPS_LIMIT = 2048
_perf_counter = time.perf_counter


def operation(query: Any) -> str:
    """The statement's first keyword, lower-cased, if in :data:`OPERATIONS`; else ``other``.

    Cached per query string: applications run the same statements again and again.
    """
    op = _ops.get(query) if type(query) in (str, bytes) else None
    if op is None:
        op = _first_keyword(query)
        if type(query) in (str, bytes):
            if len(_ops) >= _OPS_LIMIT:
                _ops.clear()
            _ops[query] = op
    return op


#: What comes before the first keyword (blanks, ``(``, ``-- ...`` and ``/* ... */``
#: comments, one unterminated running to the end), then its ASCII letters.
_LEADING = r"(?:[\s(]+|--[^\n]*\n?|/\*(?:.*?\*/|.*))*([A-Za-z]*)"
_leading: Any = None


def _first_keyword(query: Any) -> str:
    global _leading
    if isinstance(query, bytes):
        text = query[:512].decode("ascii", "replace")
    elif isinstance(query, str):
        text = query[:512]
    else:
        return "other"  # e.g. psycopg2.sql.Composed: rendering it needs a connection
    if _leading is None:
        import re

        _leading = re.compile(_LEADING, re.DOTALL)
    found = _leading.match(text)
    end = found.end()
    if end < len(text) and text[end].isalpha():
        return _first_keyword_by_char(text)  # a letter beyond ASCII ('\u212a'.lower() is 'k')
    word = found.group(1).lower()
    return word if word in OPERATIONS else "other"


def _first_keyword_by_char(text: str) -> str:
    """:func:`_first_keyword`, a character at a time: what ``_LEADING`` does, with any letters."""
    i, n = 0, len(text)
    while i < n:  # skip blanks, `-- ...` and `/* ... */` comments, and `(`
        c = text[i]
        if c.isspace() or c == "(":
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            break
    j = i
    while j < n and text[j].isalpha():
        j += 1
    word = text[i:j].lower()
    return word if word in OPERATIONS else "other"


def classify_error(error: BaseException, deadline_bound: bool = False) -> tuple[str, str]:
    """``(type, code)``: type ``deadline``, ``timeout``, ``connection`` or ``query``; a SQLSTATE."""
    from agent.context import DeadlineExceeded

    if isinstance(error, DeadlineExceeded):
        return "deadline", "deadline"
    code = getattr(error, "pgcode", None)
    if code == "57014":  # query_canceled: a statement timeout, ours or the application's
        return ("deadline" if deadline_bound else "timeout"), code
    if code is None:
        if type(error).__name__ in ("OperationalError", "InterfaceError"):
            return "connection", "08006"  # no SQLSTATE from libpq: connection failure
        return "query", "unknown"
    if code.startswith("08"):
        return "connection", code
    return "query", str(code)


def finish(
    peer: str,
    db: str,
    op: str,
    start: float,
    error: BaseException | None = None,
    deadline_bound: bool = False,
) -> None:
    """Record one query (or a failed connect); tags are built in the metrics thread.

    Never raises: it runs inside the application's own exception handling.
    """
    try:
        elapsed_ms = (_perf_counter() - start) * 1000.0
        if error is None:
            metrics.record_deferred(expand_queries, (peer, db, op, elapsed_ms, None, None))
        else:
            kind, code = classify_error(error, deadline_bound)
            metrics.record_deferred(expand_queries, (peer, db, op, elapsed_ms, kind, code))
    except Exception:
        from agent._log import log_once

        log_once("sql-record", "agent: recording a query failed", exc_info=True)


def expand_queries(payloads: list[tuple[Any, ...]]) -> list[tuple[int, str, Any, Any]]:
    """``sql.queries``, ``sql.latency`` and ``sql.errors`` of a flush (metrics thread)."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    errors: dict[tuple[str, str, str, str, str], int] = {}
    for peer, db, op, elapsed_ms, kind, code in payloads:
        if op != "connect":
            key = (peer, db, op)
            found = samples.get(key)
            if found is None:
                samples[key] = [elapsed_ms]
            else:
                found.append(elapsed_ms)
        if kind is not None:
            error_key = (peer, db, op, kind, code)
            errors[error_key] = errors.get(error_key, 0) + 1
    records: list[tuple[int, str, Any, Any]] = []
    for (peer, db, op), values in samples.items():
        tags = (("peer", peer), ("db", db), ("operation", op))
        records.append((metrics.COUNT, "sql.queries", len(values), tags))
        records.append((metrics.TIMING, "sql.latency", values, tags))
    for (peer, db, op, kind, code), n in errors.items():
        error_tags = (("peer", peer), ("db", db), ("operation", op), ("type", kind), ("code", code))
        records.append((metrics.COUNT, "sql.errors", n, error_tags))
    return records


_statement_state = itemgetter(0)
_statement_op = itemgetter(1)
_statement_ms = itemgetter(2)


def expand_statements(payloads: list[tuple[Any, str, float]]) -> list[tuple[int, str, Any, Any]]:
    """``sql.queries`` and ``sql.latency`` of statements that succeeded (metrics thread).

    The hot path's payload is ``(state, op, elapsed_ms)``, ``state`` being what the
    driver keeps per connection (its ``peer`` and ``db``): three items to put in a
    tuple. Runs of one connection's statements, and within them runs of one
    operation (the common case), are grouped in C (``groupby`` on items that are
    compared by identity first) rather than looked up one by one.
    """
    samples: dict[tuple[str, str, str], list[float]] = {}
    for state, of_state in groupby(payloads, _statement_state):
        peer, db = state.peer, state.db
        for op, group in groupby(of_state, _statement_op):
            key = (peer, db, op)
            found = samples.get(key)
            if found is None:
                samples[key] = list(map(_statement_ms, group))
            else:
                found.extend(map(_statement_ms, group))
    records: list[tuple[int, str, Any, Any]] = []
    for (peer, db, op), values in samples.items():
        tags = (("peer", peer), ("db", db), ("operation", op))
        records.append((metrics.COUNT, "sql.queries", len(values), tags))
        records.append((metrics.TIMING, "sql.latency", values, tags))
    return records
