"""aiohttp's client against a real loopback server: ids, deadlines, one record each."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

import agent
from tests.support.http import closed_port

COUNT = "talisker.requests.count"
ERRORS = "talisker.requests.errors"
RETRIES = "talisker.requests.retries"


def sent(statsd, name=COUNT, at_least=1):
    assert agent.flush(5)
    assert statsd.wait_for(lambda: statsd.total(name) >= at_least), name


async def get(url, session_kwargs=None, **kwargs):
    async with (
        aiohttp.ClientSession(**(session_kwargs or {})) as session,
        session.get(url, **kwargs) as response,
    ):
        await response.read()
        return response


def test_the_id_deadline_and_priority_reach_every_attempt(install_agent, http_server):
    install_agent()

    async def main():
        with agent.request_context(request_id="abc-123", deadline=10), agent.priority("high"):
            return await get(http_server.url + "/redirect/2")

    response = asyncio.run(main())
    assert response.status == 200 and len(http_server.requests) == 3
    for recorded in http_server.requests:
        assert recorded.header("X-Request-Id") == "abc-123"
        assert recorded.header("X-Request-Deadline")
        assert 0 < float(recorded.header("X-Request-Timeout")) <= 10
        assert recorded.header("X-Request-Priority") == "high"


def test_a_redirect_carries_the_time_left_when_it_is_made(install_agent, http_server):
    # The first response takes a second: the redirect's X-Request-Timeout is that much
    # smaller (a lower bound, so a busy machine only widens the gap), the absolute
    # deadline the same.
    from tests.support.http import Route

    http_server.routes["/slow-hop"] = Route(
        status=302, headers={"Location": "/redirect/0"}, delay=1.0
    )
    install_agent()

    async def main():
        with agent.request_context(deadline=30):
            return await get(http_server.url + "/slow-hop")

    assert asyncio.run(main()).status == 200
    first, second = http_server.requests
    assert second.path == "/redirect/0"
    sent = [float(r.header("X-Request-Timeout")) for r in (first, second)]
    assert sent[1] <= sent[0] - 0.99, sent
    assert second.header("X-Request-Deadline") == first.header("X-Request-Deadline")


def test_a_timeout_header_of_the_callers_is_kept_on_a_redirect(install_agent, http_server):
    install_agent()

    async def main():
        with agent.request_context(deadline=30):
            return await get(http_server.url + "/redirect/1", headers={"X-Request-Timeout": "5"})

    assert asyncio.run(main()).status == 200
    assert [r.header("X-Request-Timeout") for r in http_server.requests] == ["5", "5"]


def test_headers_of_the_call_and_of_the_session_are_kept(install_agent, http_server):
    install_agent()
    asyncio.run(get(http_server.url + "/a", headers={"X-Request-Id": "call"}))
    asyncio.run(get(http_server.url + "/b", {"headers": {"x-request-id": "session"}}))
    assert [r.header("X-Request-Id") for r in http_server.requests] == ["call", "session"]


def test_the_time_left_bounds_aiohttps_timeout(install_agent, statsd, http_server):
    install_agent()

    async def main():
        with agent.deadline(0.5):
            return await get(http_server.url + "/delay/5", timeout=aiohttp.ClientTimeout(30))

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 5  # not the 5 s the server takes
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="deadline") == 1


def test_once_the_deadline_has_passed_nothing_is_sent(install_agent, http_server):
    install_agent()

    async def main():
        with agent.deadline(0.001):
            await asyncio.sleep(0.01)
            return await get(http_server.url + "/a")

    with pytest.raises(aiohttp.ServerTimeoutError) as raised:
        asyncio.run(main())
    assert isinstance(raised.value, agent.DeadlineExceeded)
    assert isinstance(raised.value, asyncio.TimeoutError)
    assert http_server.requests == []


def test_one_count_per_logical_request_and_the_error_rows(install_agent, statsd, http_server):
    install_agent()

    async def main():
        async with aiohttp.ClientSession() as session:
            for path in ("/redirect/1", "/status/503", "/view/search"):
                async with session.get(http_server.url + path) as response:
                    await response.read()
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"http://127.0.0.1:{closed_port()}/")

    asyncio.run(main())
    sent(statsd, COUNT, 4)
    assert statsd.total(COUNT) == 4
    assert statsd.total(COUNT, peer=http_server.netloc) == 3
    assert statsd.total(COUNT, view="search") == 1
    assert statsd.total(ERRORS, type="http", code="503") == 1
    assert statsd.total(ERRORS, type="connection", code="ECONNREFUSED") == 1
    assert statsd.total(RETRIES, reason="redirect") == 1


def test_concurrent_tasks_with_distinct_ids_never_see_each_others(install_agent, http_server):
    install_agent()

    async def one(n, session):
        with agent.request_context(request_id=f"task-{n}"):
            await asyncio.sleep(0)
            async with session.get(f"{http_server.url}/task/{n}") as response:
                await response.read()

    async def main():
        # The test server accepts a few connections at a time: the tasks share 8, and
        # wait for them with their scopes in the air.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
            await asyncio.gather(*(one(n, session) for n in range(200)))

    asyncio.run(main())
    assert len(http_server.requests) == 200
    for recorded in http_server.requests:
        assert recorded.header("X-Request-Id") == "task-" + recorded.path.rsplit("/", 1)[1]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_in_executor_keeps_the_request_scope(install_agent, http_server, loop):
    import concurrent.futures

    import requests

    run = asyncio.run
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is in the test extras (not Windows)")
        run = uvloop.run

    install_agent()
    seen = []

    def blocking(n):
        seen.append(agent.context.current().request_id)
        requests.get(f"{http_server.url}/executor/{n}")

    async def one(n, pool):
        with agent.request_context(request_id=f"req-{n}", deadline=30):
            await asyncio.get_running_loop().run_in_executor(pool, blocking, n)

    async def main():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            await asyncio.gather(*(one(n, pool) for n in range(200)))
            await asyncio.get_running_loop().run_in_executor(pool, blocking, "none")

    run(main())
    assert sorted(seen[:-1]) == sorted(f"req-{n}" for n in range(200))
    assert seen[-1] is None  # outside a scope, as without the agent
    for recorded in http_server.requests:
        n = recorded.path.rsplit("/", 1)[1]
        if n != "none":
            assert recorded.header("X-Request-Id") == f"req-{n}"
            assert recorded.header("X-Request-Deadline")


# -- the server ----------------------------------------------------------------------


AIOHTTP_APP = """
import os
import agent
import aiohttp
from aiohttp import web

async def show_user(request):
    scope = agent.context.current()
    async with aiohttp.ClientSession() as session:
        async with session.get(os.environ["UPSTREAM"] + "/downstream") as response:
            await response.read()
    return web.json_response({"request_id": scope.request_id, "left": agent.deadline_timeout()})

async def current(request):
    outer = agent.wsgi.current_request()
    with agent.deadline(5):
        inner = agent.wsgi.current_request()
    return web.json_response(
        {"same": outer is inner, "request_id": outer.request_id, "kind": outer.kind}
    )

async def fail(request):
    raise RuntimeError("view failed")

async def missing(request):
    raise web.HTTPNotFound()

app = web.Application()
app.router.add_get("/up", lambda request: web.Response(text="up"))
app.router.add_get("/users/{user_id}", show_user, name="show_user")
app.router.add_get("/fail", fail)
app.router.add_get("/current", current)
app.router.add_get("/missing", missing)
web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None)
"""


def test_an_aiohttp_app_under_talisker_run_gets_the_request_scope(tmp_path, statsd, http_server):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import requests

    from tests.support.proc import clean_env, free_port

    (tmp_path / "webapp.py").write_text(AIOHTTP_APP)
    port = free_port()
    env = clean_env(**statsd.env, PORT=str(port), UPSTREAM=http_server.url)
    talisker_run = str(Path(sys.executable).parent / "talisker-run")
    server = subprocess.Popen(
        [talisker_run, sys.executable, "webapp.py"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/up", timeout=5)
                break
            except (requests.ConnectionError, requests.Timeout):
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "the aiohttp app did not start"
                time.sleep(0.2)
        headers = {"X-Request-Id": "abc-123", "X-Request-Timeout": "20"}
        response = requests.get(url + "/users/7", headers=headers)
        failed = requests.get(url + "/fail")
        missing = requests.get(url + "/missing")
        current = requests.get(url + "/current", headers={"X-Request-Id": "aio-1"})
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    body = response.json()
    assert body["request_id"] == "abc-123" and 15 < body["left"] <= 20
    assert response.headers["X-Request-Id"] == "abc-123"
    assert response.headers["X-View-Name"] == "show_user"
    (downstream,) = http_server.requests
    assert downstream.header("X-Request-Id") == "abc-123"
    assert 0 < float(downstream.header("X-Request-Timeout")) <= 20
    assert failed.status_code == 500 and missing.status_code == 404
    assert current.json() == {"same": True, "request_id": "aio-1", "kind": "aiohttp"}
    assert statsd.wait_for(lambda: statsd.total("talisker.aiohttp.requests") >= 5, 30)
    assert statsd.total("talisker.aiohttp.requests", view="show_user", status="200") == 1
    assert statsd.total("talisker.aiohttp.errors", status="500") == 1
    assert statsd.total("talisker.aiohttp.errors", status="404") == 0
    assert statsd.total("talisker.aiohttp.requests", status="404") == 1


def aiohttp_error_of(statsd):
    sent(statsd, ERRORS)
    (metric,) = statsd.find(ERRORS)
    return metric.tag("type"), metric.tag("code")


def test_a_timeout_without_a_deadline_is_a_timeout(install_agent, statsd, http_server):
    install_agent()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(get(http_server.url + "/delay/5", timeout=aiohttp.ClientTimeout(0.2)))
    assert aiohttp_error_of(statsd) == ("timeout", "timeout")


def test_a_name_that_does_not_resolve_is_its_resolver_error(install_agent, statsd):
    install_agent()
    with pytest.raises(aiohttp.ClientConnectorError):
        asyncio.run(get("http://does-not-resolve.invalid:8080/"))
    kind, code = aiohttp_error_of(statsd)
    assert kind == "connection" and code in ("EAI_NONAME", "EAI_AGAIN")


def test_a_connection_closed_without_a_response_is_econnreset(install_agent, statsd, http_server):
    install_agent()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(get(http_server.url + "/reset"))
    assert aiohttp_error_of(statsd) == ("connection", "ECONNRESET")


def test_a_call_cancelled_by_its_caller_is_a_499_not_an_error(install_agent, statsd, http_server):
    install_agent()

    async def main():
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            with pytest.raises(asyncio.TimeoutError):  # the caller's own limit: a cancellation
                await asyncio.wait_for(session.get(http_server.url + "/delay/3"), 0.3)
            elapsed.append((time.perf_counter() - started) * 1000)
            async with session.get(http_server.url + "/after") as after:  # all as before
                assert after.status == 200

    elapsed: list[float] = []
    asyncio.run(main())
    sent(statsd, at_least=2)
    assert statsd.total(COUNT, status="499") == 1
    assert statsd.total(COUNT, status="200") == 1
    assert statsd.total(ERRORS) == 0
    (latency,) = statsd.samples("talisker.requests.latency", status="499")
    assert 0 < latency <= elapsed[0]


def test_a_failed_requests_objects_are_freed_without_the_cycle_collector():
    # aiohttp's own tests/isolated/check_for_request_leak.py, under the agent: the
    # record of a failed request once held the exception, whose traceback held the
    # record's frame: a cycle with aiohttp's Request in it.
    from tests.support.proc import check_python

    out = check_python(
        """
        import asyncio, gc
        import agent
        import aiohttp
        from aiohttp import web
        from aiohttp.test_utils import get_unused_port_socket

        async def fail(request):
            await request.json()  # no body: raises

        async def main():
            app = web.Application()
            app.router.add_get("/json", fail)
            sock = get_unused_port_socket("127.0.0.1")
            runner = web.AppRunner(app)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{sock.getsockname()[1]}/json"
                async with session.get(url) as response:
                    assert response.status == 500
            await asyncio.sleep(0.5)
            gc.collect()
            kept = sorted({type(o).__name__ for o in gc.garbage} & {"Request", "Exchange"})
            gc.set_debug(0)
            await runner.cleanup()
            print("kept:", kept)

        asyncio.run(main())
        """,
        {"TALISKER_ENABLED": "true", "TALISKER_METRICS_ENABLED": "false"},
    )
    assert out.strip().splitlines()[-1] == "kept: []"


def test_a_relative_urls_peer_is_its_sessions_base_url(install_agent, statsd, http_server):
    # The same relative URL through two sessions with two base URLs: two peers. A URL
    # is parsed once and its endpoint kept, but a relative one is not kept (its
    # session decides), nor one with user info.
    from agent.instrumentation import aiohttp as instrumentation

    install_agent()
    port = http_server.port

    async def main():
        for base in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
            async with aiohttp.ClientSession(base_url=base) as session:
                for _ in range(2):
                    async with session.get("/a") as response:
                        await response.read()
        for _ in range(2):
            await get(f"http://user:secret@127.0.0.1:{port}/b")

    asyncio.run(main())
    sent(statsd, COUNT, 6)
    assert statsd.total(COUNT, peer=f"127.0.0.1:{port}") == 4
    assert statsd.total(COUNT, peer=f"localhost:{port}") == 2
    assert "/a" not in instrumentation._ENDPOINTS
    assert not any("secret" in url for url in instrumentation._ENDPOINTS)


def test_the_endpoints_kept_are_bounded():
    from agent.instrumentation import aiohttp as instrumentation

    for n in range(instrumentation._ENDPOINTS_LIMIT + 100):
        assert instrumentation._peer(None, f"http://host-{n}.example/") == f"host-{n}.example:80"
    assert 0 < len(instrumentation._ENDPOINTS) <= instrumentation._ENDPOINTS_LIMIT
    assert instrumentation._peer(None, "https://host-1.example/x") == "host-1.example:443"


def test_the_deadline_cuts_each_part_of_the_timeout_longer_than_the_time_left():
    from agent.instrumentation.aiohttp import _UNSET, _cut_timeout

    given = aiohttp.ClientTimeout(total=None, connect=2, sock_read=60, sock_connect=None)
    cut = _cut_timeout(given, None, 10.0)
    assert cut is not None
    assert (cut.total, cut.connect, cut.sock_read, cut.sock_connect) == (10.0, 2, 10.0, None)
    assert cut.ceil_threshold > 10  # aiohttp would round 10 s up to a whole second
    assert _cut_timeout(aiohttp.ClientTimeout(total=5), None, 10.0) is None  # ends first

    class Session:
        _timeout = aiohttp.ClientTimeout(total=300, sock_connect=30)

    cut = _cut_timeout(_UNSET, Session(), 10.0)  # the call gave none: the session's
    assert cut is not None and (cut.total, cut.sock_connect) == (10.0, 10.0)
    cut = _cut_timeout(60, None, 10.0)  # a number is a total
    assert cut is not None and (cut.total, cut.connect) == (10.0, None)
