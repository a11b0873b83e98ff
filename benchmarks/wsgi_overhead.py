"""Overhead of the server side on a trivial Flask view, under a loopback load.

One gunicorn process (one gthread worker, keep-alive) serves a Flask app whose
view returns a constant; a hidden route installs or uninstalls the agent, so
rounds with and without it alternate on the same server process. The client
sends keep-alive GETs and measures median µs per request; prints the median
ratio of rounds taken one after the other, with its interquartile range (the
order of the modes is shuffled from round to round).

The client is a raw socket sending a canned request and reading the response
by its Content-Length, as a load generator (wrk, ab) does: what is measured is
the server's latency, not the cost of parsing headers in a Python HTTP client.

The "by hand" column is the uninstrumented app with a three-line middleware
adding the two response headers the agent adds (X-Request-Id, X-View-Name):
the cost of the headers themselves in gunicorn, which any implementation of
the feature pays. Target: at most 1.05x.
"""

from __future__ import annotations

import argparse
import os
import socket
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
        return "ok"

    @app.route("/__agent/<state>")
    def toggle(state):
        agent.install(CONFIG) if state == "on" else agent.uninstall()
        return state

    def application(environ, start_response):
        # "by hand": the two response headers the agent adds, added by a minimal middleware
        if environ["PATH_INFO"] != "/by-hand":
            return app(environ, start_response)

        def add_headers(status, headers, *exc_info):
            headers.append(("X-Request-Id", "0123456789abcdef0123456789abcdef"))
            headers.append(("X-View-Name", "by_hand"))
            return start_response(status, headers, *exc_info)

        return app(environ, add_headers)
    """
)
TARGET = 1.05


class RawClient:
    """Keep-alive GETs on one socket; reads each response by its Content-Length."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.requests: dict[str, bytes] = {}

    def get(self, path: str) -> bytes:
        request = self.requests.get(path)
        if request is None:
            request = self.requests[path] = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        self.sock.sendall(request)
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            buffer += self._recv()
        head = buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        assert head.startswith(b"http/1.1 200") and at >= 0, head
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
        total = end + 4 + length
        while len(buffer) < total:
            buffer += self._recv()
        self.buffer = buffer[total:]
        return buffer[end + 4 : total]

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per mode")
    opts = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _util import RECEIVER, format_ratio, paired_ratio, run_alternating, start

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
         "-b", f"127.0.0.1:{port}", "--log-level", "warning", "bench_app:application"],
        env=env, cwd=workdir,
    )  # fmt: skip
    try:
        client = RawClient(port)

        def run_round(path: str = "/") -> float:
            start_time = time.perf_counter()
            for _ in range(opts.requests):
                client.get(path)
            return (time.perf_counter() - start_time) / opts.requests * 1e6

        get = client.get
        for state in ("on", "off"):
            get(f"/__agent/{state}")
            run_round()  # warm up both paths

        def off_round(path: str = "/") -> float:
            get("/__agent/off")
            return run_round(path)

        def on_round() -> float:
            get("/__agent/on")
            return run_round()

        samples = run_alternating(
            {"raw": off_round, "hand": lambda: off_round("/by-hand"), "agent": on_round},
            opts.rounds,
        )
        raw, hand, instrumented = samples["raw"], samples["hand"], samples["agent"]
        r, h, i = statistics.median(raw), statistics.median(hand), statistics.median(instrumented)
        ratio = paired_ratio(raw, instrumented)
        vs_hand = paired_ratio(hand, instrumented)
        print(
            f"{'server':<14} {'raw µs':>8} {'by hand':>8} {'agent µs':>9} {'added':>7} "
            f"{'ratio (IQR)':>20} {'target':>7} {'vs hand (IQR)':>20}"
        )
        print(
            f"{'flask trivial':<14} {r:>8.1f} {h:>8.1f} {i:>9.1f} {i - r:>+7.1f} "
            f"{format_ratio(ratio):>20} {TARGET:>6.2f}x {format_ratio(vs_hand):>20}"
            + ("" if ratio[0] <= TARGET else "  over target")
        )
    finally:
        server.terminate()
        server.wait(10)
        receiver.kill()


if __name__ == "__main__":
    main()
