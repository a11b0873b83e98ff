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

    monkeypatch.setattr(retry, "_budgets", {})


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
