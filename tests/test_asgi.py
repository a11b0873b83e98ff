"""The server side for ASGI: Starlette and FastAPI-style apps served by a real uvicorn."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests

import agent
from tests.support.proc import clean_env, free_port

uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is in the test extras")
starlette_apps = pytest.importorskip("starlette.applications", reason="in the test extras")
from starlette.responses import JSONResponse, PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def serve(app):
    """``app`` on a real uvicorn server in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def sent(statsd, name="talisker.asgi.requests", at_least=1):
    # The server records a request once its response is sent: maybe after the client read it.
    assert statsd.flushed(lambda: agent.flush(5), lambda: statsd.total(name) >= at_least), name


def make_app(upstream: str):
    async def show_user(request):
        scope = agent.context.current()
        async with httpx.AsyncClient() as client:
            await client.get(upstream + "/downstream")
        return JSONResponse(
            {
                "request_id": scope.request_id,
                "left": agent.deadline_timeout(),
                "priority": scope.priority,
            }
        )

    async def fail(request):
        raise RuntimeError("view failed")

    return starlette_apps.Starlette(
        routes=[
            Route("/users/{user_id}", show_user, name="show_user"),
            Route("/fail", fail),
            Route("/plain", lambda request: PlainTextResponse("ok")),
        ]
    )


def test_a_starlette_app_gets_the_request_scope_with_no_code_changes(
    install_agent, statsd, http_server
):
    install_agent()
    headers = {"X-Request-Id": "abc-123", "X-Request-Timeout": "20", "X-Request-Priority": "low"}
    # agent.suppress(): the test's own client is not what is under test
    with serve(make_app(http_server.url)) as url, agent.suppress():
        response = requests.get(url + "/users/7", headers=headers)
        failed = requests.get(url + "/fail")
    body = response.json()
    assert body["request_id"] == "abc-123" and 15 < body["left"] <= 20
    assert body["priority"] == "low"
    assert response.headers["X-Request-Id"] == "abc-123"
    assert response.headers["X-View-Name"] == "show_user"  # the route's name, not /users/7
    (downstream,) = http_server.requests
    assert downstream.header("X-Request-Id") == "abc-123"
    assert 0 < float(downstream.header("X-Request-Timeout")) <= 20
    assert downstream.header("X-Request-Priority") == "low"
    assert failed.status_code == 500
    sent(statsd, at_least=2)
    assert statsd.total("talisker.asgi.requests", view="show_user", status="200") == 1
    assert statsd.total("talisker.asgi.errors", view="fail", status="500") == 1
    assert statsd.find("talisker.asgi.latency") and not statsd.find("talisker.asgi.cpu")
    assert context_left_clean()


def test_current_request_is_the_asgi_request_served_in_nested_scopes(install_agent, statsd):
    install_agent()

    async def show(request):
        outer = agent.wsgi.current_request()
        with agent.deadline(5), agent.metric_names(view="inner"):
            inner = agent.wsgi.current_request()
        return JSONResponse(
            {
                "same": outer is inner,
                "request_id": outer and outer.request_id,
                "kind": outer and outer.kind,
            }
        )

    app = starlette_apps.Starlette(routes=[Route("/show", show, name="show")])
    with serve(app) as url, agent.suppress():
        response = requests.get(url + "/show", headers={"X-Request-Id": "asgi-1"})
    assert response.json() == {"same": True, "request_id": "asgi-1", "kind": "asgi"}
    assert agent.wsgi.current_request() is None


def context_left_clean() -> bool:
    return agent.context.current().request_id is None


def test_a_raw_asgi_app_wrapped_by_hand_and_starlette_inside_it_count_once(
    install_agent, statsd, http_server
):
    install_agent()
    app = agent.asgi.TaliskerMiddleware(make_app(http_server.url))
    with serve(app) as url, agent.suppress():
        response = requests.get(url + "/plain")
    assert response.headers["X-Request-Id"] and response.headers["X-View-Name"]
    sent(statsd)
    assert statsd.total("talisker.asgi.requests") == 1


APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def hello(request):
    return PlainTextResponse("hello")

app = Starlette(routes=[Route("/hello", hello, name="hello")])
"""


@pytest.mark.parametrize("server_kind", ["uvicorn", "gunicorn"])
def test_talisker_run_uvicorn_and_gunicorn_with_uvicorn_workers(tmp_path, statsd, server_kind):
    (tmp_path / "webapp.py").write_text(APP)
    port = free_port()
    env = clean_env(**statsd.env, PYTHONPATH=str(tmp_path), PATH=f"{BIN}:{clean_env()['PATH']}")
    command = {
        "uvicorn": ["uvicorn", "--port", str(port), "webapp:app"],
        "gunicorn": [
            "gunicorn",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "webapp:app",
        ],
    }[server_kind]
    server = subprocess.Popen(
        [str(BIN / "talisker-run"), *command],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with agent.suppress():
                    response = requests.get(f"http://127.0.0.1:{port}/hello", timeout=5)
                break
            except (requests.ConnectionError, requests.Timeout):
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.2)
        assert response.text == "hello" and response.headers["X-View-Name"] == "hello"
        assert response.headers["X-Request-Id"]
        assert statsd.wait_for(
            lambda: statsd.total("talisker.asgi.requests", view="hello") >= 1, 30
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_client_that_goes_away_is_recorded_as_499_not_an_error(install_agent, statsd):
    import asyncio
    import socket
    import struct

    from starlette.responses import StreamingResponse

    install_agent()

    async def body():
        for _ in range(100_000):  # far more than the socket buffers hold
            yield b"x" * 65536
            await asyncio.sleep(0)

    async def stream(request):
        return StreamingResponse(body())

    app = starlette_apps.Starlette(routes=[Route("/stream", stream, name="stream")])
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(12).startswith(b"HTTP/1.")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset: the server's next sends fail
        waited = time.monotonic() + 10  # until the server has noticed and recorded it
        while not statsd.total("talisker.asgi.requests") and time.monotonic() < waited:
            agent.flush(1)
            time.sleep(0.05)
    assert statsd.total("talisker.asgi.requests", status="499") == 1
    assert statsd.total("talisker.asgi.errors") == 0
