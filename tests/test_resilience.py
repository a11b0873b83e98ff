"""The agent's own resilience, opt-in: a retry policy per peer and its retry budget.

Real loopback servers, the real urllib3 and requests; the policy is turned on per
peer by ``TALISKER_RETRY_POLICY``.
"""

from __future__ import annotations

import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

import agent
from tests.support.http import Route, closed_port

COUNT = "talisker.requests.count"
RETRIES = "talisker.requests.retries"
THROTTLED = "talisker.requests.retries_throttled"


@pytest.fixture(autouse=True)
def fresh_budgets(monkeypatch):
    from agent.http import retry
    from agent.instrumentation.urllib3 import retries

    monkeypatch.setattr(retry, "_budgets", {})
    monkeypatch.setattr(retries, "_plans", {})


def flushed(statsd, name, at_least):
    assert agent.flush(5)
    assert statsd.wait_for(lambda: statsd.total(name) >= at_least), name


def test_the_policy_retries_a_503_of_an_idempotent_call_under_the_one_request(
    install_agent, statsd, http_server
):
    install_agent(TALISKER_RETRY_POLICY=f"{http_server.netloc}:3")
    with agent.deadline(30):
        response = requests.get(http_server.url + "/flaky/get/2")
    assert response.status_code == 200
    attempts = http_server.requests
    assert len(attempts) == 3
    assert len({r.header("X-Request-Id") for r in attempts}) == 1
    left = [float(r.header("X-Request-Timeout")) for r in attempts]
    assert left == sorted(left, reverse=True)  # the time left, at each attempt
    post = requests.post(http_server.url + "/flaky/post/2")
    assert post.status_code == 503  # not idempotent: not retried, the response as it was
    assert len(http_server.requests) == 4
    flushed(statsd, COUNT, 2)
    assert statsd.total(COUNT) == 2  # one logical request each
    assert statsd.total(RETRIES, reason="503") == 2 and statsd.total(RETRIES) == 2


def test_the_policy_retries_a_pools_own_urlopen(install_agent, statsd, http_server):
    """No headers, the pool's timeout: what urllib3's first attempt otherwise does inline."""
    install_agent(TALISKER_RETRY_POLICY=f"{http_server.netloc}:3")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port)
    assert pool.urlopen("GET", "/flaky/get/2").status == 200
    assert len(http_server.requests) == 3
    flushed(statsd, RETRIES, 2)
    assert statsd.total(COUNT) == 1 and statsd.total(RETRIES, reason="503") == 2


def test_the_policy_never_replaces_a_retry_of_the_applications(install_agent, http_server):
    install_agent(TALISKER_RETRY_POLICY="*:3")
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(1, status_forcelist=[503])))
    with pytest.raises(requests.exceptions.RetryError):
        session.get(http_server.url + "/flaky/own/5")
    assert len(http_server.requests) == 2  # the application's one retry, not the policy's
    pool = urllib3.PoolManager()
    assert pool.request("GET", http_server.url + "/flaky/none/1", retries=False).status == 503
    assert len(http_server.requests) == 3


def test_peers_outside_the_policy_get_the_librarys_default(install_agent, http_server):
    install_agent(TALISKER_RETRY_POLICY="users-api:3")
    assert requests.get(http_server.url + "/flaky/other/1").status_code == 503
    assert len(http_server.requests) == 1


def test_x_do_not_retry_stops_the_policy(install_agent, http_server):
    install_agent(TALISKER_RETRY_POLICY="*:3")
    http_server.routes["/dnr"] = Route(status=503, headers={"X-Do-Not-Retry": "1"})
    assert requests.get(http_server.url + "/dnr").status_code == 503
    assert len(http_server.requests) == 1


def test_a_refused_connection_is_retried_for_any_method(install_agent, statsd):
    install_agent(TALISKER_RETRY_POLICY="*:2")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"http://127.0.0.1:{closed_port()}/")  # nothing was sent: safe to retry
    flushed(statsd, RETRIES, 2)
    assert statsd.total(RETRIES, reason="ECONNREFUSED") == 2


def test_the_budget_stops_retrying_a_peer_that_fails_everything(install_agent, statsd, http_server):
    install_agent(TALISKER_RETRY_POLICY="*:3")
    for _ in range(20):
        assert requests.get(http_server.url + "/status/503").status_code == 503
    # gRPC's throttling: 10 tokens, one per failure, retries while more than 5 remain.
    # The first call's three retries and last attempt cost 4; every later call is not
    # retried.
    assert len(http_server.requests) == 20 + 3
    flushed(statsd, THROTTLED, 19)
    assert statsd.total(RETRIES) == 3
    assert statsd.total(THROTTLED) == 19


def test_successes_refill_the_budget(install_agent, http_server):
    from agent.http import retry

    install_agent(TALISKER_RETRY_POLICY="*:1")
    for _ in range(3):
        requests.get(http_server.url + "/status/503")
    budget = retry.budget_for(http_server.netloc)
    drained = budget.tokens
    for _ in range(10):
        requests.get(http_server.url + "/ok")
    assert budget.tokens == pytest.approx(min(10.0, drained + 1.0))


# -- the circuit breaker ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_breakers(monkeypatch):
    from agent.http import breaker

    monkeypatch.setattr(breaker, "_breakers", {})


ERRORS = "talisker.requests.errors"


def breaker_of(netloc):
    from agent.http import breaker

    return breaker._breakers[netloc]


def test_the_circuit_opens_at_the_threshold_and_calls_then_fail_before_connecting(
    install_agent, statsd, http_server, caplog
):
    install_agent(TALISKER_CIRCUIT_BREAKER=f"{http_server.netloc}=0.5/4/30/10")
    for _ in range(4):
        assert requests.get(http_server.url + "/status/503").status_code == 503
    assert len(http_server.requests) == 4
    with pytest.raises(requests.exceptions.ConnectionError) as through_requests:
        requests.get(http_server.url + "/ok")
    assert isinstance(through_requests.value, agent.CircuitOpen)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as through_urllib3:
        urllib3.PoolManager().request("GET", http_server.url + "/ok")
    assert isinstance(through_urllib3.value, agent.CircuitOpen)
    assert isinstance(through_urllib3.value, ConnectionError)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as through_a_pool:  # no headers
        urllib3.HTTPConnectionPool("127.0.0.1", http_server.port).urlopen("GET", "/ok")
    assert isinstance(through_a_pool.value, agent.CircuitOpen)
    assert len(http_server.requests) == 4  # nothing was sent
    flushed(statsd, ERRORS, 7)
    assert statsd.total(ERRORS, type="circuit", code="open") == 3
    (state,) = statsd.find("talisker.circuit.state")
    assert state.type == "g" and state.value == 2 and state.tag("peer") == http_server.netloc
    warnings = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
    assert warnings == [f"agent: the circuit to {http_server.netloc} is open (was closed)"]


def test_a_new_configuration_rules_the_breakers_it_no_longer_names_or_changes(
    install_agent, http_server
):
    install_agent(TALISKER_CIRCUIT_BREAKER=f"{http_server.netloc}=0.5/2/30/10")
    for _ in range(2):
        requests.get(http_server.url + "/status/503")
    assert breaker_of(http_server.netloc).state == 2  # open
    install_agent()  # no breaker any more: calls go through
    assert requests.get(http_server.url + "/ok").status_code == 200
    install_agent(TALISKER_CIRCUIT_BREAKER=f"{http_server.netloc}=0.5/4/30/10")
    assert requests.get(http_server.url + "/ok").status_code == 200  # a fresh circuit
    assert breaker_of(http_server.netloc).minimum == 4
    assert breaker_of(http_server.netloc).state == 0
    assert len(http_server.requests) == 4


def test_4xx_are_successes_and_below_the_minimum_nothing_opens(install_agent, http_server):
    install_agent(TALISKER_CIRCUIT_BREAKER="*=0.5/4/30/10")
    for path in ("/status/404", "/status/429", "/status/400", "/status/502"):
        requests.get(http_server.url + path)  # 2 failures of 4: 0.5, opens
    assert breaker_of(http_server.netloc).state == 2
    install_agent(TALISKER_CIRCUIT_BREAKER="*=0.5/10/30/10")
    other = f"127.0.0.1:{closed_port()}"
    for _ in range(9):
        with pytest.raises(requests.exceptions.ConnectionError) as raised:
            requests.get(f"http://{other}/")
        assert not isinstance(raised.value, agent.CircuitOpen)  # refused, 9 of a minimum 10


def test_after_the_break_exactly_one_probe_is_sent_and_its_success_closes(
    install_agent, http_server, caplog
):
    install_agent(TALISKER_CIRCUIT_BREAKER="*=0.5/2/0.2/10")
    for _ in range(2):
        requests.get(http_server.url + "/status/503")
    circuit = breaker_of(http_server.netloc)
    assert circuit.state == 2
    import threading
    import time

    time.sleep(0.3)  # the break is over: the next call is the probe
    probe_started = threading.Event()
    results: list[object] = []

    def probe():
        probe_started.set()
        results.append(requests.get(http_server.url + "/delay/3").status_code)

    prober = threading.Thread(target=probe)
    prober.start()
    assert probe_started.wait(5)
    while circuit.state != 1:  # half-open once the probe is let through
        time.sleep(0.01)
    refused = 0
    for _ in range(20):  # while it is in flight, the others still fail fast
        try:
            requests.get(http_server.url + "/ok")
        except agent.CircuitOpen:
            refused += 1
    prober.join(10)
    assert results == [200] and refused == 20
    assert [r.path for r in http_server.requests[2:]] == ["/delay/3"]  # exactly one probe
    assert circuit.state == 0
    assert requests.get(http_server.url + "/ok").status_code == 200  # closed again
    changes = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
    assert [m.rsplit(" is ", 1)[1] for m in changes] == [
        "open (was closed)",
        "half-open (was open)",
        "closed (was half-open)",
    ]


def test_many_threads_see_consistent_states_and_one_warning_per_change(
    install_agent, http_server, caplog
):
    import threading

    # Half the threads fail: a ratio of 0.3 opens the circuit whichever half ran faster.
    install_agent(TALISKER_CIRCUIT_BREAKER="*=0.3/4/0.02/10")
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer(n):
        session = requests.Session()
        path = "/status/503" if n % 2 else "/ok"
        while not stop.is_set():
            try:
                session.get(http_server.url + path)
            except agent.CircuitOpen:
                pass
            except BaseException as exc:  # anything else is a failure of the test
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    import time

    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    changes = [r.getMessage() for r in caplog.records if "the circuit to" in r.getMessage()]
    assert len(changes) >= 3  # it opened, was probed, and changed again
    allowed = {
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "open"),
        ("half-open", "closed"),
    }
    state = "closed"
    for message in changes:  # one warning per change: each starts where the last one ended
        now, was = message.rsplit(" is ", 1)[1].removesuffix(")").split(" (was ")
        assert was == state and (was, now) in allowed, changes
        state = now
