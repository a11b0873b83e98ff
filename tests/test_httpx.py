"""httpx, sync and async, against a real loopback server: ids, deadlines, one record each."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import agent
from tests.support.http import closed_port

COUNT = "talisker.requests.count"
ERRORS = "talisker.requests.errors"
RETRIES = "talisker.requests.retries"


def sent(statsd, name=COUNT, at_least=1):
    assert agent.flush(5)
    assert statsd.wait_for(lambda: statsd.total(name) >= at_least), name


def run(coroutine):
    return asyncio.run(coroutine)


async def get_async(url, **kwargs):
    async with httpx.AsyncClient() as session:
        return await session.get(url, **kwargs)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_attempt_carries_the_id_deadline_and_priority(install_agent, http_server, mode):
    install_agent()
    with agent.request_context(request_id="abc-123", deadline=10), agent.priority("low"):
        if mode == "sync":
            response = httpx.get(http_server.url + "/redirect/2", follow_redirects=True)
        else:
            response = run(get_async(http_server.url + "/redirect/2", follow_redirects=True))
    assert response.status_code == 200
    assert len(http_server.requests) == 3  # two redirects: attempts of one logical request
    for recorded in http_server.requests:
        assert recorded.header("X-Request-Id") == "abc-123"
        assert recorded.header("X-Request-Deadline")
        assert 0 < float(recorded.header("X-Request-Timeout")) <= 10
        assert recorded.header("X-Request-Priority") == "low"
    assert "x-request-id" not in response.request.headers  # the application's Request is its own


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_headers_the_caller_set_are_kept(install_agent, http_server, mode):
    install_agent()
    headers = {"x-request-id": "mine", "X-Other": "1"}
    if mode == "sync":
        httpx.get(http_server.url + "/a", headers=headers)
    else:
        run(get_async(http_server.url + "/a", headers=headers))
    (recorded,) = http_server.requests
    assert recorded.header("X-Request-Id") == "mine" and recorded.header("X-Other") == "1"
    assert headers == {"x-request-id": "mine", "X-Other": "1"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_time_left_bounds_the_timeouts(install_agent, statsd, http_server, mode):
    install_agent()
    with agent.deadline(0.5), pytest.raises(httpx.ReadTimeout):
        if mode == "sync":
            httpx.get(http_server.url + "/delay/5", timeout=30)
        else:
            run(get_async(http_server.url + "/delay/5", timeout=30))
    sent(statsd, ERRORS)
    assert statsd.total(ERRORS, type="deadline", code="deadline") == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_once_the_deadline_has_passed_nothing_is_sent(install_agent, http_server, mode):
    install_agent()
    with agent.deadline(0.001), pytest.raises(httpx.TimeoutException) as raised:
        import time

        time.sleep(0.01)
        if mode == "sync":
            httpx.get(http_server.url + "/a")
        else:
            run(get_async(http_server.url + "/a"))
    assert isinstance(raised.value, agent.DeadlineExceeded)
    assert http_server.requests == []


def test_each_logical_request_is_counted_once_with_the_same_tags_as_requests(
    install_agent, statsd, http_server
):
    install_agent()
    with httpx.Client() as session:
        session.get(http_server.url + "/redirect/1", follow_redirects=True)
        session.get(http_server.url + "/status/503")
        session.get(http_server.url + "/view/search")
    run(get_async(http_server.url + "/status/404"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{closed_port()}/")
    sent(statsd, COUNT, 5)
    assert statsd.total(COUNT) == 5
    assert statsd.total(COUNT, peer=http_server.netloc, status="200") == 2
    assert statsd.total(COUNT, view="search") == 1
    assert statsd.total(ERRORS, type="http", code="503") == 1
    assert statsd.total(ERRORS, type="connection", code="ECONNREFUSED") == 1
    assert statsd.total(RETRIES, reason="redirect") == 1


def test_a_transport_used_without_a_client_records_its_call(install_agent, statsd, http_server):
    install_agent()
    transport = httpx.HTTPTransport()
    response = transport.handle_request(httpx.Request("GET", http_server.url + "/a"))
    response.read()
    assert http_server.requests[0].header("X-Request-Id")
    sent(statsd)
    assert statsd.total(COUNT) == 1


def test_the_circuit_breaker_covers_httpx(install_agent, http_server, monkeypatch):
    from agent.http import breaker

    monkeypatch.setattr(breaker, "_breakers", {})
    install_agent(TALISKER_CIRCUIT_BREAKER="*=0.5/2/30/10")
    for _ in range(2):
        httpx.get(http_server.url + "/status/503")
    with pytest.raises(httpx.ConnectError) as raised:
        httpx.get(http_server.url + "/a")
    assert isinstance(raised.value, agent.CircuitOpen)
    assert len(http_server.requests) == 2


def error_of(statsd):
    sent(statsd, ERRORS)
    (metric,) = statsd.find(ERRORS)
    return metric.tag("type"), metric.tag("code")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_timeout_without_a_deadline_is_a_timeout(install_agent, statsd, http_server, mode):
    install_agent()
    with pytest.raises(httpx.ReadTimeout):
        if mode == "sync":
            httpx.get(http_server.url + "/delay/5", timeout=0.2)
        else:
            run(get_async(http_server.url + "/delay/5", timeout=0.2))
    assert error_of(statsd) == ("timeout", "timeout")


def test_a_name_that_does_not_resolve_is_its_resolver_error(install_agent, statsd):
    install_agent()
    with pytest.raises(httpx.ConnectError):
        httpx.get("http://does-not-resolve.invalid:8080/")
    kind, code = error_of(statsd)
    assert kind == "connection" and code in ("EAI_NONAME", "EAI_AGAIN")


def test_a_connection_closed_without_a_response_is_econnreset(install_agent, statsd, http_server):
    install_agent()
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(http_server.url + "/reset")
    assert error_of(statsd) == ("connection", "ECONNRESET")  # the row requests gives


@pytest.mark.parametrize("through", ["client", "transport"])
def test_a_call_cancelled_by_its_caller_is_a_499_not_an_error(
    install_agent, statsd, http_server, through
):
    install_agent()

    async def main():
        started = time.perf_counter()
        if through == "client":
            async with httpx.AsyncClient() as session:
                call = session.get(http_server.url + "/delay/3")
                with pytest.raises(asyncio.TimeoutError):  # the caller's limit: a cancellation
                    await asyncio.wait_for(call, 0.3)
                elapsed.append((time.perf_counter() - started) * 1000)
                assert (await session.get(http_server.url + "/after")).status_code == 200
        else:
            async with httpx.AsyncHTTPTransport() as transport:
                request = httpx.Request("GET", http_server.url + "/delay/3")
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(transport.handle_async_request(request), 0.3)
                elapsed.append((time.perf_counter() - started) * 1000)

    elapsed: list[float] = []
    run(main())
    sent(statsd)
    assert statsd.total(COUNT, status="499") == 1
    assert statsd.total(ERRORS) == 0
    (latency,) = statsd.samples("talisker.requests.latency", status="499")
    assert 0 < latency <= elapsed[0]


def test_our_headers_are_added_as_the_general_way_adds_them(install_agent):
    # The cheap way (ours appended to a copy of the list) gives what attempt_headers'
    # general way (a copy, then Headers.__setitem__ for each) gives, byte for byte.
    from agent import propagation
    from agent.http import client
    from agent.instrumentation import httpx as instrumentation

    cfg = install_agent()
    given = httpx.Headers({"Host": "example", "X-Other": "é"}, encoding="utf-8")
    copy = instrumentation._copy_headers
    with agent.request_context(request_id="abc", deadline=30), agent.priority("high"):
        fast = instrumentation._with_ours(given, client.begin("GET"), cfg, 29.0)
        general = propagation.attempt_headers(given, client.begin("GET"), cfg, copy, 29.0)
    assert type(fast) is httpx.Headers and len(fast.raw) == 6
    assert fast.raw == general.raw and fast.multi_items() == general.multi_items()
    assert fast.encoding == general.encoding == "utf-8"
    assert "x-request-id" not in given  # the request's own are left alone

    # One of ours there already: the caller's is kept, and nothing says it was ours.
    mine = httpx.Headers({"x-request-timeout": "5"})
    with agent.request_context(deadline=30):
        call = client.begin("GET")
        kept = instrumentation._with_ours(mine, call, cfg, 29.0)
    assert kept.get_list("X-Request-Timeout") == ["5"] and "x-request-id" in kept
    assert call.timeout_sent is None


def test_send_and_handle_request_are_plain_functions_that_refuse_as_httpxs(install_agent):
    # Client.send and HTTPTransport.handle_request get the agent's direct patches: no
    # wrapt binding on each access, the original's name, signature and refusals.
    import inspect
    import types

    from agent import registry

    targets = [
        (httpx.Client, "send", httpx.Client()),
        (httpx.HTTPTransport, "handle_request", httpx.HTTPTransport()),
    ]
    calls = [((), {}), ((1, 2), {}), ((1,), {"request": 1}), ((), {"request": 1, "bogus": 1})]

    def refusals(obj, name):
        refused = []
        for args, kwargs in calls:
            with pytest.raises(TypeError) as caught:
                getattr(obj, name)(*args, **kwargs)
            refused.append(str(caught.value))
        return refused

    originals = {name: vars(owner)[name] for owner, name, _ in targets}
    plain = {name: refusals(obj, name) for _, name, obj in targets}
    install_agent()
    for owner, name, obj in targets:
        patched, original = vars(owner)[name], originals[name]
        assert type(patched) is types.FunctionType and registry.is_ours(patched)
        assert patched.__wrapped__ is original
        for attr in ("__name__", "__qualname__", "__module__", "__doc__", "__kwdefaults__"):
            assert getattr(patched, attr) == getattr(original, attr), attr
        assert inspect.signature(patched) == inspect.signature(original)
        assert refusals(obj, name) == plain[name]
    agent.uninstall()
    assert all(vars(owner)[name] is originals[name] for owner, name, _ in targets)
