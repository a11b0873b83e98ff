"""Per-query overhead of the psycopg2 instrumentation: `SELECT 1` on an autocommit connection.

Uninstrumented and instrumented rounds alternate in one run, on ONE connection:
raw rounds use psycopg2's own C cursor on it (which nothing of the agent
touches, so the agent stays installed and its threads run as in an
application), instrumented rounds the agent's timed cursor, so both talk to
the same server process (two backends differ by several µs per round trip
here, more than what is measured). Instrumented rounds send metrics to a live
DogStatsD receiver in its own process, without and with a deadline active
(which adds `SET LOCAL statement_timeout` to the statement). A "by hand" round
sends that same prefix through the raw cursor: what the deadline costs with no
agent code at all. A second raw mode gives an A/A check: its ratio to the first
says how far the host's noise alone moves a ratio in this run.

Every round runs each mode once, in an order shuffled from round to round;
rounds are short (100 queries) and many, so that the two rounds of a pair are
close in time and the host's drift cancels. Prints median µs per query and the
median ratio of the pairs, with its interquartile range.

Targets: at most 1.05x raw without a deadline, at most 1.10x with one.
Needs the PostgreSQL of TALISKER_TEST_POSTGRES_DSN (default the local test server).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TALISKER_ENABLED"] = "false"  # installed explicitly, round by round

from _util import RECEIVER, format_ratio, paired_ratio, run_alternating, start  # noqa: E402

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


def run_round(cur, n: int, query: str = "SELECT 1") -> float:
    begin = time.perf_counter()
    for _ in range(n):
        cur.execute(query)
        cur.fetchone()
    return (time.perf_counter() - begin) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100, help="queries per round")
    parser.add_argument("--rounds", type=int, default=300, help="rounds per mode")
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
        # The agent stays installed, as in a running application: the raw
        # cursor is psycopg2's own class, which nothing of the agent touches.
        cur = conn.cursor()  # the agent's timed cursor
        raw_cur = psycopg2.extensions.connection.cursor(conn)  # psycopg2's own
        assert type(cur) is not type(raw_cur)
        seconds = 3600.0

        def raw_round() -> float:
            return run_round(raw_cur, opts.queries)

        def hand_round() -> float:
            # The agent's prefix, for the time left, sent by the application itself.
            ms = math.ceil(seconds * 1000)
            return run_round(raw_cur, opts.queries, f"SET LOCAL statement_timeout = {ms}; SELECT 1")

        def agent_round(seconds: float | None = None) -> float:
            with agent.deadline(seconds):
                result = run_round(cur, opts.queries)
            agent.flush(5)
            return result

        modes = {
            "raw": raw_round,
            "hand": hand_round,
            "agent": agent_round,
            "agent deadline": lambda: agent_round(seconds),
            "raw again": raw_round,  # an A/A check: how far noise alone moves the ratio
        }
        for run in modes.values():
            for _ in range(5):
                run()  # warm up
        samples = run_alternating(modes, opts.rounds)
        raw, hand = samples["raw"], samples["hand"]
        print(
            f"{'mode':<12} {'raw µs':>8} {'by hand':>8} {'agent µs':>9} {'added':>7} "
            f"{'ratio (IQR)':>20} {'target':>7} {'vs hand (IQR)':>20}"
        )
        for mode, name, by_hand in (
            ("no deadline", "agent", None),
            ("deadline", "agent deadline", hand),
        ):
            instrumented = samples[name]
            r, i = statistics.median(raw), statistics.median(instrumented)
            ratio = paired_ratio(raw, instrumented)
            hand_cells = (
                (
                    f"{statistics.median(by_hand):>8.1f}",
                    f"{format_ratio(paired_ratio(by_hand, instrumented)):>20}",
                )
                if by_hand
                else (f"{'-':>8}", f"{'-':>20}")
            )
            print(
                f"{mode:<12} {r:>8.1f} {hand_cells[0]} {i:>9.1f} {i - r:>+7.1f} "
                f"{format_ratio(ratio):>20} {TARGETS[mode]:>6.2f}x {hand_cells[1]}"
                + ("" if ratio[0] <= TARGETS[mode] else "  over target")
            )
        check = format_ratio(paired_ratio(raw, samples["raw again"]))
        print(f"A/A check, raw against raw: {check} (should be 1.00; shows the noise)")
        agent.uninstall()
    finally:
        receiver.kill()


if __name__ == "__main__":
    main()
