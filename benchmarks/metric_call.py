"""Caller-thread cost of one metric call, against the datadog client's own modes.

The agent is installed sending to a live UDP socket; each mode records 100,000
metrics with four tags, five rounds, median per call. Target: at most 2 µs.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TALISKER_ENABLED"] = "false"  # installed explicitly below

import agent
from agent import config, metrics

N = 100_000
ROUNDS = 5
TARGET_US = 2.0
TAGS = (("peer", "users-api"), ("view", "index"), ("method", "GET"), ("status", 200))
DD_TAGS = ["peer:users-api", "view:index", "method:GET", "status:200"]


def per_call_us(call) -> float:
    results = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(N):
            call()
        results.append((time.perf_counter() - start) / N * 1e6)
    return statistics.median(results)


def main() -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    agent.install(config.load({"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{port}"}))
    metrics.count("warmup")
    agent.flush(5)

    rows = [
        ("agent count", per_call_us(lambda: metrics.count("requests.count", 1, TAGS))),
        ("agent timing", per_call_us(lambda: metrics.timing("requests.latency", 12.5, TAGS))),
    ]
    # What the metrics thread then spends per record (drain, aggregate, send), for scale.
    # (Half as many of each as N: the queue holds at most 200,000 records.)
    pipeline = metrics.active()
    assert pipeline is not None and pipeline.worker is not None
    agent.flush(5)
    for _ in range(N // 2):
        metrics.count("requests.count", 1, TAGS)
        metrics.timing("requests.latency", 12.5, TAGS)
    start = time.perf_counter()
    pipeline.worker.send_pending()
    background = (time.perf_counter() - start) / N * 1e6
    agent.uninstall()

    from datadog.dogstatsd.base import DogStatsd

    default = DogStatsd(host="127.0.0.1", port=port, disable_telemetry=True)
    rows.append(
        (
            "datadog default (sync sendto)",
            per_call_us(lambda: default.increment("requests.count", 1, DD_TAGS)),
        )
    )
    buffered = DogStatsd(
        host="127.0.0.1",
        port=port,
        disable_telemetry=True,
        disable_buffering=False,
        disable_aggregation=False,
    )
    rows.append(
        (
            "datadog buffered + aggregated",
            per_call_us(lambda: buffered.increment("requests.count", 1, DD_TAGS)),
        )
    )

    print(f"{'mode':<32} {'µs per call':>12}")
    for name, us in rows:
        print(f"{name:<32} {us:>12.2f}")
    print(f"{'(agent metrics thread, per record)':<32} {background:>12.2f}")
    worst = max(us for name, us in rows if name.startswith("agent"))
    print(
        f"agent worst case {worst:.2f} µs per call (target <= {TARGET_US} µs): "
        + ("ok" if worst <= TARGET_US else "OVER TARGET")
    )


if __name__ == "__main__":
    main()
