"""The patch registry, in subprocesses, for every import order (ddtrace's patch matrix)."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest

from agent import registry
from tests.support.proc import check_python, run_python

# Where each instrumentation's patches live, and how to read the current object.
TARGETS = {
    "urllib3": [
        ("urllib3.connectionpool", "HTTPConnectionPool", "urlopen"),
        ("urllib3.poolmanager", "PoolManager", "urlopen"),
        ("urllib3.util.retry", "Retry", "sleep"),
    ],
    "requests": [
        ("requests.sessions", "Session", "send"),
        ("requests.sessions", "Session", "request"),
    ],
    "psycopg2": [("psycopg2", None, "connect")],
    "flask": [("flask.app", "Flask", "wsgi_app")],
    "httpx": [
        ("httpx", "Client", "send"),
        ("httpx", "AsyncClient", "send"),
        ("httpx", "HTTPTransport", "handle_request"),
        ("httpx", "AsyncHTTPTransport", "handle_async_request"),
    ],
    "aiohttp": [
        ("aiohttp.client", "ClientSession", "_request"),
        ("aiohttp.client_reqrep", "ClientRequest", "update_headers"),
        ("aiohttp.web_app", "Application", "_handle"),
    ],
    "asyncio": [
        ("asyncio.base_events", "BaseEventLoop", "run_in_executor"),
        ("uvloop", "Loop", "run_in_executor"),  # inherited from a Cython type: set on Loop
    ],
    "starlette": [("starlette.applications", "Starlette", "__call__")],
}

# A snippet that prints, as JSON, for each patch point: whether it is ours and
# whether it is the original object (by identity, compared with `originals`).
STATE = """
import json, sys
def current():
    out = {}
    for name, points in TARGETS.items():
        for module, owner, attr in points:
            mod = sys.modules.get(module)
            if mod is None:
                continue
            holder = mod if owner is None else getattr(mod, owner)
            own = vars(holder)
            # An inherited method (uvloop's) is the base's while it is not ours.
            out[f"{module}:{owner}.{attr}"] = own[attr] if attr in own else getattr(holder, attr)
    return out
def report(originals):
    from agent import registry
    state = {}
    for key, obj in current().items():
        state[key] = {
            "ours": registry.is_ours(obj),
            # A point imported after `originals` was taken (wrapt imports asyncio):
            # original means not ours.
            "original": obj is originals[key] if key in originals else not registry.is_ours(obj),
            "layers": 1 + registry.is_ours(getattr(obj, "__wrapped__", None)),
        }
    return state
"""


ENV = {"TALISKER_ENABLED": "true", "TALISKER_METRICS_ENABLED": "false"}


def program(body: str) -> str:
    return f"TARGETS = {TARGETS!r}\n{STATE}\n{textwrap.dedent(body)}"


def run(body: str, env: dict[str, str] | None = None) -> dict:
    out = check_python(program(body), {**ENV, **(env or {})})
    return json.loads(out.strip().splitlines()[-1])


def all_points(state: dict, **expected: bool) -> None:
    assert state, "nothing was imported"
    for key, value in state.items():
        for field, want in expected.items():
            assert value[field] == want, (key, value)


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_imported_before_the_agent(target):
    state = run(
        f"""
        import {", ".join(sorted({m for m, _, _ in TARGETS[target]}))}
        originals = current()
        import agent
        patched = report(originals)
        agent.uninstall()
        restored = report(originals)
        agent.install()
        again = report(originals)
        print(json.dumps([patched, restored, again]))
        """
    )
    patched, restored, again = state
    all_points(patched, ours=True, original=False, layers=1)
    all_points(restored, ours=False, original=True)
    all_points(again, ours=True, original=False, layers=1)


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_imported_after_the_agent(target):
    state = run(
        f"""
        import agent
        import {", ".join(sorted({m for m, _, _ in TARGETS[target]}))}
        patched = report({{}})
        print(json.dumps(patched))
        """
    )
    all_points(state, ours=True, layers=1)
    expected = {f"{m}:{o}.{a}" for m, o, a in TARGETS[target]}
    assert expected <= set(state)


@pytest.mark.parametrize("target", list(TARGETS))
def test_an_instrumentation_imported_before_its_target_still_applies(target):
    # Its body imports the target, whose post-import hook then finds the instrumentation
    # half-run: it is applied once its body is in (it used to fail to load, logged).
    proc = run_python(
        program(
            f"""
            import agent
            import agent.instrumentation.{target}
            import {", ".join(sorted({m for m, _, _ in TARGETS[target]}))}
            print(json.dumps(report({{}})))
            """
        ),
        ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "failed to load" not in proc.stderr
    all_points(json.loads(proc.stdout.strip().splitlines()[-1]), ours=True, layers=1)


# The two threads of an import race: thread A's import of `name` is held as it creates
# the module (where it has that module's import lock and no other: the finders run
# under Python's global import lock, which would hold thread B up too) until
# `until(B)` gives a state, within 30 s. Then both threads are joined, and the program
# prints whether each is still alive, the state A was let go on, and the patch points.
RACE = """
import threading, time

def race(name, until, a_imports, b_imports):
    holding = threading.Event()
    waited = []
    a = threading.Thread(target=__import__, args=(a_imports,), name="A", daemon=True)
    b = threading.Thread(target=__import__, args=(b_imports,), name="B", daemon=True)

    class HoldingLoader:
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            holding.set()
            for _ in range(3000):  # within 30 s, or A goes on
                state = until(b)
                if state is not None:
                    waited.append(state)
                    break
                time.sleep(0.01)
            return None

        def exec_module(self, module):
            module.__loader__ = module.__spec__.loader = self.loader
            self.loader.exec_module(module)

    class Hold:  # after the agent's finder, which wraps what this finds
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name or threading.current_thread().name != "A":
                return None
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(fullname, path)
            spec.loader = HoldingLoader(spec.loader)
            return spec

    sys.meta_path.insert(1, Hold())
    a.start()
    holding.wait(30)
    b.start()
    a.join(40)
    b.join(40)
    print(json.dumps([a.is_alive(), b.is_alive(), waited, report({})]))
"""


def run_race(body: str) -> tuple[bool, bool, list, dict]:
    proc = run_python(
        program(RACE + textwrap.dedent(body)),
        ENV,
        timeout=110,  # under pytest's own limit, so that a deadlock reads as one
    )
    assert proc.returncode == 0, proc.stderr
    assert "failed" not in proc.stderr, proc.stderr
    a_alive, b_alive, waited, state = json.loads(proc.stdout.strip().splitlines()[-1])
    return a_alive, b_alive, waited, state


def test_a_thread_importing_an_instrumentation_while_another_imports_its_target_does_not_deadlock():
    # Thread A imports agent.instrumentation.urllib3 itself; it is held before the module
    # is in sys.modules until thread B, importing urllib3, waits for that module's lock
    # from its post-import hook. B used to wait there holding the registry's lock, which
    # A's own hook then waited for: a deadlock that Python's detection of circular module
    # locks cannot see.
    a_alive, b_alive, waited, state = run_race(
        """
        import importlib._bootstrap as bootstrap
        import agent

        NAME = "agent.instrumentation.urllib3"

        def b_waits(b):
            ref = bootstrap._module_locks.get(NAME)
            lock = ref() if ref is not None else None
            return True if lock is not None and lock.waiters else None

        race(NAME, b_waits, NAME, "urllib3")
        """
    )
    assert waited == [True], "B never waited for A's import: the test did not set up the race"
    assert not a_alive and not b_alive, "deadlocked"
    points = {f"{m}:{o}.{a}" for m, o, a in TARGETS["urllib3"]}
    assert points <= set(state)
    all_points({key: state[key] for key in points}, ours=True, layers=1)


def test_a_thread_importing_asyncio_while_another_imports_wrapt_does_not_deadlock():
    # Thread A imports urllib3, the first target: its hook imports wrapt, which imports
    # asyncio. Thread B is importing asyncio itself, and asyncio.base_events' hook is
    # running, with asyncio's import lock held. A is held as it creates wrapt's module
    # until B has finished or waits for the registry's lock: A used to import wrapt
    # holding that lock, then wait for B's asyncio while B waited for the lock.
    a_alive, b_alive, waited, state = run_race(
        """
        import inspect
        import agent
        from agent import registry

        lines, first = inspect.getsourcelines(registry._on_import)
        LOCKED = [first + i for i, line in enumerate(lines) if "with _lock:" in line]
        def b_blocked_or_done(b):
            if b.ident is None:
                return None  # not started yet
            frame = sys._current_frames().get(b.ident)
            if frame is None:
                return "done"
            if frame.f_code is registry._on_import.__code__ and frame.f_lineno in LOCKED:
                return "blocked"
            return None

        assert "wrapt" not in sys.modules and "asyncio" not in sys.modules
        race("wrapt", b_blocked_or_done, "urllib3", "asyncio")
        """
    )
    assert waited, "A was never held: the test did not set up the race"
    assert not a_alive and not b_alive, f"deadlocked (B {waited[0]} while A imported wrapt)"
    points = {f"{m}:{o}.{a}" for t in ("urllib3", "asyncio") for m, o, a in TARGETS[t]}
    points.discard("uvloop:Loop.run_in_executor")
    assert points <= set(state)
    all_points({key: state[key] for key in points}, ours=True, layers=1)


def test_install_twice_wraps_once_and_uninstall_restores_originals():
    state = run(
        """
import agent
agent.uninstall()
import urllib3, requests, psycopg2, flask, httpx, aiohttp, asyncio
import starlette.applications, aiohttp.web
originals = current()
agent.install()
agent.install()
twice = report(originals)
agent.uninstall()
agent.uninstall()
restored = report(originals)
print(json.dumps([twice, restored]))
"""
    )
    twice, restored = state
    all_points(twice, ours=True, layers=1)
    all_points(restored, ours=False, original=True)


# Kept in when requests' instrumentation is off: it only pops the per-call name keywords.
API_POINT = "requests.sessions:Session.request"


def test_disabled_by_the_master_switch():
    state = run(
        "import agent, urllib3, requests\nprint(json.dumps(report({})))",
        {"TALISKER_ENABLED": "false"},
    )
    assert state.pop(API_POINT)["ours"] is True
    all_points(state, ours=False)


def test_one_instrumentation_disabled():
    state = run(
        "import agent, urllib3, requests\nprint(json.dumps(report({})))",
        {"TALISKER_DISABLED_INSTRUMENTATIONS": "requests"},
    )
    assert state["requests.sessions:Session.send"]["ours"] is False
    assert state[API_POINT]["ours"] is True
    assert state["urllib3.connectionpool:HTTPConnectionPool.urlopen"]["ours"] is True


@pytest.mark.parametrize(
    "env",
    [
        {"TALISKER_ENABLED": "false"},
        {"TALISKER_DISABLED_INSTRUMENTATIONS": "requests"},
        {"TALISKER_DISABLED_INSTRUMENTATIONS": "all"},
    ],
)
@pytest.mark.parametrize("order", ["agent first", "requests first"])
def test_the_off_switches_never_break_code_using_the_per_call_name_keywords(env, order):
    """An operator's off switch must not make the documented keywords a TypeError."""
    imports = "import agent, requests" if order == "agent first" else "import requests, agent"
    out = check_python(
        f"""
        {imports}
        from tests.support.http import RecordingServer
        server = RecordingServer()
        r = requests.get(server.url, metric_api_name="users.get", metric_host_name="users-api")
        s = requests.Session().post(server.url, data=b"x", metric_api_name="users.post")
        print(r.status_code, s.status_code, len(server.requests))
        """,
        {**ENV, **env},
    )
    assert out.split() == ["200", "200", "2"]


def test_install_of_a_disabled_config_keeps_the_keywords_working():
    out = check_python(
        """
        import agent, requests
        from agent import config
        from tests.support.http import RecordingServer
        server = RecordingServer()
        assert agent.install(config.load({"TALISKER_ENABLED": "false"})) is False
        print(requests.get(server.url, metric_api_name="x").status_code)
        """,
        ENV,
    )
    assert out.split() == ["200"]


def test_a_failing_patch_is_logged_once_and_the_others_go_in():
    proc = run_python(
        program(
            """
            import agent
            import urllib3
            from agent.instrumentation import Patch
            import agent.instrumentation.urllib3 as inst
            point = "HTTPConnectionPool.no_such_method"
            bad = Patch("urllib3.connectionpool", point, inst.urlopen_wrapper)
            inst.PATCHES = (bad, *inst.PATCHES)
            agent.uninstall()
            agent.install()
            print(json.dumps(report({})))
            """
        ),
        ENV,
    )
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.splitlines()[-1])
    all_points(state, ours=True)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("agent:")]
    assert len(warnings) == 1 and "no_such_method" in warnings[0]


def test_the_registry_table_matches_what_each_instrumentation_patches():
    for name, modules in registry.TARGETS.items():
        instrumentation = importlib.import_module(f"agent.instrumentation.{name}")
        # Every trigger is patched; what else is patched is imported by a trigger.
        patched = {p.module for p in instrumentation.PATCHES}
        assert set(modules) <= patched, name
        for extra in patched - set(modules):
            assert extra.split(".")[0] == name, (name, extra)


def test_importing_the_agent_with_targets_loaded_never_imports_wrapt_eagerly():
    out = check_python(
        "import sys, agent\nprint('wrapt' in sys.modules)",
        {"TALISKER_ENABLED": "true"},
    )
    assert out.strip() == "False"


def test_a_failing_post_import_hook_never_fails_the_import():
    proc = run_python(
        """
        import agent
        from agent import registry
        def broken(module):
            raise RuntimeError("agent bug")
        registry._finder.hook = broken
        import urllib3
        print("imported", urllib3.__name__)
        """,
        ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported urllib3"
    assert "agent: post-import hook failed" in proc.stderr


def test_a_library_version_outside_the_supported_range_is_left_alone_with_one_warning():
    proc = run_python(
        program(
            """
            import agent
            agent.uninstall()
            import urllib3, requests
            import agent.instrumentation.urllib3 as inst
            inst.SUPPORTED = ((0, 1), (0, 2))  # the installed urllib3 is outside it
            agent.install()
            print(json.dumps(report({})))
            """
        ),
        ENV,
    )
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.splitlines()[-1])
    assert not any(v["ours"] for k, v in state.items() if k.startswith("urllib3"))
    assert all(v["ours"] for k, v in state.items() if k.startswith("requests"))  # the control
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("agent:")]
    assert len(warnings) == 1, proc.stderr
    assert "urllib3 2." in warnings[0] or "urllib3 1." in warnings[0]
    assert ">=0.1,<0.2" in warnings[0] and "left uninstrumented" in warnings[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.9.13 (dt dec pq3 ext lo64)", (2, 9, 13)),
        ("3.1.3", (3, 1, 3)),
        ("2.0.0rc1", (2, 0, 0)),
        ("1.26", (1, 26)),
        ("garbage", ()),
    ],
)
def test_versions_are_read_as_their_leading_numbers(text, expected):
    from agent.instrumentation import supports, version_tuple

    assert version_tuple(text) == expected
    assert supports(((1, 26), (3,)), text) is (expected != () and (1, 26) <= expected < (3,))


def test_each_instrumentation_declares_the_versions_it_supports_and_the_installed_one_is_in():
    from agent.instrumentation import supports

    for name in registry.TARGETS:
        instrumentation = importlib.import_module(f"agent.instrumentation.{name}")
        assert supports(instrumentation.SUPPORTED, instrumentation.installed_version()), name


@pytest.mark.parametrize(
    ("bound_call", "kind"),
    [
        ("inst.serve", "_BoundCall"),  # Flask's: the same parameters after the first
        ("lambda method, env, start_response: inst.serve(method, env, start_response)", None),
        ("lambda method, environ, start_response=None: None", None),
        ("lambda method, *args: None", None),
        ("print", None),  # no code to copy: a builtin
    ],
)
def test_an_instance_is_bound_to_a_bound_call_only_if_it_takes_the_originals_parameters(
    bound_call, kind
):
    state = run(
        f"""
        import agent, flask
        from agent.instrumentation import Patch
        import agent.instrumentation.flask as inst
        patch = Patch("flask.app", "Flask.wsgi_app", inst.PATCHES[0].wrapper,
                      per_instance=True, bound_call={bound_call})
        inst.PATCHES = (patch,)
        agent.uninstall()
        agent.install()
        app = flask.Flask("x")
        app.route("/")(lambda: "ok")
        with app.test_client() as client:
            views = [client.get("/").headers.get("X-View-Name") for _ in range(2)]
        print(json.dumps({{"kind": type(vars(app)["wsgi_app"]).__name__, "views": views}}))
        """
    )
    # one that does not fit would refuse bad calls with its own message: wrapt instead
    assert state["kind"] == (kind or "AgentWrapper")
    assert state["views"] == ["<lambda>", "<lambda>"]


def test_a_bound_call_must_name_the_keyword_only_parameters_as_the_original():
    class Target:
        def method(self, a, *, key):
            return a

    def same(method, a, *, key):
        return method(a, key=key)

    def other(method, a, *, other):  # no defaults to tell them apart: the names must
        return method(a, key=other)

    copy = registry._named_like(same, Target.method)
    assert copy.__code__ is same.__code__ and copy.__qualname__ == Target.method.__qualname__
    assert registry._named_like(other, Target.method) is None


@pytest.mark.parametrize(
    "direct, fits",
    [
        ("inst.direct_urlopen", True),
        ("lambda original: (lambda self, method, url, **kw: None)", False),  # other parameters
        # the same parameters, another default
        ("lambda original: setattr(f := inst.direct_urlopen(original), '__defaults__', "
         "(None,) * 12) or f", False),
        ("lambda original: None", False),  # the factory declines
        ("lambda original: 1 / 0", False),  # the factory fails: the patch still goes in
    ],
)  # fmt: skip
def test_a_direct_patch_is_used_only_if_it_takes_the_originals_parameters(direct, fits):
    state = run(
        f"""
        import threading, urllib3
        from http.server import BaseHTTPRequestHandler, HTTPServer
        import agent
        from agent.instrumentation import Patch
        import agent.instrumentation.urllib3 as inst

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = (self.headers.get("X-Request-Id") or "").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *args):
                pass

        server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        first = inst.PATCHES[0]
        patch = Patch(first.module, first.path, first.wrapper, direct={direct})
        inst.PATCHES = (patch, *inst.PATCHES[1:])
        agent.uninstall()
        agent.install()
        from urllib3.connectionpool import HTTPConnectionPool
        pool = HTTPConnectionPool("127.0.0.1", server.server_port)
        with agent.request_context(request_id="direct-1"):
            sent = pool.urlopen("GET", "/").data.decode()
        kind = type(vars(HTTPConnectionPool)["urlopen"]).__name__
        print(json.dumps({{"kind": kind, "sent": sent, "v2": urllib3.__version__[0] == "2"}}))
        """
    )
    # one that does not fit, or urllib3 1.26's other parameters: wrapt's wrapper instead
    assert state["kind"] == ("function" if fits and state["v2"] else "AgentWrapper")
    assert state["sent"] == "direct-1"
