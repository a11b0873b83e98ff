"""Per-request overhead of the HTTP instrumentation, urllib3 and requests.

Keep-alive GETs against a fast loopback server running in its own process.
Uninstrumented and fully instrumented rounds alternate in one run (the agent is
installed and uninstalled between rounds): instrumented means a request
context and a deadline are active, and metrics go to a live DogStatsD receiver
in its own process. Prints the median µs per request of each and the ratio:
the median, over the rounds, of instrumented/raw for rounds taken one after
the other (on a noisy host, pairs taken close in time cancel the drift that
separate medians would carry), with its interquartile range; the order of the
modes is shuffled from round to round.

A third column, "by hand", is the uninstrumented client sending what the agent
makes it send (the two headers, connect and read timeouts): the part of the
overhead that is the cost of the headers and socket timeouts themselves in
urllib3 and http.client, which any implementation of the feature pays.

Targets: urllib3 at most 1.05x raw, requests at most 1.03x raw.
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

from _util import (  # noqa: E402
    RECEIVER,
    SERVER,
    format_ratio,
    paired_ratio,
    run_alternating,
    start,
)

import agent  # noqa: E402
from agent import config  # noqa: E402

TARGETS = {"urllib3": 1.05, "requests": 1.03}


def run_round(do_request, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        do_request()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per mode")
    opts = parser.parse_args()

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    server, port = start(SERVER)
    receiver, statsd_port = start(RECEIVER)
    cfg = config.load({"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{statsd_port}"})
    try:
        import requests
        import urllib3

        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1)
        session = requests.Session()
        url = f"http://127.0.0.1:{port}/"
        headers = {
            "X-Request-Id": "0123456789abcdef0123456789abcdef",
            "X-Request-Deadline": "2026-11-21T05:12:33.123Z",
        }
        timeout = urllib3.Timeout(connect=3600, read=3600)
        clients = {
            "urllib3": (
                lambda: pool.urlopen("GET", "/").data,
                lambda: pool.urlopen("GET", "/", headers=headers, timeout=timeout).data,
            ),
            "requests": (
                lambda: session.get(url).content,
                lambda: session.get(url, headers=headers, timeout=(3600, 3600)).content,
            ),
        }
        print(
            f"{'client':<10} {'raw µs':>8} {'by hand':>8} {'agent µs':>9} {'added':>7} "
            f"{'ratio (IQR)':>20} {'target':>7} {'vs hand (IQR)':>20}"
        )
        for name, (do_request, by_hand) in clients.items():
            for _ in range(200):  # warm up connections and caches
                do_request()

            def raw_round(do_request=do_request) -> float:
                agent.uninstall()
                return run_round(do_request, opts.requests)

            def hand_round(by_hand=by_hand) -> float:
                agent.uninstall()
                return run_round(by_hand, opts.requests)

            def agent_round(do_request=do_request) -> float:
                agent.install(cfg)
                with agent.request_context(deadline=3600):
                    result = run_round(do_request, opts.requests)
                agent.flush(5)
                return result

            samples = run_alternating(
                {"raw": raw_round, "hand": hand_round, "agent": agent_round}, opts.rounds
            )
            agent.uninstall()
            raw, hand, instrumented = samples["raw"], samples["hand"], samples["agent"]
            r, h, i = (
                statistics.median(raw),
                statistics.median(hand),
                statistics.median(instrumented),
            )
            ratio = paired_ratio(raw, instrumented)
            vs_hand = paired_ratio(hand, instrumented)
            print(
                f"{name:<10} {r:>8.1f} {h:>8.1f} {i:>9.1f} {i - r:>+7.1f} "
                f"{format_ratio(ratio):>20} {TARGETS[name]:>6.2f}x {format_ratio(vs_hand):>20}"
                + ("" if ratio[0] <= TARGETS[name] else "  over target")
            )
    finally:
        server.kill()
        receiver.kill()


if __name__ == "__main__":
    main()
