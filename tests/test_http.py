"""Outgoing HTTP through urllib3 and requests: ids, deadlines, timeouts, metrics.

Real loopback servers, a real DogStatsD receiver with a strict parser.
"""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

import agent
from tests.support.http import UnacceptingServer, closed_port
from tests.support.proc import check_python

COUNT = "talisker.requests.count"
ERRORS = "talisker.requests.errors"
LATENCY = "talisker.requests.latency"
RETRIES = "talisker.requests.retries"


def sent(statsd) -> None:
    assert agent.flush(5)
    time.sleep(0.05)


# -- headers -------------------------------------------------------------------


def test_request_id_and_deadline_headers_are_sent(install_agent, statsd, http_server):
    install_agent()
    with agent.request_context(request_id="abc-123", deadline=5):
        requests.get(http_server.url + "/a")
        urllib3.PoolManager().request("GET", http_server.url + "/b")
    for recorded in http_server.requests:
        assert recorded.header("X-Request-Id") == "abc-123"
        deadline = recorded.header("X-Request-Deadline")
        assert deadline is not None and deadline.endswith("Z") and len(deadline) == 24


def test_calls_inside_suppress_are_made_as_without_the_agent(install_agent, statsd, http_server):
    install_agent()
    with agent.request_context(request_id="abc-123", deadline=0.001):
        time.sleep(0.01)  # the deadline has passed: an instrumented call would fail fast
        with agent.suppress():
            assert requests.get(http_server.url + "/a").status_code == 200
            urllib3.PoolManager().request("GET", http_server.url + "/b")
            with agent.request_context(request_id="inner"):  # still suppressed
                requests.get(http_server.url + "/c")
        with pytest.raises(agent.DeadlineExceeded):  # the control
            requests.get(http_server.url + "/d")
    assert [r.path for r in http_server.requests] == ["/a", "/b", "/c"]
    assert all(r.header("X-Request-Id") is None for r in http_server.requests)
    assert all(r.header("X-Request-Deadline") is None for r in http_server.requests)
    requests.get(http_server.url + "/after")  # instrumented again
    assert http_server.requests[-1].header("X-Request-Id")
    assert agent.flush(5)
    statsd.wait_for(lambda: statsd.total("talisker.requests.errors") >= 1)
    statsd.wait_for(lambda: statsd.total("talisker.requests.count") >= 2)
    assert statsd.total("talisker.requests.count") == 2  # /d and /after only


def test_outside_a_request_each_logical_request_gets_a_new_id(install_agent, http_server):
    install_agent()
    requests.get(http_server.url + "/one")
    requests.get(http_server.url + "/two")
    ids = [r.header("X-Request-Id") for r in http_server.requests]
    assert all(ids) and ids[0] != ids[1]
    assert all(r.header("X-Request-Deadline") is None for r in http_server.requests)


def test_the_seconds_left_go_as_x_request_timeout_recomputed_at_each_attempt(
    install_agent, http_server
):
    """aio-request servers read only X-Request-Timeout: without it they assume 20 s."""
    install_agent()
    retry = Retry(3, status_forcelist=[503], backoff_factor=0.2)
    with agent.deadline(10):
        urllib3.PoolManager().request("GET", http_server.url + "/flaky/attempts/2", retries=retry)
    sent = [float(r.header("X-Request-Timeout")) for r in http_server.requests]
    assert len(sent) == 3 and all(0 < left <= 10 for left in sent)
    assert sent == sorted(sent, reverse=True) and sent[-1] < sent[0]  # the time left, each time
    assert all(len(r.header("X-Request-Timeout").split(".")[1]) == 3 for r in http_server.requests)


@pytest.mark.parametrize(
    ("mode", "absolute", "relative"),
    [("both", True, True), ("absolute", True, False), ("relative", False, True)],
)
def test_which_deadline_headers_are_sent_is_a_setting(
    install_agent, http_server, mode, absolute, relative
):
    install_agent(TALISKER_DEADLINE_HEADERS=mode)
    with agent.deadline(10):
        requests.get(http_server.url + "/a")
        urllib3.PoolManager().request("GET", http_server.url + "/b", headers={"X-Other": "1"})
    for recorded in http_server.requests:
        assert (recorded.header("X-Request-Deadline") is not None) is absolute
        assert (recorded.header("X-Request-Timeout") is not None) is relative


def test_the_callers_own_timeout_and_priority_headers_are_kept(install_agent, http_server):
    install_agent()
    own = {"x-request-timeout": "99", "X-REQUEST-PRIORITY": "low"}
    with agent.deadline(10), agent.priority("high"):
        requests.get(http_server.url + "/a", headers=own)
        urllib3.PoolManager().request("GET", http_server.url + "/b", headers=own)
    for recorded in http_server.requests:
        assert recorded.header("X-Request-Timeout") == "99"
        assert recorded.header("X-Request-Priority") == "low"


def test_a_priority_is_sent_on_outgoing_calls_and_none_without_one(install_agent, http_server):
    install_agent()
    requests.get(http_server.url + "/none")
    with agent.priority("HIGH"):
        requests.get(http_server.url + "/high")
        with agent.priority("low"):
            urllib3.PoolManager().request("GET", http_server.url + "/low")
    sent = {r.path: r.header("X-Request-Priority") for r in http_server.requests}
    assert sent == {"/none": None, "/high": "high", "/low": "low"}
    with pytest.raises(ValueError):
        agent.priority("urgent")


def test_every_attempt_carries_the_same_id_and_the_deadline(install_agent, statsd, http_server):
    install_agent()
    pool = urllib3.PoolManager()
    with agent.deadline(10):
        pool.request(
            "GET", http_server.url + "/flaky/attempts/2", retries=Retry(3, status_forcelist=[503])
        )
        requests.get(http_server.url + "/redirect/2")
    flaky = [r for r in http_server.requests if r.path.startswith("/flaky")]
    redirects = [r for r in http_server.requests if r.path.startswith("/redirect")]
    assert len(flaky) == 3 and len(redirects) == 3
    for attempts in (flaky, redirects):
        assert len({r.header("X-Request-Id") for r in attempts}) == 1
        assert all(r.header("X-Request-Deadline") for r in attempts)


def test_headers_the_caller_set_are_never_overwritten(install_agent, http_server):
    install_agent()
    with agent.request_context(request_id="ours", deadline=5):
        requests.get(
            http_server.url,
            headers={"x-request-id": "theirs", "X-REQUEST-DEADLINE": "2030-01-01T00:00:00.000Z"},
        )
        urllib3.PoolManager().request("GET", http_server.url, headers={"X-Request-Id": "theirs2"})
    first, second = http_server.requests
    assert first.header("x-request-id") == "theirs"
    assert first.header("x-request-deadline") == "2030-01-01T00:00:00.000Z"
    assert second.header("x-request-id") == "theirs2"


def test_the_callers_dict_and_the_pools_headers_are_not_mutated(install_agent, http_server):
    install_agent()
    mine = {"Accept": "text/plain"}
    pool_headers = {"User-Agent": "pool-agent"}
    pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port, headers=pool_headers)
    session = requests.Session()
    with agent.deadline(5):
        pool.urlopen("GET", "/x", headers=mine)
        pool.urlopen("GET", "/y")
        urllib3.PoolManager().request("GET", http_server.url + "/redirect/1", headers=mine)
        session.get(http_server.url + "/z", headers=mine)
    assert mine == {"Accept": "text/plain"}
    assert pool_headers == {"User-Agent": "pool-agent"}
    assert dict(pool.headers) == {"User-Agent": "pool-agent"}
    assert "X-Request-Id" not in session.headers
    assert all(r.header("X-Request-Id") for r in http_server.requests)
    assert http_server.requests[1].header("User-Agent") == "pool-agent"


def test_headers_given_positionally_as_none_keep_the_pools_own(install_agent, http_server):
    """urllib3 uses the pool's headers for ``headers=None``, positional or keyword."""
    install_agent()
    pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port, headers={"X-Pool": "p"})
    pool.urlopen("GET", "/positional", None, None)
    pool.urlopen("GET", "/keyword", headers=None)
    for recorded in http_server.requests:
        assert recorded.header("X-Pool") == "p", recorded.path
        assert recorded.header("X-Request-Id")


def test_header_names_are_configurable(install_agent, http_server):
    install_agent(TALISKER_ID_HEADER="X-Correlation-Id", TALISKER_DEADLINE_HEADER="X-Deadline")
    with agent.request_context(request_id="corr", deadline=5):
        requests.get(http_server.url)
    (recorded,) = http_server.requests
    assert recorded.header("X-Correlation-Id") == "corr"
    assert recorded.header("X-Deadline")
    assert recorded.header("X-Request-Id") is None


# -- counting ------------------------------------------------------------------


def test_each_logical_request_is_counted_once(install_agent, statsd, http_server):
    install_agent()
    session = requests.Session()
    for _ in range(2):
        session.get(http_server.url + "/s")
    requests.get(http_server.url + "/redirect/2")  # one logical request, three attempts
    urllib3.PoolManager().request("GET", http_server.url + "/redirect/1")
    urllib3.HTTPConnectionPool("127.0.0.1", http_server.port).urlopen("GET", "/p")
    sent(statsd)
    assert statsd.wait_total(COUNT, 5) == 5
    assert statsd.total(RETRIES) == 3
    assert len(statsd.samples(LATENCY)) == 5


def test_retries_are_attempts_not_requests(install_agent, statsd, http_server):
    install_agent()
    pool = urllib3.PoolManager()
    response = pool.request(
        "GET", http_server.url + "/flaky/u3/2", retries=Retry(3, status_forcelist=[503])
    )
    assert response.status == 200
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(3, status_forcelist=[503])))
    assert session.get(http_server.url + "/flaky/rq/2").status_code == 200
    sent(statsd)
    assert statsd.wait_total(COUNT, 2) == 2
    assert statsd.total(RETRIES) == 4  # two extra attempts each
    assert statsd.total(COUNT, status="200") == 2
    assert statsd.total(ERRORS) == 0


def test_status_view_peer_and_method_tags(install_agent, statsd, http_server):
    install_agent()
    requests.post(http_server.url + "/view/users.show", data=b"x")
    requests.get(http_server.url + "/status/404")
    pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port)
    for _ in range(
        3
    ):  # the metrics thread runs from the first: the next take urlopen's inline record
        pool.urlopen("PUT", "/view/pool.show", body=b"x")
    sent(statsd)
    peer = http_server.netloc
    assert statsd.wait_total(COUNT, 1, view="users.show", method="POST", status="200", peer=peer)
    assert statsd.total(COUNT, view="unknown", method="GET", status="404") == 1
    assert statsd.wait_total(COUNT, 3, view="pool.show", method="PUT", status="200", peer=peer) == 3
    assert statsd.total(ERRORS) == 0  # a 4xx is not an error


def test_per_call_names_override_the_response(install_agent, statsd, http_server):
    install_agent()
    requests.get(
        http_server.url + "/view/remote", metric_api_name="api.call", metric_host_name="users-api"
    )
    with agent.metric_names(view="scoped", peer="scoped-peer"):
        urllib3.PoolManager().request("GET", http_server.url + "/view/remote")
    sent(statsd)
    assert statsd.wait_total(COUNT, 1, view="api.call", peer="users-api") == 1
    assert statsd.total(COUNT, view="scoped", peer="scoped-peer") == 1


def test_registered_endpoint_names(install_agent, statsd, http_server):
    install_agent(TALISKER_ENDPOINT_NAMES=f"{http_server.netloc}=from-env")
    requests.get(http_server.url)
    agent.register_endpoint_name(http_server.netloc, "from-code")
    requests.get(http_server.url)
    sent(statsd)
    assert statsd.wait_total(COUNT, 1, peer="from-env") == 1
    assert statsd.wait_total(COUNT, 1, peer="from-code") == 1
    from agent import naming

    naming._registered.clear()
    naming.reset()


# -- errors --------------------------------------------------------------------


def test_http_5xx_is_an_error_with_its_status(install_agent, statsd, http_server):
    install_agent()
    requests.get(http_server.url + "/status/503")
    urllib3.PoolManager().request("GET", http_server.url + "/status/500")
    sent(statsd)
    assert statsd.wait_total(ERRORS, 1, type="http", code="503") == 1
    assert statsd.wait_total(ERRORS, 1, type="http", code="500") == 1


def error_of(statsd, **tags):
    sent(statsd)
    statsd.wait_for(lambda: statsd.total(ERRORS) >= 1, 3)
    (metric,) = statsd.find(ERRORS)
    return metric.tag("type"), metric.tag("code")


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_connection_refused(install_agent, statsd, client):
    install_agent()
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(
        requests.ConnectionError if client == "requests" else urllib3.exceptions.HTTPError
    ):
        if client == "requests":
            requests.get(url)
        else:
            urllib3.PoolManager().request("GET", url, retries=False)
    assert error_of(statsd) == ("connection", "ECONNREFUSED")
    assert statsd.total(COUNT, status="error") == 1


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_connection_reset(install_agent, statsd, http_server, client):
    install_agent()
    with pytest.raises((requests.ConnectionError, urllib3.exceptions.ProtocolError)):
        if client == "requests":
            requests.get(http_server.url + "/reset")
        else:
            urllib3.PoolManager().request("GET", http_server.url + "/reset", retries=False)
    assert error_of(statsd) == ("connection", "ECONNRESET")


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_name_resolution_failure(install_agent, statsd, client):
    install_agent()
    url = "http://does-not-resolve.invalid:8080/"
    with pytest.raises((requests.ConnectionError, urllib3.exceptions.HTTPError)):
        if client == "requests":
            requests.get(url)
        else:
            urllib3.PoolManager().request("GET", url, retries=False)
    kind, code = error_of(statsd)
    assert kind == "connection" and code in ("EAI_NONAME", "EAI_AGAIN")
    assert statsd.find(COUNT)[0].tag("peer") == "does-not-resolve.invalid:8080"


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_tls_failure(install_agent, statsd, http_server, client):
    install_agent()
    url = f"https://127.0.0.1:{http_server.port}/"  # the server speaks plain HTTP
    with pytest.raises((requests.exceptions.SSLError, urllib3.exceptions.HTTPError)):
        if client == "requests":
            requests.get(url)
        else:
            urllib3.PoolManager().request("GET", url, retries=False)
    assert error_of(statsd) == ("connection", "ssl")


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_connect_timeout(install_agent, statsd, client):
    install_agent()
    server = UnacceptingServer()
    try:
        with pytest.raises((requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)):
            if client == "requests":
                requests.get(server.url, timeout=(0.2, 5))
            else:
                urllib3.PoolManager().request(
                    "GET", server.url, timeout=urllib3.Timeout(connect=0.2), retries=False
                )
    finally:
        server.close()
    assert error_of(statsd) == ("timeout", "timeout")


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_read_timeout(install_agent, statsd, http_server, client):
    install_agent()
    with pytest.raises((requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        if client == "requests":
            requests.get(http_server.url + "/delay/1", timeout=0.2)
        else:
            urllib3.PoolManager().request(
                "GET", http_server.url + "/delay/1", timeout=0.2, retries=False
            )
    assert error_of(statsd) == ("timeout", "timeout")


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_a_slow_endpoint_fails_at_the_deadline(install_agent, statsd, http_server, client):
    install_agent()
    start = time.monotonic()
    with agent.deadline(0.3), pytest.raises((requests.Timeout, urllib3.exceptions.TimeoutError)):
        if client == "requests":
            requests.get(http_server.url + "/delay/5")
        else:
            urllib3.PoolManager().request("GET", http_server.url + "/delay/5", retries=False)
    assert time.monotonic() - start < 3  # cut short: the server takes 5 s
    assert error_of(statsd) == ("deadline", "deadline")


def test_the_deadline_bounds_the_callers_longer_timeout(install_agent, http_server):
    install_agent()
    start = time.monotonic()
    with agent.deadline(0.3), pytest.raises(requests.ReadTimeout):
        requests.get(http_server.url + "/delay/5", timeout=(10, 10))
    assert time.monotonic() - start < 3  # cut short: the server takes 5 s


def test_a_shorter_caller_timeout_still_wins(install_agent, statsd, http_server):
    install_agent()
    start = time.monotonic()
    with agent.deadline(10), pytest.raises(requests.ReadTimeout):
        requests.get(http_server.url + "/delay/5", timeout=0.2)
    assert time.monotonic() - start < 3  # cut short: the server takes 5 s
    assert error_of(statsd) == ("timeout", "timeout")


@pytest.mark.parametrize("where", ["pool", "manager"])
def test_a_pools_own_shorter_timeout_still_wins(install_agent, statsd, http_server, where):
    # No timeout in the call: urllib3 uses the pool's, which a far deadline must not replace.
    install_agent()
    start = time.monotonic()
    with agent.deadline(10), pytest.raises(urllib3.exceptions.ReadTimeoutError):
        if where == "pool":
            pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port, timeout=0.2)
            pool.urlopen("GET", "/delay/5", retries=False)
        else:
            manager = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=0.2))
            manager.request("GET", http_server.url + "/delay/5", retries=False)
    assert time.monotonic() - start < 3  # cut short: the server takes 5 s
    assert error_of(statsd) == ("timeout", "timeout")


def test_an_expired_deadline_sends_nothing_and_raises(install_agent, statsd, http_server):
    install_agent()
    with agent.deadline(0.01):
        time.sleep(0.02)
        with pytest.raises(requests.exceptions.Timeout) as caught:
            requests.get(http_server.url + "/never")
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, agent.DeadlineExceeded)
        with pytest.raises(TimeoutError):
            requests.post(http_server.url + "/never", data=b"body")
        with pytest.raises(urllib3.exceptions.TimeoutError) as caught3:
            urllib3.PoolManager().request("GET", http_server.url + "/never")
        assert isinstance(caught3.value, agent.DeadlineExceeded)
    assert http_server.requests == []
    sent(statsd)
    assert statsd.wait_total(ERRORS, 3, type="deadline", code="deadline") == 3
    assert statsd.total(COUNT, peer=http_server.netloc) == 3


def test_the_deadline_is_checked_before_each_retry(install_agent, statsd, http_server):
    install_agent()
    pool = urllib3.PoolManager()
    retry = Retry(10, status_forcelist=[503], backoff_factor=0.2)
    start = time.monotonic()
    with agent.deadline(0.5), pytest.raises(agent.DeadlineExceeded):
        pool.request("GET", http_server.url + "/flaky/backoff/100", retries=retry)
    assert time.monotonic() - start < 1.5
    assert len(http_server.requests) < 10


@pytest.mark.parametrize("timeout", ["1", True, -1, 0, float("nan"), object()])
def test_a_timeout_urllib3_rejects_is_rejected_the_same_under_a_deadline(
    install_agent, http_server, timeout
):
    """A value the agent does not understand reaches urllib3 unchanged."""

    def outcome() -> tuple[object, str]:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port)
        try:
            pool.urlopen("GET", "/", timeout=timeout, retries=False)
        except Exception as exc:
            return type(exc), str(exc)
        return "no error", ""

    without = outcome()
    install_agent()
    with agent.deadline(30):
        with_agent = outcome()
    assert with_agent == without
    assert without[0] != "no error"  # urllib3 itself rejects each of them


def test_a_far_future_deadline_behaves_as_none(install_agent, http_server):
    install_agent()
    with agent.deadline(10**12):
        assert agent.deadline_timeout() is None
        requests.get(http_server.url + "/a", timeout=5)
        urllib3.PoolManager().request("GET", http_server.url + "/b")
    with agent.request_context(deadline=1e300):
        assert agent.deadline_timeout() is None
    assert [r.header("X-Request-Deadline") for r in http_server.requests] == [None, None]


def test_after_a_retried_error_a_dropped_response_is_freed_as_without_the_agent(
    install_agent, http_server
):
    """urllib3 keeps the exception it retried in a cycle with the frames above it,
    ours included: those must not hold the response (and its socket) until a GC."""
    import gc
    import weakref

    def alive_after_drop(tag: str) -> dict[str, bool]:
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=Retry(2)))
        pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port)
        manager = urllib3.PoolManager(retries=Retry(2))
        calls = {
            "pool": lambda: pool.urlopen(
                "GET", f"/reset-once/p{tag}", retries=Retry(2), preload_content=False
            ),
            "manager": lambda: manager.request(
                "GET", f"{http_server.url}/reset-once/m{tag}", preload_content=False
            ),
            "requests": lambda: session.get(f"{http_server.url}/reset-once/r{tag}"),
        }
        alive = {}
        gc.collect()
        gc.disable()
        try:
            for name, call in calls.items():
                ref = weakref.ref(call())
                alive[name] = ref() is not None
        finally:
            gc.enable()
        return alive

    without = alive_after_drop("plain")
    install_agent()
    assert alive_after_drop("agent") == without
    assert without["pool"] is False  # so the check above can fail
    assert len(http_server.requests) == 12  # each was retried once


# -- what the application sees -------------------------------------------------


def test_responses_and_exceptions_are_unchanged(install_agent, http_server):
    def observe() -> list[object]:
        seen: list[object] = []
        r = requests.get(http_server.url + "/view/v", headers={"A": "1"})
        seen.append((r.status_code, r.text, r.headers.get("X-View-Name")))
        u = urllib3.PoolManager().request("GET", http_server.url + "/status/503")
        seen.append((u.status, u.data))
        for call in (
            lambda: requests.get(f"http://127.0.0.1:{closed_port()}/"),
            lambda: requests.get(http_server.url + "/delay/1", timeout=0.1),
            lambda: urllib3.PoolManager().request(
                "GET", f"http://127.0.0.1:{closed_port()}/", retries=False
            ),
        ):
            try:
                call()
            except Exception as exc:
                seen.append(type(exc))
        return seen

    without = observe()
    install_agent()
    with agent.request_context():
        with_agent = observe()
    assert with_agent == without


def test_every_argument_of_urlopen_reaches_urllib3_as_given(install_agent, http_server):
    # The direct patch of urllib3 2.x takes urlopen's parameters by name and passes
    # them on in place: each form of call must do what it does without the agent.
    import gzip

    from tests.support.http import Route

    http_server.routes["/gz"] = Route(
        body=gzip.compress(b"zipped"), headers={"Content-Encoding": "gzip"}
    )

    def observe() -> list[object]:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port)
        raw = pool.urlopen("GET", "/gz", preload_content=False, decode_content=False)
        decoded = pool.urlopen("GET", "/gz")
        lazy = pool.urlopen("GET", "/gz", preload_content=False)  # decoded as read
        eager = pool.urlopen("GET", "/gz", decode_content=False)  # read, not decoded
        kept = pool.urlopen("GET", "/redirect/1", redirect=False)
        positional = pool.urlopen("GET", "/redirect/1", None, None, False, False)
        followed = pool.urlopen("GET", "/redirect/1", None, None, None, True)
        posted = pool.urlopen("POST", "/echo", b"body", pool_timeout=5, release_conn=True)
        # A response keyword goes on in **response_kw (the direct patch's other call).
        keyword = pool.urlopen("GET", "/gz", enforce_content_length=True)
        with pytest.raises(TypeError) as refused:
            pool.urlopen("GET", "/gz", no_such_keyword=1)
        seen = [gzip.decompress(raw.read()), decoded.data, lazy.read(), gzip.decompress(eager.data)]
        return [
            *seen,
            kept.status,
            positional.status,
            followed.status,
            followed.data,
            posted.status,
            keyword.data,
            str(refused.value),
        ]

    without = observe()
    assert without[:10] == [b"zipped"] * 4 + [302, 302, 200, b"ok", 200, b"zipped"]
    assert "no_such_keyword" in without[10]
    install_agent()
    del http_server.requests[:]
    with agent.request_context(request_id="in-place", deadline=30):
        assert observe() == without
    assert len(http_server.requests) >= 10  # 1.26 sends the refused one before it refuses
    assert {r.header("X-Request-Id") for r in http_server.requests} == {"in-place"}
    assert all(r.header("X-Request-Timeout") for r in http_server.requests)


def _urlopen_refusals(pool, calls=None):
    """What each call of ``pool.urlopen`` that does not fit its parameters raises."""
    if calls is None:
        calls = [
            ((), {}),
            (("GET",), {}),
            (("GET", "/"), {"method": "GET"}),
            (("GET", "/", *[None] * 13), {}),  # one positional argument too many
            ((), {"url": "/"}),
        ]
    refused = []
    for args, kwargs in calls:
        with pytest.raises(TypeError) as caught:
            pool.urlopen(*args, **kwargs)
        refused.append(str(caught.value))
    return refused


def test_urlopen_patched_looks_and_refuses_bad_calls_as_urllib3s(install_agent):
    import inspect
    import types

    from urllib3.connectionpool import HTTPConnectionPool

    from agent import registry

    pool = HTTPConnectionPool("127.0.0.1", closed_port())
    original = vars(HTTPConnectionPool)["urlopen"]
    plain = _urlopen_refusals(pool)
    install_agent()
    patched = vars(HTTPConnectionPool)["urlopen"]
    assert registry.is_ours(patched) and patched.__wrapped__ is original
    if urllib3.__version__.startswith("1."):
        # 1.26's urlopen has other parameters than the direct function: wrapt's wrapper
        assert isinstance(patched, registry.wrapper_class())
    else:  # 2.x: a plain function, named as urllib3's
        assert type(patched) is types.FunctionType
        for name in ("__name__", "__qualname__", "__module__", "__doc__", "__defaults__"):
            assert getattr(patched, name) == getattr(original, name), name
    assert inspect.signature(HTTPConnectionPool.urlopen) == inspect.signature(original)
    assert inspect.signature(pool.urlopen) == inspect.signature(types.MethodType(original, pool))
    assert _urlopen_refusals(pool) == plain
    agent.uninstall()
    assert vars(HTTPConnectionPool)["urlopen"] is original


def test_poolmanager_urlopen_is_a_plain_function_that_refuses_bad_calls_as_urllib3s(
    install_agent,
):
    # PoolManager.urlopen(self, method, url, redirect=True, **kw) in 1.26 and 2.x: the
    # agent's direct patch, no wrapt binding on each access.
    import inspect
    import types

    from urllib3.poolmanager import PoolManager

    from agent import registry

    calls = [((), {}), (("GET",), {}), (("GET", "/", True, 1), {}), (("GET", "/"), {"url": 1})]

    def refusals(manager):
        return _urlopen_refusals(manager, calls)

    manager = PoolManager()
    original = vars(PoolManager)["urlopen"]
    plain = refusals(manager)
    install_agent()
    patched = vars(PoolManager)["urlopen"]
    assert type(patched) is types.FunctionType and registry.is_ours(patched)
    assert patched.__wrapped__ is original
    for name in ("__name__", "__qualname__", "__module__", "__doc__", "__defaults__"):
        assert getattr(patched, name) == getattr(original, name), name
    assert inspect.signature(PoolManager.urlopen) == inspect.signature(original)
    assert refusals(manager) == plain
    agent.uninstall()
    assert vars(PoolManager)["urlopen"] is original


def test_hostile_view_names_cannot_corrupt_datagrams_or_grow_tags(
    install_agent, statsd, http_server
):
    install_agent(TALISKER_METRICS_MAX_TAG_VALUES="50")
    from tests.support.http import Route

    session = requests.Session()
    # Ten times the bound of distinct names: enough to overflow it; each one counted.
    for i in range(500):
        http_server.routes["/hostile"] = Route(headers={"X-View-Name": f"a|b,c#d {i}"})
        session.get(http_server.url + "/hostile")
    sent(statsd)
    assert statsd.wait_total(COUNT, 500, timeout=10) == 500
    views = {m.tag("view") for m in statsd.find(COUNT)}
    assert len(views) == 51 and "other" in views
    assert all("|" not in v and "," not in v and "#" not in v for v in views)
    assert not statsd.errors


def test_user_info_and_query_strings_never_reach_a_datagram(install_agent, statsd, http_server):
    install_agent()
    base = f"http://alice:s3cr3t-XYZ@127.0.0.1:{http_server.port}"
    requests.get(base + "/private/path?token=abc123secret")
    urllib3.PoolManager().request("GET", base + "/private/path?token=abc123secret")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://alice:s3cr3t-XYZ@127.0.0.1:{closed_port()}/p?token=abc123secret")
    sent(statsd)
    statsd.wait_for(lambda: statsd.total(COUNT) >= 3)
    text = statsd.raw_text()
    for secret in ("s3cr3t", "alice", "abc123secret", "token", "private"):
        assert secret not in text


def test_uninstall_stops_everything(install_agent, statsd, http_server):
    install_agent()
    agent.uninstall()
    requests.get(http_server.url)
    urllib3.PoolManager().request("GET", http_server.url)
    assert all(r.header("X-Request-Id") is None for r in http_server.requests)
    assert not statsd.wait_for(lambda: bool(statsd.datagrams), 0.5)


# -- threads -------------------------------------------------------------------


def test_a_copy_of_the_context_in_another_thread_makes_calls_of_its_own(
    install_agent, statsd, http_server
):
    # asyncio.to_thread and copy_context().run in a pool run a copy of the context of
    # a call in flight in another thread: its calls are the application's own, not
    # attempts of the call in flight (the copy shares that call's record with its thread).
    install_agent()
    pool = urllib3.PoolManager()
    statuses = []

    def in_another_thread(response, **kwargs):  # a requests hook: inside the outer call
        copy = contextvars.copy_context()
        thread = threading.Thread(
            target=lambda: statuses.append(copy.run(pool.request, "GET", http_server.url + "/in"))
        )
        thread.start()
        thread.join()

    with agent.request_context(request_id="outer-id"):
        requests.get(http_server.url + "/out", hooks={"response": in_another_thread})
        pool.request("GET", http_server.url + "/after")  # this thread's next call: its own too
    sent(statsd)
    assert [r.status for r in statuses] == [200]
    assert statsd.wait_total(COUNT, 3) == 3
    assert statsd.total(RETRIES) == 0
    assert [r.header("X-Request-Id") for r in http_server.requests] == ["outer-id"] * 3


@pytest.mark.parametrize("threads", [True, False], ids=["gevent-threads", "os-threads"])
def test_greenlets_sharing_a_context_make_calls_of_their_own(statsd, http_server, threads):
    # gevent switches greenlets inside a urllib3 call. Greenlets started in a copy of
    # their parent's context (as ddtrace's gevent integration starts them) share what
    # the context holds, and without gevent's threads (thread=False) have one thread
    # id: each call is still its own.
    check_python(
        f"""
        import agent  # first, as sitecustomize or talisker-run imports it
        from gevent import monkey
        monkey.patch_all(thread={threads})
        import contextvars, gevent, urllib3

        pool = urllib3.PoolManager()
        assert pool.request("GET", "{http_server.url}/first").status == 200

        def start(path):
            greenlet = gevent.Greenlet(pool.request, "GET", "{http_server.url}" + path)
            greenlet.gr_context = contextvars.copy_context()
            greenlet.start()
            return greenlet

        # each waits in the server while the other is sent: they are in flight together
        greenlets = [start("/delay/0.3"), start("/delay/0.3")]
        gevent.joinall(greenlets, raise_error=True)
        assert [g.value.status for g in greenlets] == [200, 200]
        assert agent.flush(5)
        """,
        {"TALISKER_ENABLED": "true", **statsd.env},
    )
    assert statsd.wait_total(COUNT, 3) == 3
    assert statsd.total(RETRIES) == 0
    assert len(http_server.requests) == 3


def test_sixteen_threads_through_get_session_count_exactly(install_agent, statsd, http_server):
    install_agent()
    sessions: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            session = agent.get_session()
            sessions[n] = session
            for _ in range(150):
                session.get(http_server.url + "/t")
                assert agent.get_session() is session
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({id(s) for s in sessions.values()}) == 16
    sent(statsd)
    assert statsd.wait_total(COUNT, 16 * 150, timeout=10) == 16 * 150
    assert len(http_server.requests) == 16 * 150


def test_get_session_of_another_class():
    class MySession(requests.Session):
        pass

    mine = agent.get_session(MySession)
    assert isinstance(mine, MySession)
    assert agent.get_session(MySession) is mine
    assert agent.get_session() is not mine


def test_each_retry_is_counted_with_its_reason_and_the_backoff_is_timed(
    install_agent, statsd, http_server
):
    install_agent()
    retry = Retry(3, status_forcelist=[503], backoff_factor=0.05)  # 0 s, then 0.1 s
    with agent.deadline(30):
        urllib3.PoolManager().request("GET", http_server.url + "/flaky/why/2", retries=retry)
    requests.get(http_server.url + "/redirect/2")  # requests follows them: two attempts more
    urllib3.PoolManager().request("GET", http_server.url + "/redirect/1")  # urllib3 does
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(2)))
    session.get(http_server.url + "/reset-once/errno")  # a connection error, then 200
    sent(statsd)
    statsd.wait_for(lambda: statsd.total(RETRIES) >= 6)
    assert statsd.total(RETRIES, reason="503") == 2
    assert statsd.total(RETRIES, reason="redirect") == 3
    (error_reason,) = {m.tag("reason") for m in statsd.find(RETRIES)} - {"503", "redirect"}
    assert error_reason in ("ECONNRESET", "EPIPE")  # an errno name, as in requests.errors
    assert statsd.total(RETRIES) == 6
    backoff = statsd.find("talisker.requests.backoff")
    assert len(backoff) == 1 and backoff[0].type == "d" and backoff[0].value >= 100
    assert backoff[0].tag("peer") and backoff[0].tag("reason") is None


# -- retries under a deadline ---------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch):
    """The waits the agent makes between attempts (really made, and recorded)."""
    from agent.instrumentation.urllib3 import retries as instrumentation

    made: list[float] = []

    def sleep(seconds: float) -> None:
        made.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(instrumentation, "_sleep", sleep)
    return made


def test_a_retry_after_past_the_deadline_fails_at_once_without_waiting(
    install_agent, statsd, http_server, sleeps
):
    install_agent()
    started = time.monotonic()
    with agent.deadline(1), pytest.raises(agent.DeadlineExceeded) as raised:
        urllib3.PoolManager().request("GET", http_server.url + "/busy/a/1/5")  # urllib3's Retry
    assert time.monotonic() - started < 5  # it did not wait the 5 s asked for
    assert isinstance(raised.value, urllib3.exceptions.TimeoutError)
    assert sleeps == [] and len(http_server.requests) == 1
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(3, status_forcelist=[429])))
    with agent.deadline(1), pytest.raises(requests.exceptions.Timeout):  # requests' flavour
        session.get(http_server.url + "/busy/b/1/5")
    assert sleeps == [] and len(http_server.requests) == 2
    assert agent.flush(5)
    statsd.wait_for(lambda: statsd.total("talisker.requests.errors", type="deadline") >= 2)


def test_a_backoff_past_the_deadline_stops_the_retries(install_agent, http_server, sleeps):
    install_agent()
    retry = Retry(5, status_forcelist=[503], backoff_factor=30)  # 0 s, then 60 s
    with agent.deadline(20), pytest.raises(agent.DeadlineExceeded):
        urllib3.PoolManager().request("GET", http_server.url + "/flaky/c/9", retries=retry)
    assert len(http_server.requests) == 2  # the first retry waits nothing; the next would
    assert all(wait < 20 for wait in sleeps)


def test_under_a_deadline_a_retry_after_waits_at_most_the_setting(
    install_agent, http_server, sleeps
):
    install_agent(TALISKER_RETRY_AFTER_MAX="0.05")
    with agent.deadline(30):
        response = urllib3.PoolManager().request("GET", http_server.url + "/busy/d/1/5")
    assert response.status == 200 and len(http_server.requests) == 2
    assert sleeps == [0.05]


def test_outside_a_deadline_the_applications_retry_is_untouched(install_agent, http_server, sleeps):
    install_agent()
    started = time.monotonic()
    response = urllib3.PoolManager().request("GET", http_server.url + "/busy/e/1/1")
    assert response.status == 200 and len(http_server.requests) == 2
    assert sleeps == [] and time.monotonic() - started >= 1  # urllib3 waited the Retry-After


# -- calls the caller gave up on -------------------------------------------------------


class Interrupted(BaseException):
    """What a signal handler raises mid-call, as KeyboardInterrupt or gevent's Timeout do."""


@pytest.fixture
def interrupt_when_received():
    """Raise Interrupted in this thread once ``server`` has the request (it then sleeps)."""
    import signal

    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    main = threading.get_ident()

    def arm(server):
        def watch():
            waited = time.monotonic() + 30
            while not server.requests and time.monotonic() < waited:
                time.sleep(0.01)
            if server.requests:  # else the test fails on its own, with no signal left behind
                signal.pthread_kill(main, signal.SIGALRM)

        threading.Thread(target=watch, daemon=True).start()

    try:
        yield arm
    finally:
        signal.signal(signal.SIGALRM, previous)


def interrupted_call(http_server, interrupt_when_received, client):
    url = http_server.url + "/delay/5"
    started = time.perf_counter()
    interrupt_when_received(http_server)  # while the server sleeps: the client waits for it
    with pytest.raises(Interrupted):
        if client == "requests":
            requests.get(url)
        elif client == "urllib3-pool":
            urllib3.HTTPConnectionPool("127.0.0.1", http_server.port).urlopen("GET", "/delay/5")
        else:
            urllib3.PoolManager().request("GET", url, retries=False)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert len(http_server.requests) == 1  # it was sent: the peer saw it
    return elapsed_ms


@pytest.mark.parametrize("client", ["requests", "urllib3-pool", "urllib3-manager"])
def test_a_call_interrupted_by_its_caller_is_a_499_not_an_error(
    install_agent, statsd, http_server, interrupt_when_received, client
):
    install_agent()
    elapsed_ms = interrupted_call(http_server, interrupt_when_received, client)
    sent(statsd)
    assert statsd.wait_total(COUNT, 1, status="499") == 1
    assert statsd.total(COUNT) == 1  # once, whatever the layers
    assert statsd.total(ERRORS) == 0  # the peer did not fail
    (latency,) = statsd.samples(LATENCY, status="499")
    assert 0 < latency <= elapsed_ms  # the call's time until it was given up
    assert requests.get(http_server.url + "/after").status_code == 200  # all as before


@pytest.mark.parametrize("client", ["requests", "urllib3-pool"])
def test_an_interrupted_call_is_no_outcome_for_the_circuit_breaker(
    install_agent, statsd, http_server, interrupt_when_received, client, monkeypatch
):
    from agent.http import breaker

    monkeypatch.setattr(breaker, "_breakers", {})
    install_agent(TALISKER_CIRCUIT_BREAKER=f"{http_server.netloc}=0.5/1/30/10")
    interrupted_call(http_server, interrupt_when_received, client)
    circuit = breaker._breakers[http_server.netloc]
    assert circuit.state == breaker.CLOSED
    assert sum(b[1] + b[2] for b in circuit._buckets) == 0  # neither a success nor a failure
    sent(statsd)
    assert statsd.wait_total(COUNT, 1, status="499") == 1


def test_the_requests_of_a_flush_are_grouped_by_peer_view_method_and_status_in_any_order():
    """Interleaved groups, equal but not identical strings: each request in its own group."""
    from agent import metrics
    from agent.http import client

    view = "".join(["sh", "ow"])  # equal to "show", another object (as each response's is)

    def ok(peer, view, method, status, ms):
        return (peer, view, method, status, ms, None, None, None, 0.0)

    payloads = [  # each differs from the one before in what its comment says
        ok("p", "show", "GET", 200, 1.0),
        ok("p", view, "GET", 200, 2.0),  # nothing (an equal view)
        ok("q", "show", "GET", 200, 3.0),  # the peer
        ok("p", "show", "GET", 200, 4.0),  # the peer
        ok("p", "show", "PUT", 200, 5.0),  # the method
        ok("p", "show", "GET", 200, 6.0),  # the method
        ok("p", "show", "GET", 404, 7.0),  # the status
        ok("p", "list", "GET", 404, 8.0),  # the view
        ("p", "show", "GET", "error", 9.0, "connection", "ECONNREFUSED", None, 0.0),
        ok("q", view, "GET", 200, 10.0),
    ]
    records = client.expand_requests(payloads)

    def tags(peer, view, method, status):
        return (("peer", peer), ("view", view), ("method", method), ("status", status))

    groups = [
        (tags("p", "show", "GET", 200), [1.0, 2.0, 4.0, 6.0]),
        (tags("q", "show", "GET", 200), [3.0, 10.0]),
        (tags("p", "show", "PUT", 200), [5.0]),
        (tags("p", "show", "GET", 404), [7.0]),
        (tags("p", "list", "GET", 404), [8.0]),
        (tags("p", "show", "GET", "error"), [9.0]),
    ]
    expected = []
    for group_tags, samples in groups:
        expected.append((metrics.COUNT, "requests.count", len(samples), group_tags))
        expected.append((metrics.TIMING, "requests.latency", samples, group_tags))
    error_tags = (
        *tags("p", "show", "GET", "error")[:3],
        ("type", "connection"),
        ("code", "ECONNREFUSED"),
    )
    expected.append((metrics.COUNT, "requests.errors", 1, error_tags))
    assert records == expected
    assert client.expand_requests([]) == []
