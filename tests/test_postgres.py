"""psycopg2 against the real PostgreSQL server: cursors, deadlines, metrics, compatibility."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import psycopg2
import psycopg2.extras
import psycopg2.pool
import pytest
from psycopg2 import extensions
from psycopg2 import sql as pgsql

import agent
from agent.sql import postgres
from tests.support.http import UnacceptingServer

QUERIES = "talisker.sql.queries"
ERRORS = "talisker.sql.errors"
LATENCY = "talisker.sql.latency"


@pytest.fixture
def pg(install_agent, postgres_dsn):
    """The agent installed and a DSN to the test server."""
    install_agent()
    return postgres_dsn


def sent(statsd, name=QUERIES, at_least=1):
    assert agent.flush(5)
    statsd.wait_for(lambda: statsd.total(name) >= at_least, 3)


def run_pg_sleep(conn, seconds: float) -> None:
    with conn.cursor() as cur:
        cur.execute("select pg_sleep(%s)", (seconds,))


# -- connections and cursors -----------------------------------------------------


def test_statements_inside_suppress_are_not_bounded_or_recorded(pg, statsd):
    conn = psycopg2.connect(pg)
    try:
        conn.autocommit = True
        with agent.deadline(0.3), agent.suppress():
            run_pg_sleep(conn, 0.6)  # would be cancelled at 0.3 s
            conn.cursor().callproc("pg_sleep", (0.6,))
        with agent.suppress():
            suppressed = psycopg2.connect(pg)  # still the agent's class
        with suppressed.cursor() as cur:
            cur.execute("select 1")  # recorded: outside suppress
        suppressed.close()
        with agent.deadline(0.3), pytest.raises(psycopg2.errors.QueryCanceled):  # the control
            run_pg_sleep(conn, 3)
    finally:
        conn.close()
    sent(statsd, ERRORS)
    statsd.wait_for(lambda: statsd.total(QUERIES) >= 2)
    assert statsd.total(QUERIES) == 2  # the control and select 1; no connect is a query
    assert statsd.total(QUERIES, operation="call") == 0


def test_the_application_gets_a_real_connection(pg):
    conn = psycopg2.connect(pg)
    try:
        assert isinstance(conn, extensions.connection)
        cur = conn.cursor()
        assert isinstance(cur, extensions.cursor)
        assert repr(type(cur)) == repr(extensions.cursor)
    finally:
        conn.close()


def test_cursor_takes_psycopg2s_parameters_as_psycopg2_does(pg, statsd):
    conn = psycopg2.connect(pg)
    try:
        for cur in (
            conn.cursor("a", psycopg2.extras.DictCursor, True, True),  # positional
            conn.cursor(name="b", cursor_factory=psycopg2.extras.DictCursor, scrollable=True,
                        withhold=True),
        ):  # fmt: skip
            assert isinstance(cur, psycopg2.extras.DictCursor)
            assert type(cur) is not psycopg2.extras.DictCursor  # timed
            assert (cur.withhold, cur.scrollable) == (True, True)
            cur.execute("select generate_series(1, 3)")
            cur.fetchall()
            cur.scroll(0, mode="absolute")  # scrollable
            conn.commit()
            assert cur.fetchone()[0] == 1  # withhold: open after the commit
            cur.close()
        cur = conn.cursor(None, None, False, None)
        assert (cur.name, cur.withhold, cur.scrollable) == (None, False, None)
        with pytest.raises(psycopg2.ProgrammingError):
            conn.cursor(None, None, False, False)  # psycopg2's own: not on an unnamed cursor
        conn.cursor_factory = psycopg2.extras.NamedTupleCursor  # read at each cursor()
        with conn.cursor() as cur:
            assert isinstance(cur, psycopg2.extras.NamedTupleCursor)
            cur.execute("select 1 as a")
            assert cur.fetchone().a == 1
        with pytest.raises(TypeError):
            conn.cursor(no_such_parameter=1)
        with pytest.raises(TypeError):
            conn.cursor(cursor_factory=dict)  # psycopg2's own check
    finally:
        conn.close()
    sent(statsd, at_least=3)
    assert statsd.total(QUERIES, operation="select") == 3


@pytest.mark.parametrize(
    "factory",
    [
        psycopg2.extras.DictConnection,
        psycopg2.extras.RealDictConnection,
        psycopg2.extras.LoggingConnection,
    ],
)
def test_a_connection_factory_is_honoured(pg, statsd, factory):
    conn = psycopg2.connect(pg, connection_factory=factory)
    try:
        assert isinstance(conn, factory)
        if factory is psycopg2.extras.LoggingConnection:
            conn.initialize(logging.getLogger("sqllog"))
        cur = conn.cursor()
        if factory is psycopg2.extras.DictConnection:
            assert isinstance(cur, psycopg2.extras.DictCursor)
        cur.execute("select 1 as a")
        assert cur.fetchone()[0 if factory is not psycopg2.extras.RealDictConnection else "a"] == 1
    finally:
        conn.close()
    sent(statsd)
    assert statsd.total(QUERIES, operation="select") == 1


def test_every_kind_of_cursor_is_timed(pg, statsd):
    conn = psycopg2.connect(pg, cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        with conn.cursor() as cur:  # the connection's cursor_factory
            cur.execute("select 1 as a")
            assert cur.fetchone() == {"a": 1}
        with conn.cursor(cursor_factory=psycopg2.extras.NamedTupleCursor) as cur:  # per call
            cur.execute("select 2 as b")
            assert cur.fetchone().b == 2
        with conn.cursor(cursor_factory=psycopg2.extras.DictCursor) as cur:
            cur.execute("select 3 as c")
            assert cur.fetchone()["c"] == 3
        with conn.cursor("server_side") as cur:  # named, server-side
            cur.execute("select generate_series(1, 5)")
            assert len(cur.fetchall()) == 5
        conn.commit()
    finally:
        conn.close()
    sent(statsd, at_least=4)
    assert statsd.total(QUERIES, operation="select") == 4


def test_pool_connections_are_timed(pg, statsd):
    for pool_class in (psycopg2.pool.SimpleConnectionPool, psycopg2.pool.ThreadedConnectionPool):
        pool = pool_class(1, 2, pg)
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("select 1")
        pool.putconn(conn)
        pool.closeall()
    sent(statsd, at_least=2)
    assert statsd.total(QUERIES) == 2


def test_execute_executemany_and_callproc_are_timed(pg, statsd):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("create temporary table t (n int)")
            cur.executemany("insert into t values (%s)", [(1,), (2,), (3,)])
            assert cur.rowcount == 3
            cur.execute(
                "create or replace function pg_temp.add_one(n int) returns int"
                " as $$ select n + 1 $$ language sql"
            )
            cur.callproc("pg_temp.add_one", (41,))
            assert cur.fetchone()[0] == 42
            cur.execute(b"update t set n = n + 1")
            cur.execute(pgsql.SQL("delete from {}").format(pgsql.Identifier("t")))
    finally:
        conn.close()
    sent(statsd, at_least=6)
    assert statsd.total(QUERIES, operation="insert") == 1  # executemany: one record
    assert statsd.total(QUERIES, operation="call") == 1
    assert statsd.total(QUERIES, operation="create") == 2
    assert statsd.total(QUERIES, operation="update") == 1
    assert statsd.total(QUERIES, operation="other") == 0
    assert statsd.total(QUERIES, operation="delete") == 1  # a Composed statement, rendered


# -- metrics -----------------------------------------------------------------------


def test_queries_are_counted_and_timed_with_peer_db_and_operation(pg, statsd):
    conn = psycopg2.connect(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("  /* leading comment */ -- and another\n SELECT 1")
            cur.execute("with x as (select 1) select * from x")
            cur.execute("select pg_sleep(0.05)")
        conn.commit()
    finally:
        conn.close()
    sent(statsd, at_least=3)
    (select,) = statsd.find(QUERIES, operation="select")
    assert select.tag_dict == {"peer": "127.0.0.1:5432", "db": "test", "operation": "select"} | {
        k: v for k, v in select.tag_dict.items() if k not in ("peer", "db", "operation")
    }
    assert select.value == 2
    assert statsd.total(QUERIES, operation="with") == 1
    assert max(statsd.samples(LATENCY, operation="select")) >= 50


def test_interleaved_statements_of_two_connections_are_each_counted_once(pg, statsd):
    """The hot path's records, grouped in runs per connection and operation, add up per tag set."""
    first, second = psycopg2.connect(pg), psycopg2.connect(pg)
    try:
        with first.cursor() as a, second.cursor() as b, agent.deadline(30):
            for statement in ("select 1", "values (1)") * 3:  # each seen before from the 2nd on
                a.execute(statement)
                a.execute(statement)
                b.execute(statement)
            b.execute("values (2)")
            a.execute("select 1")
        first.commit()
        second.commit()
    finally:
        first.close()
        second.close()
    sent(statsd, at_least=9)
    tags = {"peer": "127.0.0.1:5432", "db": "test"}
    assert statsd.total(QUERIES, operation="select", **tags) == 10
    assert statsd.total(QUERIES, operation="values", **tags) == 10
    assert len(statsd.samples(LATENCY, operation="select", **tags)) == 10
    assert len(statsd.samples(LATENCY, operation="values", **tags)) == 10
    assert len(statsd.find(QUERIES, operation="select", **tags)) == 1  # one line per tag set


def test_a_failed_query_reports_its_sqlstate(pg, statsd):
    conn = psycopg2.connect(pg)
    try:
        with pytest.raises(psycopg2.errors.UndefinedTable), conn.cursor() as cur:
            cur.execute("select * from no_such_table")
        conn.rollback()
        with pytest.raises(psycopg2.errors.SyntaxError), conn.cursor() as cur:
            cur.execute("selec 1")
    finally:
        conn.close()
    sent(statsd, ERRORS, 2)
    assert statsd.total(ERRORS, type="query", code="42P01", operation="select") == 1
    assert statsd.total(ERRORS, type="query", code="42601", operation="other") == 1


def test_a_failed_connect_is_a_connection_error(pg, statsd):
    port = UnacceptingServer()
    port.close()  # nothing listens there now
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=port.port, user="postgres", dbname="test")
    sent(statsd, ERRORS)
    (error,) = statsd.find(ERRORS)
    assert error.tag_dict["type"] == "connection" and error.tag("operation") == "connect"
    assert error.tag("peer") == f"127.0.0.1:{port.port}"
    assert statsd.total(QUERIES) == 0


class Interrupted(BaseException):
    """What gevent's ``Timeout`` is: a BaseException, not an Exception."""


@pytest.mark.parametrize("under_deadline", [False, True])
@pytest.mark.parametrize("composed", [False, True])
def test_a_statement_interrupted_by_a_base_exception_is_counted_not_an_error(
    pg, statsd, under_deadline, composed
):
    """Raised from psycopg2's wait callback, as gevent (psycogreen) interrupts a
    statement: the application gets it as raised; the statement is in
    ``sql.queries`` and ``sql.latency``, as an HTTP call given up is a 499, and
    not in ``sql.errors`` (the server did not fail)."""
    armed: list[bool] = []

    def wait(conn):
        if armed:
            armed.clear()
            raise Interrupted
        psycopg2.extras.wait_select(conn)

    extensions.set_wait_callback(wait)
    try:
        conn = psycopg2.connect(pg)
        conn.autocommit = True
        query = pgsql.SQL("select pg_sleep(0.01)") if composed else "select pg_sleep(0.01)"
        scope = agent.deadline(30) if under_deadline else contextlib.nullcontext()
        try:
            with scope, conn.cursor() as cur:
                cur.execute(query)  # the control (and the agent's reading of the session)
                armed.append(True)
                with pytest.raises(Interrupted):
                    cur.execute(query)
        finally:
            conn.close()
    finally:
        extensions.set_wait_callback(None)
    sent(statsd, at_least=2)
    assert statsd.total(QUERIES, operation="select") == 2
    assert len(statsd.samples(LATENCY, operation="select")) == 2
    assert statsd.total(ERRORS) == 0


# -- deadlines ---------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_query_is_cancelled_at_the_deadline(pg, statsd, autocommit):
    conn = psycopg2.connect(pg)
    conn.autocommit = autocommit
    try:
        start = time.monotonic()
        with agent.deadline(0.5), pytest.raises(psycopg2.errors.QueryCanceled):
            run_pg_sleep(conn, 3)
        assert time.monotonic() - start < 1.5
        if not autocommit:
            conn.rollback()
        start = time.monotonic()
        run_pg_sleep(conn, 0.6)  # right after the scope: no timeout left behind
        assert time.monotonic() - start >= 0.6
    finally:
        conn.close()
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="deadline", code="57014") == 1


def test_no_timeout_outlives_the_deadline_inside_a_transaction(pg):
    conn = psycopg2.connect(pg)
    try:
        with conn.cursor() as cur:  # the application's own session timeout is restored
            cur.execute("SET statement_timeout = 4000")
            with agent.deadline(5):
                cur.execute("select 1")
            cur.execute("show statement_timeout")
            assert cur.fetchone()[0] == "4s"
            cur.execute("RESET statement_timeout")
        conn.commit()
        with agent.deadline(5), conn.cursor() as cur:
            cur.execute("select 1")
        run_pg_sleep(conn, 0.6)  # same transaction, outside the scope
        with conn.cursor() as cur:
            cur.execute("show statement_timeout")
            assert cur.fetchone()[0] == "0"
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("show statement_timeout")
            assert cur.fetchone()[0] == "0"
    finally:
        conn.close()


def test_the_timeout_is_in_the_same_statement_and_never_zero(pg):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.query == b"select 1"  # no deadline: the statement as written
            with agent.deadline(0.0001):
                time.sleep(0.00005)
                try:
                    cur.execute("select 1")
                except agent.DeadlineExceeded:
                    pass
                else:
                    assert b"statement_timeout = 1;" in sent_statement(cur)
            with agent.deadline(2):
                cur.execute("select %s", ("x",))
                assert sent_statement(cur).startswith(b"SET LOCAL statement_timeout = ")
                assert sent_statement(cur).endswith(b"; select 'x'")
                ms = int(sent_statement(cur).split(b"= ")[1].split(b";")[0])
                assert 1 <= ms <= 2000
    finally:
        conn.close()


@pytest.mark.parametrize("one_clock", [True, False])
def test_the_inline_path_reads_the_deadline_on_its_own_clock(pg, statsd, monkeypatch, one_clock):
    """One clock reading serves the deadline and the timer only where they are one clock.

    Where they are not, the timer is set an hour back: read as the deadline's
    clock, it would give the statement an hour more than the deadline leaves.
    """
    from agent.instrumentation.psycopg2 import cursor as timed

    monkeypatch.setattr(timed, "_ONE_CLOCK", one_clock)
    if not one_clock:
        monkeypatch.setattr(timed, "_perf_counter", lambda: time.perf_counter() - 3600.0)
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            with agent.deadline(60):
                cur.execute("select 1")  # the session's timeout read: then the inline path
            assert "select 1" in timed._inline_ops
            assert conn._talisker.session_ms is not None
            with agent.deadline(60):  # a minute: half of it may pass on a busy machine
                cur.execute("select 1")
                assert 30_000 <= ours(cur) <= 60_000
                assert cur.fetchone() == (1,)
    finally:
        conn.close()
    sent(statsd, LATENCY, at_least=2)
    assert all(0.0 <= value < 60_000.0 for value in statsd.samples(LATENCY, operation="select"))


def test_statements_that_need_their_own_transaction_run_under_a_deadline(pg):
    """In autocommit a prefix would put them in a transaction block, where they fail."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {name} (x int)")
            cur.execute(f"CREATE PROCEDURE {name}_p() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$")
            with agent.deadline(30):
                for statement in (
                    f"CREATE INDEX CONCURRENTLY {name}_i ON {name} (x)",
                    f"DROP INDEX CONCURRENTLY {name}_i",
                    f"CALL {name}_p()",  # transaction control inside a procedure
                    "DO $$ BEGIN COMMIT; END $$",
                    f"CREATE DATABASE {name}",
                    f"DROP DATABASE {name}",
                ):
                    cur.execute(statement)
                # LOCK outside a transaction fails without the agent; it must fail with it.
                with pytest.raises(psycopg2.errors.NoActiveSqlTransaction):
                    cur.execute(f"LOCK TABLE {name}")
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}; DROP PROCEDURE IF EXISTS {name}_p")
        conn.close()


@pytest.mark.parametrize("autocommit", [True, False])
def test_instant_statements_in_a_transaction_get_no_set_local_of_their_own(pg, statsd, autocommit):
    """SAVEPOINT, RELEASE, ROLLBACK TO, SHOW...: only the deadline check, no extra round trip.

    What can run long and takes no prefix (a FETCH of a cursor declared by hand) still
    gets its own SET LOCAL first.
    """
    conn = psycopg2.connect(pg)
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur:
            if autocommit:
                cur.execute("BEGIN")
            with agent.deadline(30):
                cur.execute("SELECT 1")
                in_force = ours(cur)
                time.sleep(0.05)  # the time left in ms is now smaller than in_force
                for statement in ("SAVEPOINT s", "RELEASE SAVEPOINT s", "SAVEPOINT t"):
                    cur.execute(statement)
                    assert sent_statement(cur) == statement.encode()
                cur.execute("ROLLBACK TO SAVEPOINT t")
                cur.execute("SHOW statement_timeout")
                shown = postgres.parse_duration_ms(cur.fetchone()[0])
                assert shown == in_force  # no SET LOCAL sent since
            cur.execute("DECLARE c CURSOR FOR SELECT pg_sleep(3)")
            start = time.monotonic()
            with agent.deadline(0.5), pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("FETCH 1 FROM c")
            assert time.monotonic() - start < 1.5
        conn.rollback()
        with pytest.raises(agent.DeadlineExceeded), agent.deadline(0.0001), conn.cursor() as cur:
            time.sleep(0.001)
            cur.execute("SAVEPOINT u")  # the deadline is still checked
    finally:
        conn.close()
    sent(statsd, ERRORS, 2)
    assert statsd.total(ERRORS, type="deadline", code="57014", operation="fetch") == 1
    assert statsd.total(ERRORS, type="deadline", code="deadline", operation="savepoint") == 1


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda cur: cur.callproc("pg_sleep", (3,)), id="callproc"),
        pytest.param(lambda cur: cur.execute("DO $$ BEGIN PERFORM pg_sleep(3); END $$"), id="do"),
    ],
)
def test_what_cannot_take_a_prefix_is_bounded_in_autocommit_too(pg, statsd, run):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = 60000")  # the application's own
            start = time.monotonic()
            with agent.deadline(0.5), pytest.raises(psycopg2.errors.QueryCanceled):
                run(cur)
            assert time.monotonic() - start < 1.5
            cur.execute("SHOW statement_timeout")  # the session's value is put back
            assert cur.fetchone()[0] == "1min"
    finally:
        conn.close()
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="deadline", code="57014") == 1


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("ALTER SYSTEM SET work_mem = '8MB'", True),
        ("create tablespace t location '/x'", True),
        (b"DROP SUBSCRIPTION s", True),
        ("ALTER TABLE t DETACH PARTITION p CONCURRENTLY", True),
        ("CALL p()", True),
        ("do $$ begin null; end $$", True),
        ("LOCK TABLE t", True),
        ("CREATE TABLE t (x int)", False),
        ("ALTER TABLE t ADD COLUMN systems int", False),
        ("DROP TABLE t", False),
        ("SELECT 'concurrently'", False),
    ],
)
def test_what_must_run_outside_a_transaction_block_is_recognised(query, expected):
    from agent.sql import record as sql

    op = sql.operation(query)
    assert sql.outside_transaction_only(op, query) is expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT 1", "select"),
        (b"  insert into t values (1)", "insert"),
        ("((  /* a */ (--b\n  Values (1)", "values"),
        ("/* a */ /* b */ Update t set x = 1", "update"),
        ("-- only a comment", "other"),
        ("/* unterminated select", "other"),
        ("/*/ select */ delete from t", "delete"),
        ("-select", "other"),
        ("\u00a0\u2028with x as (select 1) select * from x", "with"),  # blanks beyond ASCII
        ("select\u00e4 1", "other"),  # a letter beyond ASCII makes the word another one
        ("LOC\u212a TABLE t", "lock"),  # the Kelvin sign lower-cases to k, as before
        ("selec 1", "other"),
        ("", "other"),
        (" " * 600 + "select", "other"),  # only the first 512 characters are looked at
    ],
)
def test_the_operation_is_the_first_keyword(query, expected):
    from agent.sql import record as sql

    assert sql._first_keyword(query) == expected
    text = query[:512].decode("ascii", "replace") if isinstance(query, bytes) else query[:512]
    assert sql._first_keyword_by_char(text) == expected


@pytest.mark.parametrize("autocommit", [True, False])
def test_the_agents_own_statements_read_tuples_whatever_the_cursor_factory(pg, autocommit):
    """Their rows are tuples (psycopg2's own cursor), not the RealDictRows of the factory."""
    conn = psycopg2.connect(pg, cursor_factory=psycopg2.extras.RealDictCursor)
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur:
            with agent.deadline(1), pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(3)")
            if not autocommit:
                conn.rollback()
            with agent.deadline(1), pytest.raises(psycopg2.errors.QueryCanceled):
                cur.callproc("pg_sleep", (3,))
    finally:
        conn.close()


def test_a_transaction_begun_by_hand_in_autocommit_keeps_no_timeout(pg):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            with agent.deadline(5):
                cur.execute("SELECT 1")
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "0"
            cur.execute("COMMIT")
    finally:
        conn.close()


def test_the_sessions_own_shorter_statement_timeout_is_kept(pg, statsd):
    conn = psycopg2.connect(pg, options="-c statement_timeout=300")
    conn.autocommit = True
    try:
        with agent.deadline(30):
            for _ in range(2):  # the first reads the session's timeout, the second knows it
                start = time.monotonic()
                with pytest.raises(psycopg2.errors.QueryCanceled):
                    run_pg_sleep(conn, 10)
                assert time.monotonic() - start < 5.0  # cut at 300 ms, not at 10 s
    finally:
        conn.close()
    sent(statsd, ERRORS, at_least=2)
    assert statsd.total(ERRORS, type="timeout", code="57014") == 2


def test_a_session_timeout_the_application_changes_is_read_again(pg, statsd):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        with agent.deadline(30):
            cur.execute("SELECT 1")  # the session's timeout (none) is read here
            cur.execute("SET statement_timeout = 300")
            start = time.monotonic()
            with pytest.raises(psycopg2.errors.QueryCanceled):
                run_pg_sleep(conn, 10)
            assert time.monotonic() - start < 5.0  # cut at 300 ms, not at 10 s
            cur.execute("DISCARD ALL")  # back to no session timeout: the deadline bounds
            cur.execute("SELECT pg_sleep(0.5)")
    finally:
        conn.close()
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="timeout", code="57014") == 1


# -- the application's own statement_timeout ----------------------------------------


def expect_cancelled(conn, seconds: float = 3) -> None:
    with pytest.raises(psycopg2.errors.QueryCanceled):
        run_pg_sleep(conn, seconds)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(("SET statement_timeout TO 10",), id="set"),
        pytest.param(("SET LOCAL statement_timeout = 10",), id="set-local"),
        pytest.param(("SET SESSION statement_timeout = '10ms'",), id="set-session"),
        pytest.param(("SELECT set_config('statement_timeout', '10', false)",), id="set_config"),
        pytest.param(
            ("SELECT set_config('statement_timeout', '10', true)",), id="set_config-local"
        ),
        pytest.param(
            ("SELECT set_config(%s, %s, false)", ("statement_timeout", "10")), id="set_config-vars"
        ),
        pytest.param(("SELECT 1; SET statement_timeout = 10",), id="multi-statement"),
        pytest.param(("DO $$ BEGIN SET statement_timeout = 10; END $$",), id="do"),
        pytest.param(
            (pgsql.SQL("SET statement_timeout = {}").format(pgsql.Literal(10)),), id="composed"
        ),
    ],
)
@pytest.mark.parametrize("first", ["change", "query"])
def test_the_applications_shorter_timeout_set_in_a_transaction_wins(pg, statsd, change, first):
    """psycopg2's test_transaction.py::QueryCancellationTests::test_statement_timeout, and kin."""
    conn = psycopg2.connect(pg)
    conn.set_isolation_level(extensions.ISOLATION_LEVEL_SERIALIZABLE)
    try:
        with agent.deadline(30), conn.cursor() as cur:
            if first == "query":
                cur.execute("SELECT 1")  # the session's timeout read, ours in force
            cur.execute(*change)
            expect_cancelled(conn)
        conn.rollback()
    finally:
        conn.close()
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="timeout", code="57014") == 1  # the application's bound


def test_a_set_local_of_the_application_ends_with_its_transaction(pg):
    conn = psycopg2.connect(pg)
    try:
        with agent.deadline(30):
            with conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout = 10")
            expect_cancelled(conn)
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout = 10")
                cur.execute("SELECT 1")
            conn.commit()
            run_pg_sleep(conn, 0.2)  # the next transaction: no timeout of 10 ms
    finally:
        conn.close()


def test_a_set_local_of_the_application_ends_with_a_transaction_begun_by_hand(pg):
    """In autocommit the agent sees no transaction end: its BEGIN, COMMIT carry no timeout."""
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            with agent.deadline(30):
                cur.execute("BEGIN")
                cur.execute("SET LOCAL statement_timeout = 10")
                cur.execute("SELECT 1")  # the application's 10 ms read in this transaction
                cur.execute("COMMIT")
            cur.execute("BEGIN")
            with agent.deadline(30):
                run_pg_sleep(conn, 0.2)  # the next transaction: no timeout of 10 ms
            cur.execute("COMMIT")
    finally:
        conn.close()


def test_a_set_local_of_the_application_ends_with_its_transaction_unseen(pg):
    """The next transaction begins with a statement without a deadline, which the agent skips."""
    conn = psycopg2.connect(pg)
    try:
        with conn.cursor() as cur:
            with agent.deadline(30):
                cur.execute("SET LOCAL statement_timeout = 10")
                cur.execute("SELECT 1")  # the application's 10 ms read in this transaction
            cur.execute("SELECT 2")  # ours undone
            conn.commit()
            cur.execute("SELECT 3")  # begins the next transaction
            with agent.deadline(30):
                run_pg_sleep(conn, 0.2)
    finally:
        conn.close()


def test_a_set_in_a_transaction_lasts_if_committed_and_not_if_rolled_back(pg):
    conn = psycopg2.connect(pg)
    try:
        with agent.deadline(30):
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = 10")
                cur.execute("SELECT 1")
            conn.rollback()
            run_pg_sleep(conn, 0.2)  # rolled back: no timeout
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = 10")
            conn.commit()
            expect_cancelled(conn)  # committed: the session's now
            conn.rollback()
            expect_cancelled(conn)
    finally:
        conn.close()


def test_a_rollback_to_a_savepoint_undoes_the_applications_timeout(pg):
    conn = psycopg2.connect(pg)
    try:
        with agent.deadline(30), conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.execute("SAVEPOINT s")
            cur.execute("SET LOCAL statement_timeout = 10")
            expect_cancelled(conn)
            cur.execute("ROLLBACK TO SAVEPOINT s")
            run_pg_sleep(conn, 0.2)
    finally:
        conn.close()


def test_a_reset_of_the_applications_timeout_is_seen(pg):
    conn = psycopg2.connect(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = 10")
        conn.commit()
        with agent.deadline(30):
            run_pg_sleep(conn, 0)  # the session's 10 ms read
            conn.commit()
            with conn.cursor() as cur:
                cur.execute("RESET statement_timeout")
            run_pg_sleep(conn, 0.2)
    finally:
        conn.close()


def test_a_connection_reset_is_seen(pg):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with agent.deadline(30):
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = 10")
                cur.execute("SELECT 1")  # the session's 10 ms read
            conn.reset()  # RESET ALL
            run_pg_sleep(conn, 0.2)
    finally:
        conn.close()


@pytest.mark.parametrize(
    "between", ["RESET search_path", "SELECT current_setting('statement_timeout')"]
)
def test_a_value_read_while_our_timeout_is_in_force_is_the_applications(pg, between):
    """SHOW then gives the agent's own SET LOCAL: it must not be taken for the application's."""
    conn = psycopg2.connect(pg)
    try:
        with conn.cursor() as cur:
            with agent.deadline(30):
                cur.execute("SELECT 1")
                cur.execute(between)
                cur.execute("SELECT 2")
            cur.execute("SHOW statement_timeout")  # same transaction, outside the scope
            assert cur.fetchone()[0] == "0"
        conn.commit()
        with agent.deadline(60), conn.cursor() as cur:
            cur.execute(
                "SELECT 3"
            )  # not bounded by the agent's earlier 30 s taken as the session's
            assert int(sent_statement(cur).split(b"= ")[1].split(b";")[0]) > 30000
    finally:
        conn.close()


def sent_statement(cur) -> bytes:
    """The statement psycopg2 last sent, prefix of ours included (``cur.query`` hides it)."""
    return psycopg2.extensions.cursor.query.__get__(cur)


def ours(cur) -> int:
    """The agent's statement_timeout in the prefix of the cursor's last statement."""
    return int(sent_statement(cur).split(b"= ")[1].split(b";")[0])


def test_a_timeout_of_ours_from_an_ended_transaction_is_not_taken_for_in_force(pg):
    """The application sets the very value the agent used in an earlier transaction."""
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            with agent.deadline(30):
                cur.execute("SELECT 1")  # its own transaction, with ours
                earlier = ours(cur)
                cur.execute(f"SET statement_timeout = {earlier}")
            with agent.deadline(60):
                cur.execute("BEGIN")
                cur.execute("SELECT 2")  # reads the application's value inside a transaction
            assert ours(cur) == earlier  # the application's, shorter than the time left
            cur.execute("COMMIT")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda cur: cur.execute(
                "DO $$ BEGIN PERFORM set_config('statement_timeout', '10', false); END $$"
            ),
            id="do",
        ),
        pytest.param(
            lambda cur: cur.callproc("set_config", ("statement_timeout", "10", False)),
            id="callproc",
        ),
    ],
)
def test_a_timeout_the_application_sets_under_a_session_bound_is_kept(pg, change):
    """In autocommit the agent bounds these with the session's timeout and puts it back after."""
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with agent.deadline(30), conn.cursor() as cur:
            cur.execute("SELECT 1")
            change(cur)
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "10ms"
            expect_cancelled(conn)
    finally:
        conn.close()


# -- the agent's own statements never change what the application's call raises ------------


class FailingWaitCallback:
    """psycopg2's wait_select as a wait callback, raising from its ``fail_at``-th call on."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_at: int | None = None

    def fail_after(self, calls: int) -> None:
        self.fail_at = self.calls + calls + 1

    def __call__(self, conn) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise ZeroDivisionError("the wait callback failed")
        psycopg2.extras.wait_select(conn)


@pytest.fixture
def failing_wait():
    previous = extensions.get_wait_callback()
    callback = FailingWaitCallback()
    extensions.set_wait_callback(callback)
    try:
        yield callback
    finally:
        extensions.set_wait_callback(previous)


def read_session_timeout(conn) -> None:
    with agent.deadline(30), conn.cursor() as cur:
        cur.execute("SELECT 1")  # the agent reads the session's statement_timeout
    conn.commit()


@pytest.mark.parametrize(
    ("prepare", "autocommit", "passed", "run"),
    [
        # the agent's SHOW statement_timeout on the first statement under a deadline
        pytest.param(None, False, 0, lambda c: c.cursor().execute("SELECT 1"), id="show"),
        # its SET LOCAL before a named cursor's DECLARE
        pytest.param(
            read_session_timeout,
            False,
            0,
            lambda c: c.cursor("n").execute("SELECT 1"),
            id="set-local",
        ),
        # its set_config before a callproc in autocommit, and the one putting the value back
        pytest.param(
            read_session_timeout,
            True,
            0,
            lambda c: c.cursor().callproc("pg_sleep", (0,)),
            id="session-bound",
        ),
        pytest.param(
            read_session_timeout,
            True,
            2,
            lambda c: c.cursor().callproc("pg_sleep", (0,)),
            id="session-restore",
        ),
    ],
)
def test_a_wait_callback_error_in_an_agent_statement_reaches_the_application(
    pg, failing_wait, prepare, autocommit, passed, run
):
    """psycopg2's test_green.py::CallbackErrorTestCase: its error, not 'cursor already closed'."""
    conn = psycopg2.connect(pg)
    try:
        if prepare is not None:
            prepare(conn)
        conn.autocommit = autocommit
        failing_wait.fail_after(passed)
        with agent.deadline(30), pytest.raises(ZeroDivisionError):
            run(conn)
        assert conn.closed  # as psycopg2 leaves it after a failed callback
    finally:
        conn.close()


def test_a_wait_callback_error_in_the_agents_restore_reaches_the_application(pg, failing_wait):
    """Outside the deadline the agent first undoes its SET LOCAL (separately for a named cursor)."""
    conn = psycopg2.connect(pg)
    try:
        with agent.deadline(30), conn.cursor() as cur:
            cur.execute("SELECT 1")
        failing_wait.fail_after(0)
        with pytest.raises(ZeroDivisionError):
            conn.cursor("n").execute("SELECT 1")
    finally:
        conn.close()


# -- psycopg2.sql statements ---------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_composed_statement_is_cancelled_at_the_deadline(pg, statsd, autocommit):
    conn = psycopg2.connect(pg)
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur:
            query = pgsql.SQL("SELECT pg_sleep({})").format(pgsql.Literal(3))
            with agent.deadline(1), pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute(query)
            # in the same statement: no extra round trip
            assert sent_statement(cur).startswith(b"SET LOCAL statement_timeout = ")
            assert sent_statement(cur).endswith(b"; SELECT pg_sleep(3)")
    finally:
        conn.close()
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="deadline", code="57014", operation="select") == 1


def composed_outcomes(dsn: str, texts: bool = True) -> list[object]:
    """Rows or errors of Composed statements; ``cursor.query`` and messages if ``texts``."""
    literal = pgsql.SQL("SELECT {}, %s").format
    statements = [
        ("execute", literal(pgsql.Literal("100%%")), ("x",)),
        ("execute", literal(pgsql.Literal("100%")), ("x",)),  # psycopg2 formats the rendering
        ("execute", literal(pgsql.Literal("it's")), None),
        ("executemany", pgsql.SQL("SELECT {}").format(pgsql.Placeholder()), [(1,), (2,)]),
        ("execute", pgsql.SQL("SELECT {}").format(pgsql.Literal(object())), None),
        ("execute", pgsql.Composed([]), None),
    ]
    seen: list[object] = []
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for method, statement, params in statements:
                try:
                    getattr(cur, method)(statement, params)
                except Exception as exc:
                    seen.append((type(exc), getattr(exc, "pgcode", None), texts and str(exc)))
                else:
                    rows = cur.fetchall() if cur.description else None
                    seen.append((rows, texts and cur.query))
    finally:
        conn.close()
    return seen


def test_composed_statements_behave_as_without_the_agent(install_agent, postgres_dsn):
    without = composed_outcomes(postgres_dsn)
    results_without = composed_outcomes(postgres_dsn, texts=False)
    install_agent()
    assert composed_outcomes(postgres_dsn) == without
    with agent.deadline(30):  # the query text gets the prefix, by design; nothing else changes
        assert composed_outcomes(postgres_dsn, texts=False) == results_without


def test_an_expired_deadline_raises_before_executing(pg, statsd):
    conn = psycopg2.connect(pg)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("create temporary table side_effect (n int)")
            with agent.deadline(0.01):
                time.sleep(0.02)
                with pytest.raises(agent.DeadlineExceeded):
                    cur.execute("insert into side_effect values (1)")
                with pytest.raises(TimeoutError):
                    cur.callproc("pg_sleep", (1,))
            cur.execute("select count(*) from side_effect")
            assert cur.fetchone()[0] == 0
    finally:
        conn.close()
    sent(statsd, ERRORS, 2)
    assert statsd.total(ERRORS, type="deadline", code="deadline") == 2


def test_an_expired_deadline_raises_before_connecting(pg, statsd):
    with agent.deadline(0.01):
        time.sleep(0.02)
        with pytest.raises(agent.DeadlineExceeded):
            psycopg2.connect(pg)
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="deadline", operation="connect") == 1


def test_connect_timeout_is_cut_to_the_deadline_and_merged(pg):
    def connect_timeout(dsn: str, seconds: float | None) -> str | None:
        with agent.deadline(seconds):
            conn = psycopg2.connect(dsn)
        try:
            return conn.get_dsn_parameters().get("connect_timeout")
        finally:
            conn.close()

    assert connect_timeout(pg, None) is None  # no deadline: nothing added
    assert connect_timeout(pg, 3.5) == "4"  # whole seconds, rounded up
    assert connect_timeout(pg, 0.3) == "2"  # libpq's minimum
    assert connect_timeout(pg + "?connect_timeout=3", 30) == "3"  # the caller's is shorter
    assert connect_timeout(pg + "?connect_timeout=60", 5) == "5"


def test_options_in_the_dsn_are_kept(pg):
    with agent.deadline(5):
        conn = psycopg2.connect(pg + "?options=-c%20search_path%3Dtalisker_test%2Cpublic")
    try:
        with conn.cursor() as cur:
            cur.execute("show search_path")
            assert cur.fetchone()[0] == "talisker_test,public"
    finally:
        conn.close()


def test_connecting_under_a_deadline_to_a_silent_server_gives_up(pg):
    server = UnacceptingServer()
    try:
        start = time.monotonic()
        with agent.deadline(1), pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="test")
        assert time.monotonic() - start < 3.5  # libpq's minimum is 2 s
    finally:
        server.close()


# -- never secrets -------------------------------------------------------------------


def test_no_password_or_sql_text_reaches_a_datagram_or_a_log(pg, statsd, caplog):
    secret = "s3cr3t-XYZ"
    dsn = pg.replace("postgres@", f"postgres:{secret}@")
    with caplog.at_level(logging.DEBUG):
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("select 'literal-value-123'")
                with pytest.raises(psycopg2.Error):
                    cur.execute("select * from secret_table_name where x = 'literal-value-456'")
        finally:
            conn.close()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(dsn.replace("5432", "1"))
        agent.flush(5)
    statsd.wait_for(lambda: statsd.total(ERRORS) >= 2)
    text = statsd.raw_text() + "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("agent")
    )
    for forbidden in (secret, "literal-value", "secret_table_name"):
        assert forbidden not in text


# -- psycopg2 features behave as without the agent ----------------------------------------


def exercise(dsn: str) -> list[object]:
    """Things applications do with psycopg2; returns what they observed."""
    seen: list[object] = []
    conn = psycopg2.connect(dsn)
    try:
        psycopg2.extras.register_uuid(conn_or_curs=conn)
        psycopg2.extras.register_default_jsonb(conn)
        psycopg2.extras.register_hstore  # noqa: B018 - importable
        point = extensions.new_type(
            (600,),
            "POINT",
            lambda v, c: None if v is None else tuple(map(float, v[1:-1].split(","))),
        )
        extensions.register_type(point, conn)
        seen.append(extensions.quote_ident("a b", conn))
        seen.append(extensions.adapt("it's").getquoted())
        adapted = extensions.adapt("é")
        adapted.prepare(conn)
        seen.append(adapted.getquoted())
        with conn, conn.cursor() as cur:
            u = uuid.UUID("12345678-1234-5678-1234-567812345678")
            cur.execute("select %s::uuid, '{\"a\": 1}'::jsonb, point(1, 2)", (u,))
            seen.append(cur.fetchone())
            cur.execute("do $$ begin raise notice 'hello'; end $$")
            seen.append([n.strip() for n in conn.notices])
            cur.execute("create temporary table copy_t (n int)")
            import io

            cur.copy_expert("copy copy_t from stdin", io.StringIO("1\n2\n"))
            out = io.StringIO()
            cur.copy_expert("copy copy_t to stdout", out)
            seen.append(out.getvalue())
            seen.append(cur.mogrify("select %s", ("x",)))
        try:
            with conn.cursor() as cur:
                cur.execute("select 1/0")
        except psycopg2.Error as exc:
            seen.append((type(exc), exc.pgcode))
        conn.rollback()
        seen.append((conn.status, conn.autocommit, conn.closed))
    finally:
        conn.close()
    return seen


def test_psycopg2_features_behave_as_without_the_agent(install_agent, postgres_dsn):
    without = exercise(postgres_dsn)
    install_agent()
    with agent.deadline(30):
        with_agent = exercise(postgres_dsn)
    assert with_agent == without


def test_async_connections_are_passed_through(pg):
    conn = psycopg2.connect(pg, async_=True)
    try:
        psycopg2.extras.wait_select(conn)
        assert type(conn) is extensions.connection
        cur = conn.cursor()
        cur.execute("select 1")
        psycopg2.extras.wait_select(conn)
        assert cur.fetchone() == (1,)
    finally:
        conn.close()


def test_sqlalchemy_works(pg, statsd):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(pg.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as c:
            assert c.execute(sqlalchemy.text("select 41 + 1")).scalar() == 42
            c.execute(sqlalchemy.text("create temporary table sa (n int)"))
            c.execute(sqlalchemy.text("insert into sa values (:n)"), [{"n": 1}, {"n": 2}])
            assert c.execute(sqlalchemy.text("select count(*) from sa")).scalar() == 2
    finally:
        engine.dispose()
    sent(statsd, at_least=3)
    assert statsd.total(QUERIES, operation="select") >= 2


def test_uninstall_leaves_connections_working_and_silent(install_agent, postgres_dsn, statsd):
    install_agent()
    conn = psycopg2.connect(postgres_dsn)
    agent.uninstall()
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
        assert type(psycopg2.connect(postgres_dsn)) is extensions.connection
    finally:
        conn.close()
    assert not statsd.wait_for(lambda: bool(statsd.datagrams), 0.3)


@pytest.mark.parametrize("autocommit", [True, False])
def test_cursor_query_is_the_statement_as_the_application_sent_it(pg, autocommit):
    """execute_batch callers (and psycopg2's own tests) read it; our prefix is not theirs."""
    import psycopg2.extras

    conn = psycopg2.connect(pg)
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur, agent.deadline(30):
            cur.execute("select %s", ("x",))
            assert sent_statement(cur).startswith(
                b"SET LOCAL statement_timeout = "
            )  # it was bounded
            assert cur.query == b"select 'x'"
            psycopg2.extras.execute_batch(cur, "select %s", [(i,) for i in range(5)])
            assert cur.query.count(b";") == 4
        with conn.cursor() as cur:  # an application's own SET LOCAL prefix stays whole
            cur.execute("SET LOCAL statement_timeout = 5000; select 1")
            assert cur.query == b"SET LOCAL statement_timeout = 5000; select 1"
    finally:
        conn.close()


class _EarlyStatementConnection(extensions.connection):
    """A factory that runs a statement while it is made: before the agent keeps anything for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.early = self.cursor()
        self.early.execute("select 1")
        self.commit()


@pytest.mark.parametrize("autocommit", [True, False])
def test_cursors_the_agent_did_not_see_made_are_bounded_and_timed(pg, statsd, autocommit):
    """A cursor made by calling its class, by a factory before connect returned, a named one."""
    conn = psycopg2.connect(pg, connection_factory=_EarlyStatementConnection)
    conn.autocommit = autocommit
    try:
        made = conn.cursor()
        direct = type(made)(conn)  # the timed class, called by the application itself
        assert type(direct) is type(made)
        with agent.deadline(30):
            for cur in (direct, conn.early, made, direct):
                cur.execute("select 1")
                assert sent_statement(cur).startswith(b"SET LOCAL statement_timeout = ")
                assert cur.query == b"select 1"
                assert cur.fetchone() == (1,)
        conn.commit()
        # A named cursor: its DECLARE takes no prefix.
        with conn.cursor("named", withhold=True) as named, agent.deadline(30):
            named.execute("select 1")
            assert not sent_statement(named).startswith(b"SET LOCAL")
            assert named.fetchone() == (1,)
        conn.commit()
    finally:
        conn.close()
    sent(statsd, at_least=5)
    # The one in the factory ran before connect returned: not the agent's to record.
    assert statsd.total(QUERIES, operation="select") == 5
