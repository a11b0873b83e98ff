"""Overhead of the server side on a trivial Flask view, under a loopback load.

One gunicorn process (one gthread worker, keep-alive) serves a Flask app whose
view returns a constant; a hidden route installs or uninstalls the agent, so
rounds with and without it alternate on the same server process. The client
sends keep-alive GETs and measures median µs per request; prints the median
ratio of adjacent rounds. The "by hand" column is the uninstrumented view
sending the two response headers the agent adds, whose cost (formatting in the
server, parsing in the client) is part of the feature. Target: at most 1.05x.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

APP = textwrap.dedent(
    """
    import os
    import flask
    import agent
    from agent import config

    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    app = flask.Flask(__name__)
    CONFIG = config.load({"DD_DOGSTATSD_URL": os.environ["BENCH_STATSD_URL"]})

    @app.route("/")
    def index():
        return "ok"

    @app.route("/by-hand")
    def by_hand():
        # what the agent adds to a response, sent by the view itself
        headers = {"X-Request-Id": "0123456789abcdef0123456789abcdef", "X-View-Name": "index"}
        return "ok", 200, headers

    @app.route("/__agent/<state>")
    def toggle(state):
        agent.install(CONFIG) if state == "on" else agent.uninstall()
        return state
    """
)
TARGET = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per mode")
    opts = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from http_overhead import RECEIVER, start

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    receiver, statsd_port = start(RECEIVER)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"talisker-bench-{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    (workdir / "bench_app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALISKER_", "DD_"))}
    env.update(
        PYTHONPATH=f"{workdir}{os.pathsep}{ROOT}",
        TALISKER_ENABLED="false",
        BENCH_STATSD_URL=f"udp://127.0.0.1:{statsd_port}",
    )
    port = 18000 + os.getpid() % 1000
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    server = subprocess.Popen(
        [gunicorn, "-k", "gthread", "--threads", "1", "-w", "1", "--keep-alive", "60",
         "-b", f"127.0.0.1:{port}", "--log-level", "warning", "bench_app:app"],
        env=env, cwd=workdir,
    )  # fmt: skip
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(100):
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.1)
                conn = http.client.HTTPConnection("127.0.0.1", port)

        def get(path: str) -> None:
            conn.request("GET", path)
            conn.getresponse().read()

        def run_round(path: str = "/") -> float:
            start_time = time.perf_counter()
            for _ in range(opts.requests):
                get(path)
            return (time.perf_counter() - start_time) / opts.requests * 1e6

        for state in ("on", "off"):
            get(f"/__agent/{state}")
            run_round()  # warm up both paths
        raw: list[float] = []
        hand: list[float] = []
        instrumented: list[float] = []
        for _ in range(opts.rounds):
            get("/__agent/off")
            raw.append(run_round())
            hand.append(run_round("/by-hand"))
            get("/__agent/on")
            instrumented.append(run_round())
        r, h, i = statistics.median(raw), statistics.median(hand), statistics.median(instrumented)
        ratio = statistics.median(b / a for a, b in zip(raw, instrumented, strict=True))
        vs_hand = statistics.median(b / a for a, b in zip(hand, instrumented, strict=True))
        print(
            f"{'server':<14} {'raw µs':>8} {'by hand':>8} {'agent µs':>9} {'added':>7} "
            f"{'ratio':>6} {'target':>7} {'vs hand':>8}"
        )
        print(
            f"{'flask trivial':<14} {r:>8.1f} {h:>8.1f} {i:>9.1f} {i - r:>+7.1f} {ratio:>6.3f} "
            f"{TARGET:>6.2f}x {vs_hand:>8.3f}" + ("" if ratio <= TARGET else "  over target")
        )
    finally:
        server.terminate()
        server.wait(10)
        receiver.kill()


if __name__ == "__main__":
    main()
