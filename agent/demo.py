"""A demonstration: ``talisker-run --print-metrics python -m agent.demo``.

Serves a small Flask-free WSGI application on loopback and calls it with
``requests``: a success, a 5xx, a refused connection and a call cut short by a
deadline; runs a few SQL queries where PostgreSQL is reachable (the DSN of
``TALISKER_TEST_POSTGRES_DSN``, default the local server); and times a block.
Under ``talisker-run --print-metrics`` the metrics it sent are printed at exit.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

import agent

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The demo service: /ok, /fail (503), /slow (2 s)."""
    path = environ.get("PATH_INFO", "/")
    environ["talisker.view"] = "demo" + path.replace("/", ".")
    if path == "/slow":
        time.sleep(2)
    status = "503 Service Unavailable" if path == "/fail" else "200 OK"
    body = f"{path} served as request {environ.get('REQUEST_ID')}\n".encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> int:
    from agent.wsgi import TaliskerMiddleware

    server = make_server("127.0.0.1", 0, TaliskerMiddleware(app), handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    import requests

    session = agent.get_session()
    say = print
    with agent.request_context(request_id="demo-request-1"):
        response = session.get(base + "/ok")
        say(f"GET /ok            -> {response.status_code}: {response.text.strip()}")
        response = session.get(base + "/fail")
        say(f"GET /fail          -> {response.status_code}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        try:
            session.get(f"http://127.0.0.1:{closed}/")
        except requests.ConnectionError:
            say(f"GET :{closed}/       -> connection refused")
        start = time.monotonic()
        with agent.deadline(0.3):
            try:
                session.get(base + "/slow")
            except requests.Timeout:
                say(f"GET /slow (0.3 s)  -> timed out after {time.monotonic() - start:.2f} s")
        with agent.timed("demo.block", tags={"step": "compute"}):
            sum(i * i for i in range(200_000))
    _sql(say)
    server.shutdown()
    return 0


def _sql(say: Callable[..., Any]) -> None:
    dsn = os.environ.get("TALISKER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        import psycopg2
    except ImportError:
        say("SQL: psycopg2 is not installed; skipped")
        return
    try:
        conn = psycopg2.connect(dsn, connect_timeout=2)
    except psycopg2.OperationalError:
        say("SQL: PostgreSQL is not reachable; skipped")
        return
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("select 1")
        try:
            cur.execute("select * from no_such_table")
        except psycopg2.Error as exc:
            say(f"SQL: select from a missing table -> {exc.pgcode}")
        with agent.deadline(0.3):
            try:
                cur.execute("select pg_sleep(2)")
            except psycopg2.errors.QueryCanceled:
                say("SQL: pg_sleep(2) under a 0.3 s deadline -> cancelled by the server")
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
