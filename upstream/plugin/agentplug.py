"""pytest plugin of ``nox -s upstream``: checks the mode, records every test.

Loaded with ``-p agentplug`` into an upstream library's own test suite. The
harness (``upstream/harness.py``) sets:

``UPSTREAM_MODE``
    ``plain``: the agent must not be in the process at all. ``agent``: the
    agent must be active (the suite runs under ``talisker-run``) and its
    wrappers in place. ``deadline``: as ``agent``, and every phase of every test
    (setup, call, teardown) runs inside ``agent.request_context(deadline=30)``.
``UPSTREAM_TARGETS``
    Comma-separated instrumentation names whose wrappers must be in place
    (``urllib3,requests``); plain mode checks that none of them is.
``UPSTREAM_DESELECT``
    Optional: a file of node ids (one a line) to leave out, as ``--deselect`` would.
``UPSTREAM_RESULTS``
    A file to append one JSON line per finished test to (and a first line
    about the session, and a last one when it ends), so a run that dies half
    way still leaves what it ran.

The check runs after collection (the suite has imported its library by then)
and again at the end of the session: a silent no-op cannot pass.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest

MODE = os.environ.get("UPSTREAM_MODE", "plain")
TARGETS = [t for t in os.environ.get("UPSTREAM_TARGETS", "").split(",") if t]
RESULTS = os.environ.get("UPSTREAM_RESULTS")
DEADLINE_SECONDS = 30.0
MESSAGE_LIMIT = 6000

#: instrumentation -> (module, dotted attribute) wrapped by the agent.
WRAPPED = {
    "urllib3": [
        ("urllib3.connectionpool", "HTTPConnectionPool.urlopen"),
        ("urllib3.poolmanager", "PoolManager.urlopen"),
    ],
    "requests": [
        ("requests.sessions", "Session.send"),
        ("requests.sessions", "Session.request"),
    ],
    "psycopg2": [("psycopg2", "connect")],
    "flask": [("flask.app", "Flask.wsgi_app")],
    "httpx": [
        ("httpx", "Client.send"),
        ("httpx", "AsyncClient.send"),
        ("httpx", "HTTPTransport.handle_request"),
        ("httpx", "AsyncHTTPTransport.handle_async_request"),
    ],
    "starlette": [("starlette.applications", "Starlette.__call__")],
    "aiohttp": [
        ("aiohttp.client", "ClientSession._request"),
        ("aiohttp.client_reqrep", "ClientRequest.update_headers"),
        ("aiohttp.web_app", "Application._handle"),
    ],
}


class _Recorder:
    def __init__(self, path: str | None) -> None:
        self.stream = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self.phases: dict[str, dict[str, Any]] = {}
        self.rootdir = ""

    def nodeid(self, nodeid: str) -> str:
        """The node id with the checkout's own path (in some parameters) as ``<rootdir>``.

        Each run has a copy of the sdist of its own: the same test has the same id in all.
        """
        return nodeid.replace(self.rootdir, "<rootdir>") if self.rootdir else nodeid

    def write(self, record: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()


_recorder = _Recorder(RESULTS)


def _lookup(module_name: str, path: str) -> Any:
    __import__(module_name)
    owner: Any = sys.modules[module_name]
    *parents, attr = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)


def _is_proxy(obj: Any) -> bool:
    """Whether ``obj`` is a wrapt proxy (``ObjectProxy``, ``FunctionWrapper``...) of any kind."""
    return any(cls.__name__ in ("ObjectProxy", "BaseObjectProxy") for cls in type(obj).__mro__)


def _check_wrappers(when: str) -> dict[str, str]:
    """Fail the session unless the mode's promise holds; return what was found."""
    found: dict[str, str] = {}
    problems: list[str] = []
    for target in TARGETS:
        for module_name, path in WRAPPED[target]:
            where = f"{module_name}:{path}"
            try:
                obj = _lookup(module_name, path)
            except Exception as exc:
                problems.append(f"{where} cannot be looked up: {exc!r}")
                continue
            kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
            found[where] = kind
            # the agent's direct patch (a plain function, urllib3 2.x's urlopen) carries
            # registry._DIRECT_MARK, spelled here: plain mode never imports the agent
            wrapped = _is_proxy(obj) or "__talisker_agent_direct__" in getattr(obj, "__dict__", {})
            if MODE == "plain":
                if wrapped:
                    problems.append(f"{where} is patched ({kind}) in plain mode")
                continue
            from agent import registry

            if not (wrapped and registry.is_ours(obj)):
                problems.append(f"{where} is not the agent's wrapper but {kind}")
    if problems:
        _recorder.write({"event": "check-failed", "when": when, "problems": problems})
        pytest.exit(f"upstream ({MODE}, {when}): " + "; ".join(problems), returncode=5)
    return found


def pytest_configure(config: pytest.Config) -> None:
    """The mode's first promise: the agent is absent (plain) or active (other modes)."""
    import faulthandler
    import signal

    _recorder.rootdir = str(config.rootpath)

    # The harness sends SIGUSR1 to a process that does not exit: every thread's stack.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if MODE == "plain":
        if "agent" in sys.modules:
            pytest.exit("upstream (plain): the agent is loaded in a plain run", returncode=5)
        active = False
    else:
        if "agent" not in sys.modules:
            pytest.exit(f"upstream ({MODE}): the agent was not loaded at start-up", returncode=5)
        from agent import config as agent_config
        from agent import registry

        active = registry.installed() and agent_config.current is not None
        if not active:
            pytest.exit(f"upstream ({MODE}): the agent is loaded but not installed", returncode=5)
    _recorder.write(
        {
            "event": "start",
            "mode": MODE,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "agent_active": active,
        }
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = os.environ.get("UPSTREAM_DESELECT")
    if not path:
        return
    with open(path, encoding="utf-8") as f:
        unwanted = {line.rstrip("\n") for line in f if line.strip()}
    kept = [item for item in items if _recorder.nodeid(item.nodeid) not in unwanted]
    if len(kept) != len(items):
        dropped = [i for i in items if _recorder.nodeid(i.nodeid) in unwanted]
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_collection_finish(session: pytest.Session) -> None:
    found = _check_wrappers("after collection")
    from importlib import metadata

    versions = {}
    for target in TARGETS:
        module = sys.modules.get(target)
        if module is not None:
            versions[target] = {
                "version": metadata.version(target),
                "file": getattr(module, "__file__", "?"),
            }
    _recorder.write(
        {
            "event": "collected",
            "count": len(session.items),
            "wrappers": found,
            "libraries": versions,
        }
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    found = _check_wrappers("at the end") if session.items else {}
    _recorder.write({"event": "finish", "exitstatus": int(exitstatus), "wrappers": found})


def pytest_unconfigure(config: pytest.Config) -> None:
    """The threads left running: if the process then does not exit, the harness says why."""
    import threading

    frames = sys._current_frames()
    threads: list[dict[str, Any]] = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.ident not in frames:
            continue
        stack = []
        frame: FrameType | None = frames[thread.ident]
        while frame is not None:
            code = frame.f_code
            name = getattr(code, "co_qualname", code.co_name)
            stack.append([code.co_filename, frame.f_lineno, name])
            frame = frame.f_back
        threads.append({"name": thread.name, "daemon": thread.daemon, "stack": stack})
    _recorder.write({"event": "exit", "threads": threads})
    if _recorder.stream is not None:
        _recorder.stream.close()
        _recorder.stream = None


def _deadline_scope() -> Any:
    import agent

    return agent.request_context(deadline=DEADLINE_SECONDS)


def _in_deadline() -> Generator[None, object, object]:
    if MODE != "deadline":
        return (yield)
    with _deadline_scope():
        import agent

        left = agent.deadline_timeout()
        if left is None or left > DEADLINE_SECONDS:
            pytest.exit(f"upstream (deadline): no deadline in the test ({left!r})", returncode=5)
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _in_deadline())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _in_deadline())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _in_deadline())


def _message(report: pytest.TestReport) -> str:
    text = report.longreprtext or ""
    if len(text) > MESSAGE_LIMIT:
        text = text[: MESSAGE_LIMIT // 3] + "\n[...]\n" + text[-2 * MESSAGE_LIMIT // 3 :]
    return text


def _crash(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0] if crash.message else ""
    lines = (report.longreprtext or "").strip().splitlines()
    return lines[-1] if lines else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _recorder.phases.setdefault(
        report.nodeid, {"duration": 0.0, "phases": {}, "durations": {}}
    )
    state["duration"] += report.duration
    state["durations"][report.when] = round(report.duration, 4)
    outcome: str = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    state["phases"][report.when] = outcome
    if report.failed and "message" not in state:
        state["message"] = _message(report)
        state["crash"] = _crash(report)
        state["failed_in"] = report.when
    if report.when != "teardown":
        return
    del _recorder.phases[report.nodeid]
    phases = state["phases"]
    setup, call, teardown = (phases.get(w) for w in ("setup", "call", "teardown"))
    if setup == "failed":
        result = "error"
    elif setup in ("skipped", "xfailed"):
        result = setup
    elif call == "failed":
        result = "failed"
    elif teardown == "failed":
        result = "error"
    else:
        result = call or "passed"
    record = {
        "nodeid": _recorder.nodeid(report.nodeid),
        "outcome": result,
        "duration": round(state["duration"], 4),
        "durations": state["durations"],
        "time": round(time.time(), 3),
    }
    for key in ("message", "crash", "failed_in"):
        if key in state:
            record[key] = state[key]
    _recorder.write(record)
