"""The server side: WSGI middleware and Flask, served by a real WSGI server on loopback."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import MethodType
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import flask
import pytest
import requests
import urllib3

import agent
from agent import context
from agent.wsgi import TaliskerMiddleware, current_request, parse_deadline
from tests.support.proc import run_python


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class _ThreadedServer(WSGIServer):
    daemon_threads = True


@contextmanager
def serve(app) -> Iterator[str]:
    """Serve ``app`` on loopback in a thread; yields the base URL."""
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def sent(statsd, name="talisker.wsgi.requests", at_least=1):
    statsd.flushed(lambda: agent.flush(5), lambda: statsd.total(name) >= at_least)


class Recorder:
    """A WSGI app that records what it saw of the agent, and how often it ran."""

    def __init__(self, status="200 OK", body=(b"ok",), raise_error=None):
        self.status = status
        self.body = body
        self.raise_error = raise_error
        self.calls = 0
        self.seen: dict = {}

    def __call__(self, environ, start_response):
        self.calls += 1
        scope = context.current()
        self.seen = {
            "request_id": scope.request_id,
            "deadline": scope.deadline.remaining() if scope.deadline else None,
            "environ_id": environ.get("REQUEST_ID"),
            "session": environ.get("requests"),
        }
        if self.raise_error is not None:
            raise self.raise_error
        start_response(self.status, [("Content-Type", "text/plain")])
        return list(self.body)


# -- request ids -----------------------------------------------------------------


def test_an_incoming_request_id_is_reused_and_returned(install_agent):
    install_agent()
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        response = requests.get(url, headers={"X-Request-Id": "abc-123"})
    assert app.seen["request_id"] == "abc-123"
    assert app.seen["environ_id"] == "abc-123"
    assert response.headers["X-Request-Id"] == "abc-123"


def test_the_response_headers_the_app_sets_itself_are_kept_in_any_case(install_agent):
    """Its own id and view header (any case, any configured name) are not added again."""

    def respond(app_headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        def app(environ, start_response):
            start_response("200 OK", list(app_headers))
            return [b""]

        given = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_X_REQUEST_ID": "in"}
        TaliskerMiddleware(app)(environ, lambda status, headers: given.extend(headers)).close()
        return given

    install_agent()
    for _ in range(2):  # the second time, the names are known
        assert respond([("x-request-id", "own"), ("X-VIEW-NAME", "v")]) == [
            ("x-request-id", "own"),
            ("X-VIEW-NAME", "v"),
        ]
        assert respond([("Content-Type", "text/plain")]) == [
            ("Content-Type", "text/plain"),
            ("X-Request-Id", "in"),
        ]
    agent.uninstall()
    install_agent(TALISKER_ID_HEADER="X-Trace-Id")
    assert respond([("x-request-id", "own"), ("x-trace-id", "t")]) == [
        ("x-request-id", "own"),
        ("x-trace-id", "t"),
    ]
    (_, (name, new_id)) = respond([("Content-Type", "text/plain")])
    assert name == "X-Trace-Id" and len(new_id) == 32  # the incoming id is in X-Trace-Id


def test_without_an_incoming_id_a_new_one_is_made(install_agent):
    install_agent()
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        first = requests.get(url).headers["X-Request-Id"]
        second = requests.get(url).headers["X-Request-Id"]
    assert len(first) == 32 and first != second


@pytest.mark.parametrize("bad", ["has space", "x" * 201, "é-accent", ""])
def test_an_unusable_incoming_id_is_replaced(install_agent, caplog, bad):
    install_agent(TALISKER_LOG_LEVEL="DEBUG")
    app = Recorder()
    with caplog.at_level(logging.DEBUG, logger="agent"), serve(TaliskerMiddleware(app)) as url:
        response = requests.get(url, headers={"X-Request-Id": bad.encode("utf-8")})
    assert response.status_code == 200
    assert app.seen["request_id"] != bad and len(app.seen["request_id"]) == 32


def test_ids_can_be_composed_as_talisker_does(install_agent):
    install_agent(TALISKER_COMPOSE_REQUEST_ID="true")
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url, headers={"X-Request-Id": "upstream-1"})
    new, _, incoming = app.seen["request_id"].partition("-")
    assert len(new) == 32 and incoming == "upstream-1"


# -- deadlines -------------------------------------------------------------------


def iso(delta: float, fmt: str = "%Y-%m-%dT%H:%M:%S.%fZ", tz=timezone.utc) -> str:
    return (datetime.now(tz) + timedelta(seconds=delta)).strftime(fmt)


@pytest.mark.parametrize(
    "header",
    [
        lambda: iso(30)[:-4] + "Z",  # milliseconds
        lambda: iso(30, "%Y-%m-%dT%H:%M:%SZ"),  # no fraction
        lambda: iso(30, "%Y-%m-%dT%H:%M:%S.%f+02:00", timezone(timedelta(hours=2))),  # offset
        lambda: iso(30, "%Y-%m-%dT%H:%M:%S-0500", timezone(timedelta(hours=-5))),  # no colon
    ],
)
def test_the_incoming_deadline_header_is_parsed(install_agent, header):
    install_agent()
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url, headers={"X-Request-Deadline": header()})
    assert 20 < app.seen["deadline"] <= 30.1


@pytest.mark.parametrize(
    "garbage", ["tomorrow", "2026-13-45T99:00:00Z", "2026-11-21T05:12:33", "1e9"]
)
def test_a_garbage_deadline_is_ignored(install_agent, garbage):
    install_agent()
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        assert requests.get(url, headers={"X-Request-Deadline": garbage}).status_code == 200
    assert app.seen["deadline"] is None


def test_the_earliest_of_header_timeout_setting_and_view_wins(install_agent):
    install_agent(TALISKER_REQUEST_TIMEOUT="80000")
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url)
        assert 70 < app.seen["deadline"] <= 80
        requests.get(url, headers={"X-Request-Deadline": iso(60)})
        assert 50 < app.seen["deadline"] <= 60
        requests.get(url, headers={"X-Request-Deadline": iso(60), "X-Request-Timeout": "40"})
        assert 30 < app.seen["deadline"] <= 40

    @agent.request_timeout(timeout_ms=20000)
    def view(environ, start_response):
        start_response("200 OK", [])
        return [str(agent.deadline_timeout()).encode()]

    with serve(TaliskerMiddleware(view)) as url:
        assert 10 < float(requests.get(url).text) <= 20


def test_outgoing_calls_carry_a_deadline_no_later_than_the_incoming_one(install_agent, http_server):
    install_agent()
    incoming = iso(30)[:-4] + "Z"

    def app(environ, start_response):
        requests.get(http_server.url + "/upstream")
        start_response("200 OK", [])
        return [b""]

    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url, headers={"X-Request-Id": "abc-123", "X-Request-Deadline": incoming})
    (upstream,) = http_server.requests
    assert upstream.header("X-Request-Id") == "abc-123"
    assert upstream.header("X-Request-Deadline") <= incoming


@pytest.mark.parametrize(
    ("incoming", "explicit", "sent"),
    [
        ("high", None, "high"),  # passed on
        ("LOW", None, "low"),  # any case
        ("high", "low", "normal"),  # aio-request's rule: not to the opposite extreme
        ("low", "high", "normal"),
        ("low", "normal", "normal"),
        ("normal", "high", "high"),
        ("urgent", None, None),  # garbage is ignored
        (None, "low", "low"),
    ],
)
def test_the_incoming_priority_is_kept_and_passed_on(
    install_agent, http_server, incoming, explicit, sent
):
    install_agent()

    def app(environ, start_response):
        if explicit is None:
            requests.get(http_server.url + "/upstream")
        else:
            with agent.priority(explicit):
                requests.get(http_server.url + "/upstream")
        start_response("200 OK", [])
        return [b""]

    headers = {} if incoming is None else {"X-Request-Priority": incoming}
    with serve(TaliskerMiddleware(app)) as url:
        assert requests.get(url, headers=headers).status_code == 200
    (upstream,) = http_server.requests
    assert upstream.header("X-Request-Priority") == sent


def test_an_incoming_relative_timeout_is_passed_on_no_later(install_agent, http_server):
    install_agent()

    def app(environ, start_response):
        requests.get(http_server.url + "/upstream")
        start_response("200 OK", [])
        return [b""]

    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url, headers={"X-Request-Timeout": "7.5"})
    (upstream,) = http_server.requests
    assert 0 < float(upstream.header("X-Request-Timeout")) <= 7.5
    assert upstream.header("X-Request-Deadline") <= iso(7.5)


# -- what the application sees -----------------------------------------------------


def test_environ_requests_is_the_threads_session(install_agent):
    install_agent()
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url)
    assert isinstance(app.seen["session"], requests.Session)


def test_environ_requests_is_each_threads_own_session_and_a_forked_childs_own(install_agent):
    """``environ["requests"]`` is what ``agent.get_session()`` gives the serving thread."""
    install_agent()
    seen = []

    def app(environ, start_response):
        seen.append((environ["requests"], agent.get_session()))
        start_response("200 OK", [])
        return [b""]

    def serve_one():
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
        TaliskerMiddleware(app)(environ, lambda *a: None).close()

    serve_one()
    serve_one()
    thread = threading.Thread(target=serve_one)
    thread.start()
    thread.join()
    assert all(given is expected for given, expected in seen)
    assert seen[0][0] is seen[1][0]
    assert seen[2][0] is not seen[0][0]
    code = """
        import os, agent
        from agent.wsgi import TaliskerMiddleware
        seen = []

        def app(environ, start_response):
            seen.append((environ["requests"], agent.get_session()))
            start_response("200 OK", [])
            return [b""]

        def serve_one():
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
            TaliskerMiddleware(app)(environ, lambda *a: None).close()

        serve_one()
        pid = os.fork()
        if pid == 0:
            serve_one()
            (parent, _), (given, expected) = seen
            os._exit(0 if given is expected and given is not parent else 3)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


def test_an_exception_propagates_unchanged_and_the_app_runs_once(install_agent, statsd):
    install_agent()
    error = ValueError("boom")
    app = Recorder(raise_error=error)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.input": None}
    with pytest.raises(ValueError) as caught:
        TaliskerMiddleware(app)(environ, lambda *a: None)
    assert caught.value is error
    assert app.calls == 1
    sent(statsd)
    assert statsd.total("talisker.wsgi.errors", status="500") == 1


def test_the_scope_covers_a_streamed_body_and_is_gone_after(install_agent, statsd):
    install_agent()
    seen_during_body = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            for i in range(3):
                time.sleep(0.05)
                seen_during_body.append(context.current().request_id)
                yield f"{i}\n".encode()

        return body()

    with serve(TaliskerMiddleware(app)) as url:
        response = requests.get(url, headers={"X-Request-Id": "streamed"})
    assert response.text == "0\n1\n2\n"
    assert seen_during_body == ["streamed"] * 3
    assert context.current().request_id is None
    sent(statsd)
    (latency,) = statsd.samples("talisker.wsgi.latency")
    assert latency >= 150  # until the whole body was sent and close() called


def test_metrics_of_incoming_requests(install_agent, statsd):
    install_agent()
    with (
        serve(TaliskerMiddleware(Recorder())) as ok,
        serve(TaliskerMiddleware(Recorder("503 Unavailable"))) as bad,
    ):
        for _ in range(3):
            requests.get(ok)
        requests.post(bad, data=b"x")
    sent(statsd, at_least=4)
    assert statsd.total("talisker.wsgi.requests", method="GET", status="200", view="unknown") == 3
    assert statsd.total("talisker.wsgi.requests", method="POST", status="503") == 1
    assert statsd.total("talisker.wsgi.errors") == 1
    assert len(statsd.samples("talisker.wsgi.latency")) == 4
    assert len(statsd.samples("talisker.wsgi.cpu")) == 4


def test_cpu_is_the_handling_threads_cpu(install_agent, statsd):
    install_agent()

    def app(environ, start_response):
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        time.sleep(0.1)  # waiting is not CPU
        start_response("200 OK", [])
        return [b""]

    with serve(TaliskerMiddleware(app)) as url:
        requests.get(url)
    sent(statsd)
    (cpu,) = statsd.samples("talisker.wsgi.cpu")
    (latency,) = statsd.samples("talisker.wsgi.latency")
    assert 45 <= cpu <= 100
    assert latency >= 150


def test_a_soft_timeout_warns_once_with_the_request_id_and_counts(install_agent, statsd, caplog):
    install_agent(TALISKER_SOFT_REQUEST_TIMEOUT="50")

    def slow(environ, start_response):
        time.sleep(0.1)
        start_response("200 OK", [])
        return [b""]

    @agent.request_timeout(soft_timeout_ms=10_000)
    def lenient(environ, start_response):
        time.sleep(0.1)
        start_response("200 OK", [])
        return [b""]

    with caplog.at_level(logging.WARNING, logger="agent"):
        with serve(TaliskerMiddleware(slow)) as url:
            requests.get(url, headers={"X-Request-Id": "slow-1"})
        with serve(TaliskerMiddleware(lenient)) as url:
            requests.get(url, headers={"X-Request-Id": "fast-enough"})
    warnings = [r.getMessage() for r in caplog.records if r.name == "agent"]
    assert len(warnings) == 1 and "slow-1" in warnings[0]
    sent(statsd, "talisker.wsgi.soft_timeouts")
    assert statsd.total("talisker.wsgi.soft_timeouts") == 1


def test_the_view_name_comes_from_the_app(install_agent, statsd):
    install_agent()

    def named(environ, start_response):
        environ["talisker.view"] = "users.show"
        start_response("200 OK", [])
        return [b""]

    def self_named(environ, start_response):
        start_response("200 OK", [("X-View-Name", "orders.list")])
        return [b""]

    with serve(TaliskerMiddleware(named)) as a, serve(TaliskerMiddleware(self_named)) as b:
        assert requests.get(a).headers["X-View-Name"] == "users.show"
        assert requests.get(b).headers["X-View-Name"] == "orders.list"
    sent(statsd, at_least=2)
    assert statsd.total("talisker.wsgi.requests", view="users.show") == 1
    assert statsd.total("talisker.wsgi.requests", view="orders.list") == 1


def test_uninstalled_the_middleware_passes_through(install_agent):
    install_agent()
    agent.uninstall()
    app = Recorder()
    with serve(TaliskerMiddleware(app)) as url:
        response = requests.get(url, headers={"X-Request-Id": "abc"})
    assert "X-Request-Id" not in response.headers
    assert app.seen["request_id"] is None


# -- Flask -------------------------------------------------------------------------


def flask_app() -> flask.Flask:
    app = flask.Flask("demo")

    @app.route("/users/<int:user_id>")
    def show_user(user_id: int):
        request = current_request()
        return {
            "id": user_id,
            "request_id": context.current().request_id,
            "view": request and request.view,
        }

    @app.route("/fail")
    def fail():
        raise RuntimeError("view failed")

    @app.route("/timeout")
    @agent.request_timeout(timeout_ms=30000)
    def with_timeout():
        return str(agent.deadline_timeout())

    return app


def test_flask_is_instrumented_without_code_changes(install_agent, statsd):
    install_agent()
    with serve(flask_app()) as url:
        response = requests.get(url + "/users/7", headers={"X-Request-Id": "flask-1"})
        failed = requests.get(url + "/fail")
        timeout = float(requests.get(url + "/timeout").text)
    assert response.json()["request_id"] == "flask-1"
    assert response.headers["X-Request-Id"] == "flask-1"
    assert response.headers["X-View-Name"] == "show_user"
    assert failed.status_code == 500
    assert 20 < timeout <= 30
    sent(statsd, at_least=3)
    assert statsd.total("talisker.wsgi.requests", view="show_user", status="200") == 1
    assert statsd.total("talisker.wsgi.errors", view="fail", status="500") == 1


def test_current_request_is_the_request_served_in_every_scope_nested_in_a_view(
    install_agent, statsd
):
    """The request scope carries the request: scopes pushed inside the view keep it."""
    install_agent()
    app = flask.Flask("nested")
    seen = {}

    @app.route("/nested")
    @agent.request_timeout(timeout_ms=20000, soft_timeout_ms=60000)
    def nested():
        seen["view"] = current_request()
        with agent.deadline(10):
            seen["deadline"] = current_request()
            with agent.metric_names(view="inner", peer="peer"):
                seen["metric_names"] = current_request()
                with agent.priority("high"), agent.suppress():
                    seen["priority"] = current_request()
                with agent.request_context(request_id="inner-id", deadline=5):
                    seen["request_context"] = current_request()
                    seen["inner_id"] = context.current().request_id
        with agent.deadline(None):
            seen["no_deadline"] = current_request()
        seen["after"] = current_request()
        return "ok"

    with serve(app) as url:
        response = requests.get(url + "/nested", headers={"X-Request-Id": "nested-1"})
    assert response.status_code == 200
    request = seen["view"]
    assert request is not None and request.request_id == "nested-1"
    assert request.soft_timeout == 60.0  # request_timeout found the request
    for where in ("deadline", "metric_names", "priority", "request_context", "no_deadline"):
        assert seen[where] is request, where
    assert seen["after"] is request
    assert seen["inner_id"] == "inner-id"  # request_context's own id, the same request
    assert request.view == "nested" and request.finished
    assert current_request() is None


def test_current_request_is_none_outside_a_request_and_after_it(install_agent):
    install_agent()
    seen = []

    def app(environ, start_response):
        seen.append(current_request())
        start_response("200 OK", [])
        return [b"ok"]

    assert current_request() is None
    with agent.request_context(request_id="script"), agent.deadline(5):
        assert current_request() is None  # a scope that no server set up carries no request
    body = TaliskerMiddleware(app)({"REQUEST_METHOD": "GET"}, lambda *a: None)
    assert list(body) == [b"ok"]
    body.close()
    assert seen[0] is not None and seen[0].request_id
    assert current_request() is None
    assert context.current().request_id is None


def test_a_flask_request_no_route_matched_has_no_view(install_agent, statsd):
    install_agent()
    with serve(flask_app()) as url:
        missing = requests.get(url + "/missing", headers={"X-Request-Id": "lost-1"})
        wrong_method = requests.post(url + "/fail")
    assert missing.status_code == 404
    assert missing.headers["X-Request-Id"] == "lost-1"
    assert "X-View-Name" not in missing.headers
    assert wrong_method.status_code == 405
    sent(statsd, at_least=2)
    assert statsd.total("talisker.wsgi.requests", view="unknown", status="404") == 1
    assert statsd.total("talisker.wsgi.requests", view="unknown", status="405") == 1


def test_flask_wrapped_by_hand_is_counted_once(install_agent, statsd):
    install_agent()
    app = flask_app()
    app.wsgi_app = TaliskerMiddleware(app.wsgi_app)
    with serve(app) as url:
        response = requests.get(url + "/users/1")
    assert response.headers["X-View-Name"] == "show_user"
    sent(statsd)
    time.sleep(0.2)
    assert statsd.total("talisker.wsgi.requests") == 1
    assert statsd.total("talisker.wsgi.requests", view="show_user") == 1


def counted(statsd, n, **tags):
    sent(statsd, at_least=n)
    return statsd.total("talisker.wsgi.requests", **tags)


def test_an_application_keeps_its_own_bound_wrapper_until_the_agent_is_uninstalled(
    install_agent, statsd
):
    from agent import registry

    install_agent()
    app = flask_app()
    assert "wsgi_app" not in vars(app)
    with serve(app) as url:
        first = requests.get(url + "/users/1", headers={"X-Request-Id": "bound-1"})
        bound = vars(app)["wsgi_app"]  # the first request gave the app its own
        second = requests.get(url + "/users/2", headers={"X-Request-Id": "bound-2"})
        assert vars(app)["wsgi_app"] is bound
        # partial(serve, app's bound method): no wrapt call, and it shows the method
        assert isinstance(bound, registry._BoundCall)
        original = vars(flask.Flask)["wsgi_app"].__wrapped__
        assert bound.__self__ is app
        assert bound.__func__ is original
        assert bound.__wrapped__.__func__ is original
        assert bound.__name__ == "wsgi_app" and bound.__qualname__ == "Flask.wsgi_app"
        assert bound.__doc__ == original.__doc__
        assert repr(bound) == repr(MethodType(original, app))
        assert inspect.signature(bound) == inspect.signature(MethodType(original, app))
        assert [first.headers["X-Request-Id"], second.headers["X-Request-Id"]] == [
            "bound-1",
            "bound-2",
        ]
        assert counted(statsd, 2, view="show_user") == 2
        agent.uninstall()
        assert "wsgi_app" not in vars(app)
        off = requests.get(url + "/users/3")
        assert off.json()["id"] == 3 and "X-Request-Id" not in off.headers
        install_agent()
        again = requests.get(url + "/users/4", headers={"X-Request-Id": "bound-4"})
        assert again.headers["X-Request-Id"] == "bound-4"
        assert vars(app)["wsgi_app"] is not bound
    assert counted(statsd, 3, view="show_user") == 3


def _refusals(app):
    """What each call of ``app.wsgi_app`` that does not fit its parameters raises."""
    calls = [(({},), {}), (({}, None, None), {}), (({}, None), {"x": 1}), (({},), {"environ": {}})]
    refused = []
    for args, kwargs in calls:
        with pytest.raises(TypeError) as caught:
            app.wsgi_app(*args, **kwargs)
        refused.append(str(caught.value))
    return refused


def test_a_bound_application_refuses_a_call_that_does_not_fit_as_flask_would(install_agent, statsd):
    plain = _refusals(flask_app())
    assert plain[0] == "Flask.wsgi_app() missing 1 required positional argument: 'start_response'"
    install_agent()
    app = flask_app()
    with serve(app) as url:
        requests.get(url + "/users/1")
    assert "wsgi_app" in vars(app)  # bound: partial's C code checks the call
    assert _refusals(app) == plain
    # and keywords that fit are served, as the original takes them
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/users/5",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    started = []
    body = app.wsgi_app(environ=environ, start_response=lambda s, h, e=None: started.append(h))
    try:
        assert b"".join(body)
    finally:
        body.close()
    assert ("X-View-Name", "show_user") in started[0]


class _OwnWsgiApp(flask.Flask):
    """A subclass whose override must run on every request; unhashable, too."""

    __hash__ = None  # type: ignore[assignment]
    calls = 0

    def __eq__(self, other):
        return False

    def wsgi_app(self, environ, start_response):
        type(self).calls += 1
        return super().wsgi_app(environ, start_response)


def test_a_subclass_override_of_wsgi_app_still_runs_on_every_request(install_agent, statsd):
    install_agent()
    app = _OwnWsgiApp("own")
    app.route("/")(lambda: "ok")
    with serve(app) as url:
        for _ in range(3):
            assert requests.get(url).headers["X-View-Name"] == "<lambda>"
    assert _OwnWsgiApp.calls == 3
    assert "wsgi_app" not in vars(app)
    assert counted(statsd, 3) == 3


class _UnhashableApp(flask.Flask):
    """No override of wsgi_app, but no hash and an equality that never holds."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other):
        return False


def test_unhashable_applications_are_bound_and_unbound_each_on_its_own(install_agent, statsd):
    from agent import registry

    install_agent()
    apps = [_UnhashableApp("one"), _UnhashableApp("two")]
    for app in apps:
        app.route("/")(lambda: "ok")
    with serve(apps[0]) as one, serve(apps[1]) as two:
        for url in (one, two, one):
            assert requests.get(url, headers={"X-Request-Id": "u"}).headers["X-Request-Id"] == "u"
        record = registry._applied[("flask.app", "Flask.wsgi_app")]
        assert all(vars(app)["wsgi_app"].__self__ is app for app in apps)
        assert {id(app) for app in apps} <= set(record.instances)
        assert counted(statsd, 3) == 3  # each recorded once its response was sent
        agent.uninstall()
        assert all("wsgi_app" not in vars(app) for app in apps)
        assert "X-Request-Id" not in requests.get(two).headers


def test_a_middleware_set_by_hand_before_the_first_request_is_kept(install_agent, statsd):
    install_agent()
    app = flask_app()
    calls = []
    inner = app.wsgi_app

    def middleware(environ, start_response):
        calls.append(environ["PATH_INFO"])
        return inner(environ, start_response)

    app.wsgi_app = middleware
    with serve(app) as url:
        requests.get(url + "/users/1")
        requests.get(url + "/users/2")
    assert vars(app)["wsgi_app"] is middleware
    assert calls == ["/users/1", "/users/2"]
    assert counted(statsd, 2, view="show_user") == 2


def test_an_application_no_longer_referenced_is_collected(install_agent, statsd):
    import gc
    import weakref

    from agent import registry

    install_agent()
    app = flask_app()
    with serve(app) as url:
        requests.get(url + "/users/1")
    assert "wsgi_app" in vars(app)
    record = registry._applied[("flask.app", "Flask.wsgi_app")]
    assert id(app) in record.instances
    gone = weakref.ref(app)
    del app
    gc.collect()
    assert gone() is None
    assert gone not in record.instances.values()


# -- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-21T05:12:33.123Z", 1795238753.123),
        ("2026-11-21T05:12:33Z", 1795238753.0),
        ("2026-11-21T07:12:33.5+02:00", 1795238753.5),
        ("2026-11-21T00:12:33-0500", 1795238753.0),
        ("2026-11-21 05:12:33z", 1795238753.0),
    ],
)
def test_parse_deadline(value, expected):
    assert parse_deadline(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", ["", "2026-11-21T05:12:33", "2026-11-21", "now", "2026-02-30T00:00:00Z x"]
)
def test_parse_deadline_rejects(value):
    assert parse_deadline(value) is None


def test_closing_a_response_twice_is_harmless(install_agent, statsd):
    install_agent()
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_X_REQUEST_ID": "twice"}
    body = TaliskerMiddleware(Recorder())(environ, lambda *a: None)
    assert context.current().request_id == "twice"
    assert list(body) == [b"ok"]
    body.close()
    body.close()
    assert context.current().request_id is None
    sent(statsd)
    assert statsd.total("talisker.wsgi.requests") == 1


@pytest.mark.parametrize("framework", ["wsgi", "flask"])
def test_a_file_response_reaches_the_server_in_its_own_file_wrapper(
    install_agent, statsd, monkeypatch, tmp_path, framework
):
    """The server sends a wsgi.file_wrapper body with sendfile(): it must still get one."""
    import wsgiref.simple_server

    install_agent()
    path = tmp_path / "big.bin"
    path.write_bytes(b"f" * 100_000)
    used_sendfile = []

    def sendfile(handler):  # what a server with sendfile() does, through the same check
        used_sendfile.append(handler.result_is_file())
        handler.send_headers()
        with open(path, "rb") as f:
            handler._write(f.read())
        return True

    monkeypatch.setattr(wsgiref.simple_server.ServerHandler, "sendfile", sendfile)
    if framework == "flask":
        app = flask.Flask("files")

        @app.route("/file")
        def download():
            return flask.send_file(path)
    else:

        def app(environ, start_response):
            start_response("200 OK", [("X-View-Name", "download")])
            return environ["wsgi.file_wrapper"](open(path, "rb"))

        app = TaliskerMiddleware(app)
    with serve(app) as url:
        response = requests.get(url + "/file", headers={"X-Request-Id": "file-1"})
    assert response.content == path.read_bytes()
    assert response.headers["X-Request-Id"] == "file-1"
    assert used_sendfile == [True]
    sent(statsd)
    assert statsd.total("talisker.wsgi.requests", view="download", status="200") == 1
    assert context.current().request_id is None


def test_a_client_that_goes_away_is_recorded_as_499_not_an_error(install_agent, statsd):
    """nginx's convention (and aio-request's): the response was never delivered."""
    install_agent()
    chunks_sent = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            for i in range(10_000):  # far more than the socket buffers hold
                chunks_sent.append(i)
                yield b"x" * 65536

        return body()

    import socket
    import struct

    with serve(TaliskerMiddleware(app)) as url:
        port = int(url.rsplit(":", 1)[1])
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(12).startswith(b"HTTP/1.")
        # Close with a reset: the server's next writes fail.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        sent(statsd)
    assert len(chunks_sent) < 10_000
    assert statsd.total("talisker.wsgi.requests", status="499") == 1
    assert statsd.total("talisker.wsgi.requests", status="200") == 0
    assert statsd.total("talisker.wsgi.errors") == 0


def test_a_far_future_incoming_deadline_behaves_as_none(install_agent, http_server):
    """Anyone can send one: it must not break outgoing calls (it made them overflow)."""
    install_agent()
    outgoing = []

    def app(environ, start_response):
        scope = context.current()
        outgoing.append(scope.deadline)
        requests.get(http_server.url + "/a", timeout=5)
        urllib3.PoolManager().request("GET", http_server.url + "/b")
        start_response("200 OK", [])
        return [b"ok"]

    with serve(TaliskerMiddleware(app)) as url:
        for headers in (
            {"X-Request-Deadline": "9999-12-31T23:59:59.999Z"},
            {"X-Request-Timeout": "3000000"},  # about 35 days: beyond statement_timeout's range
            {"X-Request-Timeout": "1e300"},
        ):
            assert requests.get(url, headers=headers).status_code == 200
    assert outgoing == [None, None, None]
    assert all(r.header("X-Request-Deadline") is None for r in http_server.requests)


def test_the_request_record_has_every_field_set(install_agent):
    """The WSGI record is made without an __init__: no field of it may be left unset."""
    install_agent()
    seen = []

    def app(environ, start_response):
        seen.append(current_request())
        start_response("200 OK", [])
        return [b"ok"]

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    body = TaliskerMiddleware(app)(environ, lambda *a: None)
    (request,) = seen
    slots = [name for cls in type(request).__mro__ for name in getattr(cls, "__slots__", ())]
    assert "request_id" in slots and "start" in slots
    for name in slots:
        getattr(request, name)  # AttributeError if it was never set
    assert list(body) == [b"ok"]
    body.close()


def test_start_response_passes_exc_info_on(install_agent, statsd):
    """PEP 3333: an application may start again with exc_info before anything is sent."""
    import sys

    install_agent()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("late failure")
        except RuntimeError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"failed"]

    def strict(environ, start_response):
        def checked(status, headers, *exc_info):
            assert len(exc_info) == (1 if status.startswith("500") else 0)
            return start_response(status, headers, *exc_info)

        return TaliskerMiddleware(app)(environ, checked)

    with serve(strict) as url:
        response = requests.get(url, headers={"X-Request-Id": "again"})
    assert response.status_code == 500
    assert response.text == "failed"
    assert response.headers["X-Request-Id"] == "again"
    sent(statsd)
    assert statsd.total("talisker.wsgi.errors", status="500") == 1


def test_a_flush_of_one_view_method_and_status_is_one_group_with_its_errors_counted():
    from agent import metrics
    from agent.http import server

    get = "".join(["G", "ET"])  # equal to "GET", another object (as each request's is)
    payloads = [
        ("a", "GET", 200, 1.0, 0.1, False),
        ("a", get, 200, 2.0, 0.2, True),  # failed while its body was sent
        ("a", "GET", 200, 3.0, 0.3, False),
    ]
    tags = (("view", "a"), ("method", "GET"), ("status", 200))
    assert server.expand_requests(payloads) == [
        (metrics.COUNT, "wsgi.requests", 3, tags),
        (metrics.TIMING, "wsgi.latency", [1.0, 2.0, 3.0], tags),
        (metrics.TIMING, "wsgi.cpu", [0.1, 0.2, 0.3], tags),
        (metrics.COUNT, "wsgi.errors", 1, tags),
    ]
    # The last request alone differs: all of them go through the grouping.
    last = ("a", "GET", 201, 4.0, 0.4, False)
    records = server.expand_requests([*payloads, last])
    assert [r[2] for r in records if r[1] == "wsgi.requests"] == [3, 1]
    assert server.expand_requests([]) == []
    with pytest.raises(ValueError):  # the worker then expands them one by one
        server.expand_requests([*payloads, ("a", "GET", 200, 4.0)])


def test_the_requests_of_a_flush_are_grouped_by_view_method_and_status_in_any_order():
    """Interleaved groups, equal but not identical strings: each request in its own group."""
    from agent import metrics
    from agent.http import server

    get = "".join(["G", "ET"])  # equal to "GET", another object (as each request's is)
    payloads = [
        ("a", "GET", 200, 1.0, 0.1, False),
        ("a", get, 200, 2.0, 0.2, False),
        ("b", "GET", 500, 3.0, 0.3, True),
        ("a", "GET", 200, 4.0, 0.4, False),
        ("a", "POST", 200, 5.0, 0.5, False),
        ("b", get, 500, 6.0, 0.6, True),
        ("a", "GET", 404, 7.0, 0.7, False),
    ]
    records = server.expand_requests(payloads)

    def tags(view, method, status):
        return (("view", view), ("method", method), ("status", status))

    a, b = tags("a", "GET", 200), tags("b", "GET", 500)
    post, missing = tags("a", "POST", 200), tags("a", "GET", 404)
    assert records == [
        (metrics.COUNT, "wsgi.requests", 3, a),
        (metrics.TIMING, "wsgi.latency", [1.0, 2.0, 4.0], a),
        (metrics.TIMING, "wsgi.cpu", [0.1, 0.2, 0.4], a),
        (metrics.COUNT, "wsgi.requests", 2, b),
        (metrics.TIMING, "wsgi.latency", [3.0, 6.0], b),
        (metrics.TIMING, "wsgi.cpu", [0.3, 0.6], b),
        (metrics.COUNT, "wsgi.errors", 2, b),
        (metrics.COUNT, "wsgi.requests", 1, post),
        (metrics.TIMING, "wsgi.latency", [5.0], post),
        (metrics.TIMING, "wsgi.cpu", [0.5], post),
        (metrics.COUNT, "wsgi.requests", 1, missing),
        (metrics.TIMING, "wsgi.latency", [7.0], missing),
        (metrics.TIMING, "wsgi.cpu", [0.7], missing),
    ]
    assert not any(name.endswith(".cpu") for _, name, _, _ in server.expand_asgi_requests(payloads))
