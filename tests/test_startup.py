"""`import agent` is cheap: no target, no datadog, no wrapt, no heavy stdlib module."""

from __future__ import annotations

import json

import pytest

from tests.support.proc import check_python

HEAVY = [
    "urllib3",
    "requests",
    "psycopg2",
    "flask",
    "datadog",
    "wrapt",
    "typing",
    "logging",
    "re",
    "threading",
    "functools",  # it imports collections, operator, reprlib, keyword: 10.9M instructions
    "collections",
    "types",  # 1.2M instructions (Python 3.13)
    "math",  # 0.6M, a shared library to load
    "contextvars",  # with agent.context, a third of import agent: loaded on first use
    "__future__",  # 0.6M: the start-up modules write their annotations as strings instead
    "_functools",  # with the registry's partial subclass, 0.9M: made when first bound
]

#: The modules of ours that ``import agent`` loads, and no others: each costs about 0.5M
#: instructions and eight system calls (docs/benchmarks.md), so adding one to the
#: start-up path is a decision to write down here.
STARTUP_MODULES = [
    "agent",
    "agent._fork",
    "agent._log",
    "agent.config",
    "agent.metrics",
    "agent.registry",
]


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_import_agent_imports_no_target_and_nothing_heavy(enabled):
    out = check_python(
        f"""
        import sys
        before = set(sys.modules)  # what the interpreter's own start-up loaded is not ours
        import agent
        heavy = {HEAVY!r}
        loaded = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy)
        import json  # only now: json itself imports re
        print(json.dumps(loaded))
        """,
        {"TALISKER_ENABLED": enabled},
    )
    assert json.loads(out) == []


@pytest.mark.parametrize(
    "env",
    [
        {"TALISKER_ENABLED": "true"},
        {"TALISKER_ENABLED": "false"},
        {"DD_DOGSTATSD_URL": "udp://127.0.0.1:9"},  # a Destination made at start-up
        {"STATSD_DSN": "udp://127.0.0.1:9/app", "TALISKER_DISABLED_INSTRUMENTATIONS": "flask"},
    ],
)
def test_import_agent_loads_only_the_start_up_modules_of_ours(env):
    out = check_python(
        """
        import json, sys
        import agent
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "agent")))
        """,
        env,
    )
    assert json.loads(out) == STARTUP_MODULES


def test_the_api_loads_on_first_use_as_it_did_at_import():
    out = check_python(
        """
        import sys
        import agent
        print("agent.context" in sys.modules)
        from agent import deadline, DeadlineExceeded
        import agent as again
        print(deadline is again.context.deadline, issubclass(DeadlineExceeded, TimeoutError))
        with agent.request_context(request_id="r"):
            print(agent.context.current().request_id)
        print(sorted(set(agent.__all__) - set(dir(agent)) - set(agent._LAZY)))
        """
    )
    assert out.split("\n")[:4] == ["False", "True True", "r", "[]"]


def test_the_targets_are_installed_for_this_check():
    # The check above means something only if the targets could have been imported.
    check_python("import urllib3, requests, psycopg2, flask, datadog, wrapt")


def test_import_agent_never_raises_even_with_every_setting_bad():
    env = {
        "TALISKER_ENABLED": "perhaps",
        "TALISKER_DISABLED_INSTRUMENTATIONS": "nope",
        "DD_DOGSTATSD_URL": "ftp://x",
        "DD_DOGSTATSD_PORT": "-1",
        "TALISKER_REQUEST_TIMEOUT": "soon",
        "TALISKER_LOG_LEVEL": "LOUD",
        "TALISKER_METRICS_PREFIX": "!!",
    }
    out = check_python("import agent; print('ok')", env)
    assert out.strip() == "ok"
