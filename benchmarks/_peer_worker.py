"""A wall-clock peer: one path's loop under ddtrace or OpenTelemetry, a round at a time.

``python _peer_worker.py PATH MODE``, started with the environment of
``_util.peer_process_env`` (the peer's bootstrap first on ``PYTHONPATH``, as
its launcher does), by ``_util.PeerWorker``. It sets the path up as the
in-process modes of the overhead script do (one keep-alive connection to the
loopback server of ``$BENCH_HTTP_PORT``, or one connection to
``$BENCH_DSN``, its backend put on core 1), checks that the peer's
instrumentation is in place, warms up, and prints ``ready``. Then each line
``KIND N`` on stdin is a round: N calls, answered with the µs per call (for
aiohttp, awaited one after the other in one run of the event loop).
KIND is ``peer`` (the loop, which the peer instruments) or, for psycopg2,
``raw`` (psycopg2's own cursor on the same connection, which the peer does
not touch: the peer's baseline on its own backend). Paths: ``urllib3``,
``requests``, ``httpx``, ``aiohttp``, ``psycopg2-autocommit``,
``psycopg2-transaction``.

Between rounds, outside the timing, the peer's tracer is flushed once
:data:`FLUSH_EVERY` calls have been made since the last flush (the agent's
rounds end with ``agent.flush()``). Not after every round: ddtrace's writer
sends to a closed port, and its exporter retries for about 3 s before it
drops the payload; its buffer (20 MB) holds far more than that many traces.
OpenTelemetry's exporters are ``none``: its flush does nothing. The writer's
"failed to send" errors are not logged, and the worker leaves without the
exit flush.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from _instructions_child import (
    _pg_connect,
    aiohttp_session,
    check_aiohttp,
    check_httpx,
    check_instrumented,
)
from _util import run_awaited

#: A path's rounds by kind: each takes a number of calls and returns the seconds they took.
Rounds = dict[str, Callable[[int], float]]

WARM_UP = 200
#: Calls between two flushes of the peer's tracer.
FLUSH_EVERY = 5000


def pin_client() -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})


def pin_backend(conn: object) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        try:
            os.sched_setaffinity(conn.info.backend_pid, {1})  # type: ignore[attr-defined]
        except OSError:
            pass


def setup_urllib3(mode: str) -> dict[str, Callable[[], object]]:
    import urllib3

    check_instrumented(mode, urllib3.connectionpool.HTTPConnectionPool, "urlopen")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", int(os.environ["BENCH_HTTP_PORT"]), maxsize=1)
    return {"peer": lambda: pool.urlopen("GET", "/").data}


def setup_requests(mode: str) -> dict[str, Callable[[], object]]:
    import requests

    check_instrumented(mode, requests.sessions.Session, "send")
    return setup_client(requests.Session())


def setup_httpx(mode: str) -> dict[str, Callable[[], object]]:
    import httpx

    check_httpx(mode)
    return setup_client(httpx.Client())


def setup_client(client: Any) -> dict[str, Callable[[], object]]:
    url = f"http://127.0.0.1:{os.environ['BENCH_HTTP_PORT']}/"
    return {"peer": lambda: client.get(url).content}


def setup_aiohttp(mode: str) -> Rounds:
    import asyncio

    check_aiohttp(mode)
    loop = asyncio.new_event_loop()
    url = f"http://127.0.0.1:{os.environ['BENCH_HTTP_PORT']}/"
    session = loop.run_until_complete(aiohttp_session())

    async def get() -> None:
        async with session.get(url) as response:
            await response.read()

    return {"peer": lambda count: run_awaited(loop, get, count)}


def looped(calls: dict[str, Callable[[], object]]) -> Rounds:
    """Rounds of a path's sync calls: each the call in a loop, timed."""

    def timed(call: Callable[[], object]) -> Callable[[int], float]:
        def run(count: int) -> float:
            start = time.perf_counter()
            for _ in range(count):
                call()
            return time.perf_counter() - start

        return run

    return {kind: timed(call) for kind, call in calls.items()}


def raw_cursor(conn: object) -> object:
    """psycopg2's own cursor on the peer's connection (ddtrace's is a proxy of one)."""
    import psycopg2

    base = getattr(conn, "__wrapped__", conn)
    cursor = psycopg2.extensions.connection.cursor(base, cursor_factory=psycopg2.extensions.cursor)
    if type(cursor) is not psycopg2.extensions.cursor:
        raise SystemExit(f"the raw cursor is a {type(cursor)!r}")
    return cursor


def setup_pg(mode: str, autocommit: bool) -> dict[str, Callable[[], object]]:
    conn = _pg_connect(mode, autocommit=autocommit)
    pin_backend(getattr(conn, "__wrapped__", conn))
    cur, raw = conn.cursor(), raw_cursor(conn)
    if type(cur) is type(raw):
        raise SystemExit(f"{mode} gave psycopg2's own cursor: it is not in place")
    commit = conn.commit
    base_commit = getattr(conn, "__wrapped__", conn).commit

    def call(cur=cur) -> None:
        cur.execute("SELECT 1")
        cur.fetchone()

    def call_commit(cur=cur) -> None:
        cur.execute("SELECT 1")
        cur.fetchone()
        commit()

    def raw_commit(cur=raw) -> None:
        cur.execute("SELECT 1")
        cur.fetchone()
        base_commit()

    def raw_call(cur=raw) -> None:  # as `call`: no frame of its own in between
        cur.execute("SELECT 1")
        cur.fetchone()

    if autocommit:
        return {"peer": call, "raw": raw_call}
    return {"peer": call_commit, "raw": raw_commit}


SETUPS: dict[str, Callable[[str], Rounds]] = {
    "urllib3": lambda mode: looped(setup_urllib3(mode)),
    "requests": lambda mode: looped(setup_requests(mode)),
    "httpx": lambda mode: looped(setup_httpx(mode)),
    "aiohttp": setup_aiohttp,
    "psycopg2-autocommit": lambda mode: looped(setup_pg(mode, autocommit=True)),
    "psycopg2-transaction": lambda mode: looped(setup_pg(mode, autocommit=False)),
}


def flusher(mode: str) -> Callable[[], object]:
    """What ends a round: the peer's spans written (to the closed port) or dropped."""
    if mode == "ddtrace":
        import logging

        from ddtrace.trace import tracer

        logging.getLogger("ddtrace.internal.writer.writer").setLevel(logging.CRITICAL)
        return tracer.flush
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return getattr(provider, "force_flush", lambda: None)


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    pin_client()
    rounds = SETUPS[path](mode)
    flush = flusher(mode)
    for run in rounds.values():
        run(WARM_UP)
    print("ready", flush=True)
    unflushed = WARM_UP * len(rounds)
    for line in sys.stdin:
        kind, n = line.split()
        count = int(n)
        seconds = rounds[kind](count)
        unflushed += count
        if unflushed >= FLUSH_EVERY:
            flush()
            unflushed = 0
        print(f"{seconds / count * 1e6:.3f}", flush=True)
    os._exit(0)  # nothing left to keep: no exit flush to the closed port


if __name__ == "__main__":
    main()
