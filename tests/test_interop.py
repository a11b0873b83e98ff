"""Interop with the systems this agent continues, tested against their published packages.

- anna-money's aio-request (0.2.9): its aiohttp server middleware reads only
  ``X-Request-Timeout`` and ``X-Request-Priority`` (without them it assumes a
  20 s deadline and ``normal``); its client sends both.
- Canonical's talisker (0.23): its WSGI middleware reads ``X-Request-Id`` and
  ``X-Request-Deadline`` (``%Y-%m-%dT%H:%M:%S.%fZ``).

Each peer runs as a real server in a process of its own, without this agent.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

import agent
from tests.support.proc import clean_env, free_port

BIN = Path(sys.executable).parent
TALISKER_RUN = str(BIN / "talisker-run")

aio_request_missing = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="aio-request 0.2.9 requires Python 3.11 (enum.StrEnum)"
)


class Server:
    """A server in a subprocess, started with ``args``, answering on ``port``."""

    def __init__(self, args: list[str], port: int, env: dict[str, str], cwd: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with agent.suppress():  # the probe is not a call under test
                    requests.get(self.url + "/up", timeout=5)
                return
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or a busy host
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"{args} did not start:\n{self.output()}") from None
                time.sleep(0.2)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout and self.proc.poll() is not None else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(tmp_path: Path, name: str, code: str, *, launcher: list[str] | None = None, **env: str):
    (tmp_path / name).write_text(code)
    port = free_port()
    environment = clean_env(PORT=str(port), PYTHONPATH=str(tmp_path), **env)
    return Server([*(launcher or []), sys.executable, name], port, environment, tmp_path)


AIO_REQUEST_SERVER = """
import os
import aio_request
from aiohttp import web

async def handler(request):
    context = aio_request.get_context()
    return web.json_response(
        {"timeout": context.deadline.timeout, "priority": str(context.priority)}
    )

app = web.Application(middlewares=[aio_request.aiohttp_middleware_factory()])
app.router.add_get("/{tail:.*}", handler)
web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None)
"""


@aio_request_missing
def test_an_aio_request_server_sees_our_deadline_and_priority(install_agent, tmp_path):
    install_agent()
    server = start(tmp_path, "aio_server.py", AIO_REQUEST_SERVER)
    try:
        with agent.request_context(deadline=5), agent.priority("high"):
            seen = requests.get(server.url + "/call").json()
        without = requests.get(server.url + "/control").json()  # no deadline, no priority
    finally:
        server.stop()
    assert 4 < seen["timeout"] <= 5 and seen["priority"] == "high"
    assert 19 < without["timeout"] <= 20 and without["priority"] == "normal"  # its defaults


def fan_out_through(server: Server, http_server, priority: str) -> None:
    """An aio-request client calls ``server``'s /fan-out with a 3 s deadline and ``priority``;
    the call ``server`` makes downstream must carry them (and an id)."""
    import aio_request
    import aiohttp

    latest = []

    async def call() -> int:
        async with aiohttp.ClientSession() as session:
            client = aio_request.setup(
                transport=aio_request.AioHttpTransport(session), endpoint=server.url
            )
            started = time.monotonic()
            deadline = aio_request.Deadline.from_timeout(3)
            latest.append(datetime.now(timezone.utc) + timedelta(seconds=3))  # no earlier
            async with client.request(
                aio_request.get("fan-out"),
                deadline=deadline,
                priority=aio_request.Priority(priority),
            ) as response:
                # A relative timeout counts from when the request arrives: the hop's
                # deadline is later than the client's by the time it took to arrive,
                # which is less than the whole call took.
                latest.append(latest[0] + timedelta(seconds=time.monotonic() - started))
                return response.status

    try:
        status = asyncio.run(call())
    finally:
        server.stop()
    assert status == 200, server.output()
    (downstream,) = [r for r in http_server.requests if r.path == "/downstream"]
    assert 0 < float(downstream.header("X-Request-Timeout")) <= 3
    bound = latest[1].strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert downstream.header("X-Request-Deadline") <= bound
    assert downstream.header("X-Request-Priority") == priority
    assert downstream.header("X-Request-Id")


FLASK_APP = """
import os
import requests
from flask import Flask

app = Flask(__name__)

@app.route("/up")
def up():
    return "up"

@app.route("/fan-out")
def fan_out():
    return requests.get(os.environ["UPSTREAM"] + "/downstream").text

app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
"""


@aio_request_missing
def test_an_aio_request_client_through_a_flask_app_under_talisker_run(tmp_path, http_server):

    server = start(
        tmp_path, "webapp.py", FLASK_APP, launcher=[TALISKER_RUN], UPSTREAM=http_server.url
    )

    fan_out_through(server, http_server, "low")


TALISKER_SERVER = """
import json, os, time
from wsgiref.simple_server import make_server, WSGIRequestHandler
import talisker
import talisker.wsgi

talisker.initialise()  # as talisker's own launchers do

def app(environ, start_response):
    deadline = talisker.Context.current().deadline
    body = json.dumps({
        "request_id": talisker.Context.request_id,
        "left": None if deadline is None else deadline - time.time(),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

make_server("127.0.0.1", int(os.environ["PORT"]), talisker.wsgi.wrap(app),
            handler_class=Quiet).serve_forever()
"""


def test_a_talisker_wsgi_server_sees_our_request_id_and_deadline(install_agent, tmp_path):
    install_agent()
    server = start(tmp_path, "talisker_server.py", TALISKER_SERVER)
    try:
        with agent.request_context(request_id="abc-123", deadline=5):
            seen = requests.get(server.url + "/call").json()
        without = requests.get(server.url + "/control").json()
    finally:
        server.stop()
    assert seen["request_id"] == "abc-123"
    assert seen["left"] is not None and 3 < seen["left"] <= 5
    assert without["left"] is None and without["request_id"] not in (None, "abc-123")


def test_the_interop_servers_do_not_run_this_agent(tmp_path):
    """The peers are the published packages alone: nothing of ours in their processes."""
    probe = "import sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('agent'))))"
    code = f"import json, talisker.wsgi\n{probe}\n"
    result = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


AIOHTTP_APP = """
import os
import httpx
from aiohttp import web

async def fan_out(request):
    async with httpx.AsyncClient() as client:
        answer = await client.get(os.environ["UPSTREAM"] + "/downstream")
    return web.Response(text=answer.text)

app = web.Application()
app.router.add_get("/up", lambda request: web.Response(text="up"))
app.router.add_get("/fan-out", fan_out)
web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None)
"""


@aio_request_missing
def test_an_aio_request_client_through_an_aiohttp_app_calling_httpx(tmp_path, http_server):

    server = start(
        tmp_path, "webapp.py", AIOHTTP_APP, launcher=[TALISKER_RUN], UPSTREAM=http_server.url
    )
    fan_out_through(server, http_server, "high")
