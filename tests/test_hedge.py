"""Hedged attempts: the first acceptable answer wins, the others are cancelled."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import requests

import agent

HEDGES = "talisker.requests.hedges"


def test_the_first_acceptable_answer_wins_and_the_slow_attempt_is_cancelled(
    install_agent, statsd, http_server
):
    install_agent()

    async def main():
        async with httpx.AsyncClient() as client:
            with agent.request_context(request_id="hedge-1", deadline=30):
                return await agent.hedged(
                    lambda: client.get(http_server.url + "/slow-first/a/5"), attempts=3, delay=0.05
                )

    started = time.monotonic()
    response = asyncio.run(main())
    assert response.status_code == 200
    assert time.monotonic() - started < 5  # not the slow first attempt's answer
    sent = len(http_server.requests)
    assert sent in (2, 3)  # a busy host may send the third before the second answers
    assert {r.header("X-Request-Id") for r in http_server.requests} == {"hedge-1"}
    assert all(r.header("X-Request-Deadline") for r in http_server.requests)
    assert agent.flush(5)
    assert statsd.wait_for(lambda: statsd.total(HEDGES) >= sent - 1)
    assert statsd.total(HEDGES) == sent - 1
    # Each attempt sent is a request; the slow first one, cancelled, is the caller's 499.
    count = "talisker.requests.count"
    assert statsd.wait_for(lambda: statsd.total(count) >= sent)
    assert statsd.total(count) == sent
    assert statsd.total(count, status="499") >= 1
    assert statsd.total(count, status="200") >= 1
    assert statsd.total("talisker.requests.errors") == 0


def test_the_sync_form_runs_attempts_in_threads(install_agent, statsd, http_server):
    install_agent()
    with agent.request_context(request_id="hedge-2"):
        started = time.monotonic()
        response = agent.hedged_sync(
            lambda: requests.get(http_server.url + "/slow-first/b/5"), attempts=2, delay=0.05
        )
    assert response.status_code == 200 and time.monotonic() - started < 5
    assert {r.header("X-Request-Id") for r in http_server.requests} == {"hedge-2"}


def test_when_no_attempt_is_acceptable_the_last_answer_is_returned(install_agent, http_server):
    install_agent()
    response = agent.hedged_sync(
        lambda: requests.get(http_server.url + "/status/503"), attempts=3, delay=0
    )
    assert response.status_code == 503 and len(http_server.requests) == 3
    ids = {r.header("X-Request-Id") for r in http_server.requests}
    assert len(ids) == 1  # one request id, even outside a request


def test_an_error_of_every_attempt_is_raised(install_agent):
    install_agent()

    async def boom():
        raise ValueError("no")

    with pytest.raises(ValueError):
        asyncio.run(agent.hedged(boom, attempts=2, delay=0))
    with pytest.raises(ValueError):
        agent.hedged_sync(lambda: (_ for _ in ()).throw(ValueError("no")), attempts=2, delay=0)
    with pytest.raises(ValueError):
        agent.hedged_sync(lambda: None, attempts=0)
