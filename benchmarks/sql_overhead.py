"""Per-query overhead of the psycopg2 instrumentation: `SELECT 1` on an autocommit connection.

Uninstrumented and instrumented rounds alternate in one run, on ONE connection:
raw rounds use psycopg2's own C cursor on it (which nothing of the agent
touches, so the agent stays installed and its threads run as in an
application), instrumented rounds the agent's timed cursor, so both talk to
the same server process (two backends differ by several µs per round trip
here, more than what is measured). Instrumented
rounds send metrics to a live DogStatsD receiver in its own process, once
without and once with a deadline active (which adds `SET LOCAL
statement_timeout` to the statement). Prints median µs per query and the median
ratio of rounds taken one after the other, with its interquartile range (the
order of the two rotates from round to round).

Targets: at most 1.05x raw without a deadline, at most 1.10x with one.
Needs the PostgreSQL of TALISKER_TEST_POSTGRES_DSN (default the local test server).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TALISKER_ENABLED"] = "false"  # installed explicitly, round by round

from _util import format_ratio, paired_ratio, run_alternating  # noqa: E402
from http_overhead import RECEIVER, start  # noqa: E402

import agent  # noqa: E402
from agent import config  # noqa: E402

DSN = os.environ.get("TALISKER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TARGETS = {"no deadline": 1.05, "deadline": 1.10}


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


def run_round(cur, n: int) -> float:
    begin = time.perf_counter()
    for _ in range(n):
        cur.execute("SELECT 1")
        cur.fetchone()
    return (time.perf_counter() - begin) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000, help="queries per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per mode")
    opts = parser.parse_args()

    import psycopg2

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    receiver, statsd_port = start(RECEIVER)
    cfg = config.load({"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{statsd_port}"})
    try:
        agent.install(cfg)
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        pin(conn)
        cur = conn.cursor()  # the agent's timed cursor
        raw_cur = psycopg2.extensions.connection.cursor(conn)  # psycopg2's own
        assert type(cur) is not type(raw_cur)
        for c in (raw_cur, cur):
            run_round(c, 500)  # warm up
        print(
            f"{'mode':<12} {'raw µs':>8} {'agent µs':>9} {'added':>7} "
            f"{'ratio (IQR)':>20} {'target':>7}"
        )
        for mode, seconds in (("no deadline", None), ("deadline", 3600.0)):
            # The agent stays installed, as in a running application: the raw
            # cursor is psycopg2's own class, which nothing of the agent touches.

            def agent_round(seconds: float | None = seconds) -> float:
                with agent.deadline(seconds):
                    result = run_round(cur, opts.queries)
                agent.flush(5)
                return result

            samples = run_alternating(
                {"raw": lambda: run_round(raw_cur, opts.queries), "agent": agent_round},
                opts.rounds,
            )
            raw, instrumented = samples["raw"], samples["agent"]
            r, i = statistics.median(raw), statistics.median(instrumented)
            ratio = paired_ratio(raw, instrumented)
            print(
                f"{mode:<12} {r:>8.1f} {i:>9.1f} {i - r:>+7.1f} {format_ratio(ratio):>20} "
                f"{TARGETS[mode]:>6.2f}x" + ("" if ratio[0] <= TARGETS[mode] else "  over target")
            )
        agent.uninstall()
    finally:
        receiver.kill()


if __name__ == "__main__":
    main()
