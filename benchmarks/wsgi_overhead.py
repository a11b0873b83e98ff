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

The by-hand row is a second Flask app in the same worker, at ``/by-hand``,
wrapped in ``byhand.wsgi_middleware`` (the request id, the two response
headers the agent adds, one record with the wall and CPU time). The ddtrace
and OpenTelemetry rows are a gunicorn server each, started under the peer's
environment as ``ddtrace-run gunicorn`` and ``opentelemetry-instrument
gunicorn`` start it, serving the same view, driven by the same client, their
rounds shuffled among the others. Issue 14 judges this path in instructions
of the worker process (``--instructions``: instructions.py's wsgi path,
served by wsgiref); the wall times are reported beside them.
"""

from __future__ import annotations

import argparse
import os
import socket
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
    import byhand
    from agent import config

    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    app = flask.Flask(__name__)
    CONFIG = config.load({"DD_DOGSTATSD_URL": os.environ["BENCH_STATSD_URL"]})

    @app.route("/")
    def index():
        return "ok"

    @app.route("/__agent/<state>")
    def toggle(state):
        agent.install(CONFIG) if state == "on" else agent.uninstall()
        byhand.RECORDS.clear()
        return state

    # by hand: the same view in an app of its own, wrapped in byhand.wsgi_middleware
    hand_app = flask.Flask("by_hand")

    @hand_app.route("/by-hand")
    def by_hand():
        return "ok"

    byhand.wsgi_middleware(hand_app)

    def application(environ, start_response):
        if environ["PATH_INFO"] == "/by-hand":
            return hand_app(environ, start_response)
        return app(environ, start_response)
    """
)
# A peer's server: the same view, under ddtrace-run or opentelemetry-instrument.
PEER_APP = textwrap.dedent(
    """
    import os
    import flask
    from _instructions_child import instrumented
    from _peer_worker import flusher

    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    MODE = os.environ["BENCH_PEER"]
    app = flask.Flask(__name__)
    FLUSH = flusher(MODE)

    @app.route("/")
    def index():
        return "ok"

    @app.route("/__check")
    def check():
        return "ok" if instrumented(MODE, flask.Flask, "wsgi_app") else "not instrumented"

    @app.route("/__flush")
    def flush():
        FLUSH()
        return "ok"

    application = app
    """
)
#: Requests between two flushes of a peer's tracer (see _peer_worker.FLUSH_EVERY).
FLUSH_EVERY = 5000


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


def gunicorn(port: int, env: dict[str, str], workdir: Path, app: str) -> subprocess.Popen[bytes]:
    command = str(Path(sys.executable).with_name("gunicorn"))
    return subprocess.Popen(
        [command, "-k", "gthread", "--threads", "1", "-w", "1", "--keep-alive", "60",
         "-b", f"127.0.0.1:{port}", "--log-level", "warning", app],
        env=env, cwd=workdir,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per mode")
    sys.path.insert(0, str(Path(__file__).parent))
    from _util import (
        RECEIVER,
        add_common_options,
        available_peers,
        closed_port,
        instructions_mode,
        peer_process_env,
        print_wall,
        run_alternating,
        start,
        wall_rows,
        write_json,
    )

    add_common_options(parser)
    opts = parser.parse_args()
    if opts.instructions:
        return instructions_mode(("wsgi",), opts)

    peers = available_peers(opts.no_peers)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    receiver, statsd_port = start(RECEIVER)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"talisker-bench-{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    (workdir / "bench_app.py").write_text(APP)
    (workdir / "bench_peer_app.py").write_text(PEER_APP)
    here = str(Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TALISKER_", "DD_", "OTEL_"))}
    env.update(
        PYTHONPATH=os.pathsep.join((str(workdir), str(ROOT), here)),
        TALISKER_ENABLED="false",
        BENCH_STATSD_URL=f"udp://127.0.0.1:{statsd_port}",
    )
    closed = closed_port()
    ports = {"agent": 18000 + os.getpid() % 1000}
    servers = {"agent": gunicorn(ports["agent"], env, workdir, "bench_app:application")}
    for peer in peers:
        ports[peer] = closed_port()  # free now; gunicorn binds it
        peer_env = peer_process_env(peer, closed, BENCH_PEER=peer)
        peer_env["PYTHONPATH"] += os.pathsep + os.pathsep.join((str(workdir), here))
        servers[peer] = gunicorn(ports[peer], peer_env, workdir, "bench_peer_app:application")
    try:
        clients = {name: RawClient(port) for name, port in ports.items()}
        for peer in peers:
            answer = clients[peer].get("/__check")
            if answer != b"ok":
                raise SystemExit(f"{peer}'s server: {answer.decode()}")

        def run_round(client: RawClient, path: str = "/") -> float:
            get = client.get
            start_time = time.perf_counter()
            for _ in range(opts.requests):
                get(path)
            return (time.perf_counter() - start_time) / opts.requests * 1e6

        own = clients["agent"]
        for state in ("on", "off"):
            own.get(f"/__agent/{state}")
            run_round(own)  # warm up both paths
        run_round(own, "/by-hand")

        def off_round(path: str = "/") -> float:
            own.get("/__agent/off")
            return run_round(own, path)

        def on_round() -> float:
            own.get("/__agent/on")
            return run_round(own)

        unflushed = dict.fromkeys(peers, 0)

        def peer_round(peer: str) -> float:
            result = run_round(clients[peer])
            unflushed[peer] += opts.requests
            if unflushed[peer] >= FLUSH_EVERY:  # outside the timing, as the agent's flush
                clients[peer].get("/__flush")
                unflushed[peer] = 0
            return result

        modes = {"raw": off_round, "hand": lambda: off_round("/by-hand"), "agent": on_round}
        for peer in peers:
            run_round(clients[peer])  # warm up
            modes[peer] = lambda peer=peer: peer_round(peer)
        samples = run_alternating(modes, opts.rounds)
        rows = wall_rows(samples)
        print_wall("wsgi", rows)
        for client in clients.values():
            client.sock.close()
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(10)
        receiver.kill()
    write_json(
        opts,
        "wsgi_overhead",
        {"wsgi": {"samples": samples, "rows": rows}},
        requests=opts.requests,
        rounds=opts.rounds,
    )


if __name__ == "__main__":
    main()
