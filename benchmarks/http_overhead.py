"""Per-request overhead of the HTTP instrumentation: urllib3, requests, httpx and aiohttp.

Keep-alive GETs against a fast loopback server running in its own process.
Uninstrumented and fully instrumented rounds alternate in one run (the agent is
installed and uninstalled between rounds): instrumented means a request
context and a deadline are active, and metrics go to a live DogStatsD receiver
in its own process. Prints the median µs per request of each and the ratio:
the median, over the rounds, of instrumented/raw for rounds taken one after
the other (on a noisy host, pairs taken close in time cancel the drift that
separate medians would carry), with its interquartile range; the order of the
modes is shuffled from round to round.

The by-hand row (``byhand.py``, docs/benchmarks.md) is the uninstrumented
client doing what the agent makes it do, written inline: the three headers,
the time left as connect and read timeout, one metric record. The ddtrace and
OpenTelemetry rows are the same loop in a worker process started as their
launchers start it (``_peer_worker.py``), a round at a time on command, their
rounds shuffled among the in-process ones. Each row's ratio is to by hand;
the agent's added cost over raw is also given as a share of the cheaper
peer's. The targets (issue 14) are judged in instructions: ``--instructions``
counts them (``instructions.py``) for the four paths in the five modes. httpx
(a sync ``Client``) and aiohttp (a ``ClientSession``, each call awaited in turn in
one run of the event loop per round) have no target of their own in issue 14:
their rows are reported.
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
from _instructions_child import aiohttp_session  # noqa: E402
from _util import (  # noqa: E402
    RECEIVER,
    SERVER,
    PeerWorker,
    add_common_options,
    available_peers,
    closed_port,
    instructions_mode,
    print_wall,
    run_alternating,
    run_awaited,
    start,
    wall_rows,
    write_json,
)

import agent  # noqa: E402
from agent import config  # noqa: E402

PATHS = ("urllib3", "requests", "httpx", "aiohttp")


def run_round(do_request, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        do_request()
    return (time.perf_counter() - start) / n * 1e6


def awaited_rounds(loop):
    """``run_round`` for an async ``do_request``: µs per call, awaited in ``loop``."""
    return lambda do_request, n: run_awaited(loop, do_request, n) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per mode")
    add_common_options(parser)
    opts = parser.parse_args()
    if opts.instructions:
        return instructions_mode(PATHS, opts)

    peers = available_peers(opts.no_peers)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    server, port = start(SERVER)
    receiver, statsd_port = start(RECEIVER)
    closed = closed_port()
    cfg = config.load({"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{statsd_port}"})
    results: dict[str, object] = {}
    try:
        import asyncio

        import aiohttp
        import httpx
        import requests
        import urllib3

        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1)
        session = requests.Session()
        client = httpx.Client()
        loop = asyncio.new_event_loop()
        aio_session = loop.run_until_complete(aiohttp_session())
        url = f"http://127.0.0.1:{port}/"

        async def aiohttp_get() -> bytes:
            async with aio_session.get(url) as response:
                return await response.read()

        clients = {
            "urllib3": (
                lambda: pool.urlopen("GET", "/").data,
                lambda request: lambda: byhand.urllib3_get(pool, request),
                run_round,
            ),
            "requests": (
                lambda: session.get(url).content,
                lambda request: lambda: byhand.requests_get(session, request, url),
                run_round,
            ),
            "httpx": (
                lambda: client.get(url).content,
                lambda request: lambda: byhand.requests_get(client, request, url, "httpx"),
                run_round,
            ),
            "aiohttp": (
                aiohttp_get,
                lambda request: (
                    lambda: byhand.aiohttp_get(aio_session, request, url, aiohttp.ClientTimeout)
                ),
                awaited_rounds(loop),
            ),
        }
        for name, (do_request, by_hand, runner) in clients.items():

            def raw_round(do_request=do_request, runner=runner) -> float:
                agent.uninstall()
                return runner(do_request, opts.requests)

            def hand_round(by_hand=by_hand, runner=runner) -> float:
                agent.uninstall()
                result = runner(by_hand(byhand.Request(3600)), opts.requests)
                byhand.RECORDS.clear()
                return result

            def agent_round(do_request=do_request, runner=runner) -> float:
                agent.install(cfg)
                with agent.request_context(deadline=3600):
                    result = runner(do_request, opts.requests)
                agent.flush(5)
                return result

            workers = [PeerWorker(name, peer, closed, BENCH_HTTP_PORT=str(port)) for peer in peers]
            try:
                modes = {"raw": raw_round, "hand": hand_round, "agent": agent_round}
                for run in modes.values():
                    run()  # warm up connections and caches
                for peer, worker in zip(peers, workers, strict=True):
                    modes[peer] = lambda worker=worker: worker.round(opts.requests)
                samples = run_alternating(modes, opts.rounds)
            finally:
                for worker in workers:
                    worker.close()
            agent.uninstall()
            rows = wall_rows(samples)
            print_wall(name, rows)
            results[name] = {"samples": samples, "rows": rows}
        loop.run_until_complete(aio_session.close())
        loop.close()
    finally:
        server.kill()
        receiver.kill()
    write_json(opts, "http_overhead", results, requests=opts.requests, rounds=opts.rounds)


if __name__ == "__main__":
    main()
