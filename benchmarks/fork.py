"""Fork safety and fork cost with metrics flowing (issue 10, item 11).

Runs the issue's repro ``--runs`` times (200 by default), each in a fresh
process of its own session: the agent is installed, the first metric starts
the metrics thread, and the process forks 8 children 10 ms apart while it keeps
recording metrics (a flush every 50 ms, so the metrics thread is busy sending
while the children are forked). Each child imports ``urllib.parse`` and
flushes. A run fails if a child exits non-zero, a child or the parent hangs
(``--timeout`` seconds), or the parent fails. Prints the failures and the
p50/p99/max of ``os.fork()`` in the parent over every fork, next to the same
program with the agent disabled (``TALISKER_ENABLED=false``), run alternately,
for what this machine's load alone does to a fork.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys

from _util import agent_env, compile_bytecode, python

REPRO = """
import json, os, time
import agent
from agent import metrics
agent.install(); metrics.count("start", 1); agent.flush(0)
tags = (("peer", "users-api"), ("view", "index"), ("method", "GET"), ("status", 200))
forks, pids = [], []
for i in range(8):
    for _ in range(200):                      # metrics flowing while forking
        metrics.count("bench.requests", 1, tags)
        metrics.timing("bench.latency", 12.5, tags)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        import urllib.parse; urllib.parse.urlparse("http://x/")
        os._exit(0 if agent.flush(3) else 3)
    forks.append(time.perf_counter() - start)
    pids.append(pid)
    time.sleep(0.01)
statuses = [os.waitpid(pid, 0)[1] for pid in pids]
print(json.dumps({"forks": forks, "statuses": statuses}))
"""


def run_once(env: dict[str, str], timeout: float) -> tuple[str | None, list[float]]:
    """One run of the repro: (what failed or None, fork durations in seconds)."""
    proc = subprocess.Popen(
        [python(), "-c", REPRO],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hung child can be killed with its parent
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hung", []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any child left behind
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        return f"parent exit {proc.returncode}: {err.strip().splitlines()[-1:]}", []
    result = json.loads(out)
    bad = [os.waitstatus_to_exitcode(s) for s in result["statuses"] if s != 0]
    if bad or "Traceback" in err:
        return f"children exited {bad}: {err.strip().splitlines()[-1:]}", result["forks"]
    return None, result["forks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    compile_bytecode()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a live destination
    sink.bind(("127.0.0.1", 0))
    env = agent_env(
        DD_DOGSTATSD_URL=f"udp://127.0.0.1:{sink.getsockname()[1]}",
        TALISKER_METRICS_FLUSH_INTERVAL="0.05",
    )
    raw_env = {**env, "TALISKER_ENABLED": "false"}
    failures: list[str] = []
    forks: dict[str, list[float]] = {"agent": [], "no agent": []}
    for i in range(args.runs):
        for mode, mode_env in (("agent", env), ("no agent", raw_env)):
            failure, durations = run_once(mode_env, args.timeout)
            forks[mode].extend(durations)
            if failure is not None:
                failures.append(f"run {i} ({mode}): {failure}")
        while True:  # keep the sink's buffer from filling up
            sink.setblocking(False)
            try:
                sink.recv(65535)
            except BlockingIOError:
                break
    for line in failures:
        print(line)
    print(f"runs: {args.runs} per mode, failed: {len(failures)}")
    print(f"{'os.fork() in the parent, ms':<28} {'forks':>6} {'p50':>7} {'p99':>7} {'max':>7}")
    for mode, durations in forks.items():
        if durations:
            ms = sorted(f * 1000 for f in durations)
            p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
            print(
                f"{mode:<28} {len(ms):>6} {statistics.median(ms):>7.2f} {p99:>7.2f} {ms[-1]:>7.2f}"
            )
    print("target: 0 failures, p99 <= 20 ms with the agent")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
