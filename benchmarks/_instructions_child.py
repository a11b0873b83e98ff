"""The measured process of ``benchmarks/instructions.py``, run under callgrind.

``python _instructions_child.py PATH MODE N``: makes N calls of PATH (or, for
``wsgi``, serves requests until the client closes its connection) and writes a
JSON report to ``$BENCH_REPORT``. In ``raw`` mode the agent is never imported
(checked); in ``agent`` mode it is activated by ``import agent`` from the
environment, as an application's ``sitecustomize`` would, and the child checks
that it came from ``$BENCH_AGENT_ROOT`` and that the path's instrumentation is
in place, so a silent no-op cannot pass for a figure. Everything but the mode
is the same in both: the environment, the loops, the libraries.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

#: Long enough never to expire under callgrind (about 50x slower than native).
DEADLINE = 3600
#: Modes whose instrumentation is another agent, started by its own sitecustomize.
PEERS = ("ddtrace", "otel")
MODES = ("raw", "hand", "wrapt", "agent", *PEERS)
#: What the agent patches on each path (``agent/instrumentation``): in ``wrapt`` mode each
#: gets a wrapt wrapper that only calls through, and the by-hand row runs under them.
WRAPT_TARGETS = {
    "urllib3": (
        ("urllib3.connectionpool", "HTTPConnectionPool.urlopen"),
        ("urllib3.poolmanager", "PoolManager.urlopen"),
        ("urllib3.util.retry", "Retry.sleep"),
    ),
    "wsgi": (("flask.app", "Flask.wsgi_app"),),
}
WRAPT_TARGETS["httpx"] = (
    ("httpx", "Client.send"),
    ("httpx", "HTTPTransport.handle_request"),
)
WRAPT_TARGETS["aiohttp"] = (
    ("aiohttp.client", "ClientSession._request"),
    ("aiohttp.client_reqrep", "ClientRequest.update_headers"),
)
WRAPT_TARGETS["requests"] = (
    *WRAPT_TARGETS["urllib3"],
    ("requests.sessions", "Session.send"),
    ("requests.sessions", "Session.request"),
)


def _call_through(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return wrapped(*args, **kwargs)


def wrap_through(path: str) -> None:
    """``wrapt`` mode: the agent's patches, as wrapt wrappers that do nothing else."""
    import wrapt

    for module, name in WRAPT_TARGETS[path]:
        wrapt.wrap_function_wrapper(module, name, _call_through)


class _NoScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def scope(mode: str):
    """The request context the calls run in: a deadline in agent mode, nothing in raw.

    ddtrace and OpenTelemetry have no deadline: their calls run with none, as
    they would in an application.
    """
    if mode == "agent":
        import agent

        return agent.request_context(deadline=DEADLINE)
    return _NoScope()


def hand_request():
    import byhand

    return byhand.Request(DEADLINE)


def instrumented(mode: str, owner: object, attr: str) -> bool:
    value = vars(owner).get(attr)
    if mode == "agent":
        from agent import registry

        is_ours = getattr(registry, "is_ours", None)  # an older checkout (--agent-root) has none
        return is_ours(value) if is_ours else isinstance(value, registry.wrapper_class())
    # ddtrace and OpenTelemetry wrap with wrapt (or their own copy of it); OpenTelemetry
    # replaces flask.Flask by a subclass whose __init__ wraps wsgi_app per application.
    return hasattr(value, "__wrapped__") or getattr(owner, "__name__", "") == "_InstrumentedFlask"


def check_instrumented(mode: str, owner: object, attr: str) -> None:
    if mode in (*PEERS, "agent", "wrapt") and not instrumented(mode, owner, attr):
        raise SystemExit(f"{owner!r}.{attr} is not instrumented: {mode} is not in place")
    if mode in ("raw", "hand") and hasattr(vars(owner).get(attr), "__wrapped__"):
        raise SystemExit(f"{owner!r}.{attr} is wrapped in {mode} mode")


def run_urllib3(mode: str, n: int) -> float:
    import urllib3

    check_instrumented(mode, urllib3.connectionpool.HTTPConnectionPool, "urlopen")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", int(os.environ["BENCH_HTTP_PORT"]), maxsize=1)
    if mode in ("hand", "wrapt"):
        import byhand

        request, get = hand_request(), byhand.urllib3_get
        start = time.perf_counter()
        for _ in range(n):
            get(pool, request)
        return time.perf_counter() - start
    with scope(mode):
        start = time.perf_counter()
        for _ in range(n):
            pool.urlopen("GET", "/").data  # noqa: B018 - the body is read, as an application does
        return time.perf_counter() - start


def run_requests(mode: str, n: int) -> float:
    import requests

    check_instrumented(mode, requests.sessions.Session, "send")
    return run_client(mode, n, requests.Session(), "requests")


def check_httpx(mode: str) -> None:
    """ddtrace wraps ``Client.send``, OpenTelemetry the transport, the agent (and wrapt) both."""
    import httpx

    if mode != "otel":
        check_instrumented(mode, httpx.Client, "send")
    if mode != "ddtrace":
        check_instrumented(mode, httpx.HTTPTransport, "handle_request")


def run_httpx(mode: str, n: int) -> float:
    import httpx

    check_httpx(mode)
    with httpx.Client() as client:
        return run_client(mode, n, client, "httpx")


def run_client(mode: str, n: int, client: Any, library: str) -> float:
    """N keep-alive GETs through a ``requests.Session`` or an ``httpx.Client``."""
    url = f"http://127.0.0.1:{os.environ['BENCH_HTTP_PORT']}/"
    if mode in ("hand", "wrapt"):
        import byhand

        request, get = hand_request(), byhand.requests_get
        start = time.perf_counter()
        for _ in range(n):
            get(client, request, url, library)
        return time.perf_counter() - start
    with scope(mode):
        start = time.perf_counter()
        for _ in range(n):
            client.get(url).content  # noqa: B018
        return time.perf_counter() - start


def run_aiohttp(mode: str, n: int) -> float:
    """N keep-alive GETs through one ``aiohttp.ClientSession``, in one event loop."""
    import asyncio

    check_aiohttp(mode)
    return asyncio.run(aiohttp_loop(mode, n))


def check_aiohttp(mode: str) -> None:
    """ddtrace and the agent wrap ``ClientSession._request``; OpenTelemetry wraps
    ``__init__`` (a session it makes has its trace config)."""
    import aiohttp

    if mode == "otel":
        check_instrumented(mode, aiohttp.ClientSession, "__init__")
    else:
        check_instrumented(mode, aiohttp.ClientSession, "_request")


async def aiohttp_session() -> Any:
    """The aiohttp path's session: one connection (made in a running loop, as aiohttp wants)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))


async def aiohttp_loop(mode: str, n: int) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{os.environ['BENCH_HTTP_PORT']}/"
    async with await aiohttp_session() as session:
        if mode in ("hand", "wrapt"):
            import byhand

            request, get, timeout = hand_request(), byhand.aiohttp_get, aiohttp.ClientTimeout
            start = time.perf_counter()
            for _ in range(n):
                await get(session, request, url, timeout)
            return time.perf_counter() - start
        with scope(mode):
            start = time.perf_counter()
            for _ in range(n):
                async with session.get(url) as response:
                    await response.read()
            return time.perf_counter() - start


def _pg_connect(mode: str, autocommit: bool):
    import psycopg2

    check_instrumented(mode, psycopg2, "connect")
    conn = psycopg2.connect(os.environ["BENCH_DSN"])
    # OpenTelemetry keeps psycopg2's connection class and gives it a traced cursor factory.
    if mode in ("agent", "ddtrace") and type(conn) is psycopg2.extensions.connection:
        raise SystemExit(f"psycopg2.connect gave a connection {mode} does not instrument")
    if mode == "otel" and conn.cursor_factory is None:
        raise SystemExit("psycopg2.connect gave a connection without OpenTelemetry's cursors")
    conn.autocommit = autocommit
    return conn


def run_pg_autocommit(mode: str, n: int) -> float:
    conn = _pg_connect(mode, autocommit=True)
    cur = conn.cursor()
    if mode == "hand":
        import byhand

        request, execute = hand_request(), byhand.pg_execute
        start = time.perf_counter()
        for _ in range(n):
            execute(cur, request)
            cur.fetchone()
        seconds = time.perf_counter() - start
        conn.close()
        return seconds
    with scope(mode):
        start = time.perf_counter()
        for _ in range(n):  # sql_overhead.run_round's loop
            cur.execute("SELECT 1")
            cur.fetchone()
        seconds = time.perf_counter() - start
    conn.close()
    return seconds


def run_pg_transaction(mode: str, n: int) -> float:
    """One transaction per call: BEGIN (psycopg2's), the statement, COMMIT."""
    conn = _pg_connect(mode, autocommit=False)
    cur = conn.cursor()
    commit = conn.commit
    if mode == "hand":
        import byhand

        request, execute = hand_request(), byhand.pg_execute
        start = time.perf_counter()
        for _ in range(n):
            execute(cur, request)
            cur.fetchone()
            commit()
        seconds = time.perf_counter() - start
        conn.close()
        return seconds
    with scope(mode):
        start = time.perf_counter()
        for _ in range(n):
            cur.execute("SELECT 1")
            cur.fetchone()
            commit()
        seconds = time.perf_counter() - start
    conn.close()
    return seconds


def run_wsgi(mode: str, n: int) -> float:
    """Serve a trivial Flask view with wsgiref, keep-alive, until the client closes.

    ``n`` is the client's business (``instructions.py`` sends that many requests
    on one connection); the port is printed on stdout once listening.
    """
    from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

    import flask

    check_instrumented(mode, flask.Flask, "wsgi_app")
    app = flask.Flask("bench")

    @app.route("/")
    def index() -> str:
        return "ok"

    if mode in ("hand", "wrapt"):
        import byhand

        byhand.wsgi_middleware(app)

    class Handler(ServerHandler):
        http_version = "1.1"
        os_environ: dict[str, str] = {}  # noqa: RUF012 - as gunicorn: the process's not copied in

    class KeepAlive(WSGIRequestHandler):
        """wsgiref's handler, serving the requests of a connection until it closes."""

        protocol_version = "HTTP/1.1"
        wbufsize = -1  # a response in one send (wsgiref writes its head line by line)
        disable_nagle_algorithm = True
        served = 0
        seconds = 0.0

        def handle(self) -> None:
            start = time.perf_counter()
            while True:
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline or not self.parse_request():
                    break
                handler = Handler(
                    self.rfile, self.wfile, self.get_stderr(), self.get_environ(),
                    multithread=False,
                )  # fmt: skip
                handler.request_handler = self
                handler.run(self.server.get_app())
                self.wfile.flush()
                KeepAlive.served += 1
            KeepAlive.seconds = time.perf_counter() - start

        def log_message(self, *args: object) -> None:
            pass

    server = WSGIServer(("127.0.0.1", 0), KeepAlive)
    server.set_app(app)
    print(server.server_address[1], flush=True)
    server.handle_request()  # the one keep-alive connection
    server.server_close()
    if KeepAlive.served != n:
        raise SystemExit(f"served {KeepAlive.served} requests, expected {n}")
    return KeepAlive.seconds


def run_idle(mode: str, n: int) -> float:
    """The agent's time-driven work: one metric recorded, then n centiseconds asleep."""
    if mode != "agent":
        raise SystemExit("idle measures the agent only")
    from agent import metrics

    metrics.count("bench.idle", 1)  # starts the metrics thread
    start = time.perf_counter()
    time.sleep(n / 100)
    return time.perf_counter() - start


PATHS = {
    "urllib3": run_urllib3,
    "requests": run_requests,
    "httpx": run_httpx,
    "aiohttp": run_aiohttp,
    "psycopg2-autocommit": run_pg_autocommit,
    "psycopg2-transaction": run_pg_transaction,
    "wsgi": run_wsgi,
    "idle": run_idle,
}


def shift_layout(seed: int) -> list[object]:
    """Allocate (and keep) a seed-chosen number of objects of every small size class,
    and of classes.

    CPython's type attribute cache indexes by the address of the attribute's name
    and by the type's version tag: where the strings of the code imported next land,
    and how many types got a tag before its own, decide which lookups collide and
    miss. Either moves a path's count by up to 0.5%, as any change to the
    environment's size or to the code imported before does: one class more in the
    agent gives every urllib3 class another tag, and moved the urllib3 path's misses
    by 7k instructions a request (stop 26). Each seed is another heap layout and
    another start for the tags; the parent averages over several, the same for
    every checkout.
    """
    keep: list[object] = []
    x = seed
    for size in range(1, 497, 16):  # bytes objects of 48 to 528 bytes: each pymalloc class
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        keep.extend(bytes(size) for _ in range(x % 8 if seed else 0))
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    keep.extend(float(i) for i in range(x % 8 if seed else 0))  # the 32-byte class
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    for i in range(x % 16 if seed else 0):
        kind = type(f"_Layout{i}", (), {})
        getattr(kind, "_tagged", None)  # a lookup gives the class its version tag
        keep.append(kind)
    return keep


def main() -> None:
    layout = shift_layout(int(os.environ.get("BENCH_LAYOUT", "0")))
    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    report: dict[str, object] = {"path": path, "mode": mode, "n": n, "layout": len(layout)}
    if mode == "agent":
        import agent

        root = os.path.realpath(os.environ["BENCH_AGENT_ROOT"])
        where = os.path.realpath(agent.__file__)
        if not where.startswith(root + os.sep):
            raise SystemExit(f"agent imported from {where}, not from {root}")
        report["agent_file"] = where
    elif mode == "wrapt":
        if path not in WRAPT_TARGETS:
            raise SystemExit(f"no wrapt mode for {path}: the agent patches none of its calls")
        wrap_through(path)
    elif mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}")
    report["seconds"] = PATHS[path](mode, n)
    if mode == "agent":
        import agent

        # Everything recorded is aggregated and sent inside the measured process.
        if not agent.flush(600):
            raise SystemExit("the agent's final flush did not complete")
    elif "agent" in sys.modules:
        raise SystemExit("raw mode imported the agent")
    with open(os.environ["BENCH_REPORT"], "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    main()
