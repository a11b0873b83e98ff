"""Per-query overhead of the psycopg2 instrumentation: `SELECT 1`, autocommit and in a transaction.

Two paths: ``psycopg2-autocommit`` (``SELECT 1`` on an autocommit connection)
and ``psycopg2-transaction`` (``SELECT 1`` and ``COMMIT``, a transaction per
call). In each, uninstrumented and instrumented rounds alternate in one run,
on ONE connection: raw rounds use psycopg2's own C cursor on it (which
nothing of the agent touches, so the agent stays installed and its threads
run as in an application), agent rounds the agent's timed cursor under a
deadline (which adds `SET LOCAL statement_timeout` to the statement), so
that all talk to the same server process (two backends differ by several µs
per round trip here, more than what is measured). Agent rounds send metrics
to a live DogStatsD receiver in its own process; an "agent, no deadline" row
shows the timing alone. The by-hand row (``byhand.py``) sends the agent's
prefix for the time left through psycopg2's own cursor and makes one metric
record. A second raw mode gives an A/A check: its ratio to the first says
how far the host's noise alone moves a ratio in this run.

The ddtrace and OpenTelemetry rows are the same loop in a worker process
started as their launchers start it (``_peer_worker.py``), on its own
connection, so on another backend: each worker also runs raw rounds through
psycopg2's own cursor on its connection, and a peer's added cost is taken
against those.

Every round runs each mode once, in an order shuffled from round to round;
rounds are short (100 queries) and many, so that the two rounds of a pair are
close in time and the host's drift cancels. Prints median µs per query, the
median ratio of the pairs to by hand with its interquartile range, and the
agent's added cost as a share of the cheaper peer's. Targets (issue 14, wall
time): agent / by hand at most 1.03, the agent's added cost at most 1/8 of
the cheaper peer's; ``--instructions`` counts the client's instructions.
Needs the PostgreSQL of TALISKER_TEST_POSTGRES_DSN (default the local test server).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TALISKER_ENABLED"] = "false"  # installed explicitly, round by round

import byhand  # noqa: E402
from _util import (  # noqa: E402
    RECEIVER,
    PeerWorker,
    add_common_options,
    available_peers,
    closed_port,
    format_ratio,
    instructions_mode,
    paired_ratio,
    print_wall,
    run_alternating,
    start,
    wall_rows,
    write_json,
)

import agent  # noqa: E402
from agent import config  # noqa: E402

DSN = os.environ.get("TALISKER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PATHS = ("psycopg2-autocommit", "psycopg2-transaction")
DEADLINE = 3600.0


def pin(conn) -> None:
    """Put the connection's server process on core 1 (the client runs on core 0).

    Round-trip latency depends on where the scheduler puts the backend relative
    to the client, and may change between rounds if it is not pinned. Needs the right to set another
    process's affinity (root, or the same user as the server); skipped otherwise.
    """
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        try:
            os.sched_setaffinity(conn.info.backend_pid, {1})
        except OSError:
            print("(could not pin the PostgreSQL backends: expect noisier figures)")


def run_round(call, n: int) -> float:
    begin = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - begin) / n * 1e6


def loops(conn, autocommit: bool):
    """The path's call through the agent's cursor, psycopg2's own, and by hand.

    Each is one frame around the statement (the agent's cursor method and
    ``byhand.pg_execute`` are each a frame more), as in the instruction counts'
    loops, so that no row pays for a frame another does not.
    """
    import psycopg2

    cur = conn.cursor()  # the agent's timed cursor
    raw_cur = psycopg2.extensions.connection.cursor(conn)  # psycopg2's own
    assert type(cur) is not type(raw_cur)
    commit = conn.commit if not autocommit else None

    def timed() -> None:
        cur.execute("SELECT 1")
        cur.fetchone()
        if commit is not None:
            commit()

    def raw() -> None:
        raw_cur.execute("SELECT 1")
        raw_cur.fetchone()
        if commit is not None:
            commit()

    def hand(request) -> object:
        execute = byhand.pg_execute

        def call() -> None:
            execute(raw_cur, request)
            raw_cur.fetchone()
            if commit is not None:
                commit()

        return call

    return timed, raw, hand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100, help="queries per round")
    parser.add_argument("--rounds", type=int, default=300, help="rounds per mode")
    add_common_options(parser)
    opts = parser.parse_args()
    if opts.instructions:
        return instructions_mode(PATHS, opts)

    import psycopg2

    peers = available_peers(opts.no_peers)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    receiver, statsd_port = start(RECEIVER)
    closed = closed_port()
    cfg = config.load({"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{statsd_port}"})
    results: dict[str, object] = {}
    try:
        # The agent stays installed, as in a running application: the raw
        # cursor is psycopg2's own class, which nothing of the agent touches.
        agent.install(cfg)
        for path in PATHS:
            conn = psycopg2.connect(DSN)
            conn.autocommit = path == "psycopg2-autocommit"
            pin(conn)
            timed, raw, hand = loops(conn, conn.autocommit)

            def raw_round(raw=raw) -> float:
                return run_round(raw, opts.queries)

            def hand_round(hand=hand) -> float:
                result = run_round(hand(byhand.Request(DEADLINE)), opts.queries)
                byhand.RECORDS.clear()
                return result

            def agent_round(seconds: float | None = DEADLINE, timed=timed) -> float:
                with agent.deadline(seconds):
                    result = run_round(timed, opts.queries)
                agent.flush(5)
                return result

            modes = {
                "raw": raw_round,
                "hand": hand_round,
                "agent": agent_round,
                "agent, no deadline": lambda agent_round=agent_round: agent_round(None),
                "raw again": raw_round,  # an A/A check: how far noise alone moves the ratio
            }
            for run in modes.values():
                for _ in range(5):
                    run()  # warm up
            workers = [PeerWorker(path, peer, closed, BENCH_DSN=DSN) for peer in peers]
            try:
                for peer, worker in zip(peers, workers, strict=True):
                    modes[peer] = lambda worker=worker: worker.round(opts.queries)
                    modes[f"{peer} raw"] = lambda worker=worker: worker.round(opts.queries, "raw")
                samples = run_alternating(modes, opts.rounds)
            finally:
                for worker in workers:
                    worker.close()
            conn.close()
            rows = wall_rows(samples)
            print_wall(path, rows)
            check = format_ratio(paired_ratio(samples["raw"], samples["raw again"]))
            print(f"  A/A check, raw against raw: {check} (should be 1.00; shows the noise)")
            results[path] = {"samples": samples, "rows": rows}
        agent.uninstall()
    finally:
        receiver.kill()
    write_json(opts, "sql_overhead", results, queries=opts.queries, rounds=opts.rounds)


if __name__ == "__main__":
    main()
