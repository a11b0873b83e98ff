"""Faults, with numbers: a bad destination, a fork, a process that exits at once.

Each runs in its own process, the way the agent runs in an application.
"""

from __future__ import annotations

import json
import time

from tests.support.http import closed_port
from tests.support.proc import run_python

# 10,000 metric calls timed on the caller's thread; stdout gets the seconds spent.
TEN_THOUSAND_CALLS = """
    import json, time
    import agent
    from agent import metrics
    assert agent.install()
    tags = (("peer", "users-api"), ("view", "index"), ("method", "GET"), ("status", 200))
    start = time.perf_counter()
    for i in range(10_000):
        metrics.count("requests.count", 1, tags)
    spent = time.perf_counter() - start
    agent.flush(2)                      # the background thread meets the fault now
    for i in range(10_000):             # and the app goes on emitting
        metrics.count("requests.count", 1, tags)
    agent.flush(2)
    print(json.dumps({"spent": spent}))
"""


def agent_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("agent:")]


def test_unresolvable_destination_costs_the_caller_nothing():
    proc = run_python(TEN_THOUSAND_CALLS, {"DD_AGENT_HOST": "does-not-resolve.invalid"})
    assert proc.returncode == 0, proc.stderr
    spent = json.loads(proc.stdout)["spent"]
    assert spent < 0.050, f"10,000 calls took {spent * 1000:.1f} ms on the caller's thread"
    warnings = agent_warnings(proc.stderr)
    assert len(warnings) == 1, proc.stderr
    assert "does-not-resolve.invalid" in warnings[0] and "does not resolve" in warnings[0]
    assert "Traceback" not in proc.stderr


def test_closed_port_costs_the_caller_nothing_and_warns_once():
    port = closed_port()
    proc = run_python(TEN_THOUSAND_CALLS, {"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{port}"})
    assert proc.returncode == 0, proc.stderr
    spent = json.loads(proc.stdout)["spent"]
    assert spent < 0.050, f"10,000 calls took {spent * 1000:.1f} ms on the caller's thread"
    warnings = agent_warnings(proc.stderr)
    assert len(warnings) <= 1, proc.stderr
    assert all("are being dropped" in w for w in warnings)
    assert "Traceback" not in proc.stderr


def test_missing_unix_socket_warns_once(tmp_path):
    proc = run_python(TEN_THOUSAND_CALLS, {"DD_DOGSTATSD_URL": f"unix://{tmp_path}/none.socket"})
    assert proc.returncode == 0, proc.stderr
    assert len(agent_warnings(proc.stderr)) == 1, proc.stderr


def test_fork_is_fast_and_the_child_sends_its_own_metrics(statsd):
    code = """
        import json, os, time
        import agent
        from agent import metrics
        assert agent.install()
        metrics.count("forktest.parent_before", 1)
        agent.flush(3)                      # the metrics thread is running and connected
        metrics.count("forktest.parent_pending", 1)   # queued in the parent at fork time
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            metrics.count("forktest.child", 1)
            agent.flush(3)
            os._exit(0)
        fork_seconds = time.perf_counter() - start
        os.waitpid(pid, 0)
        agent.flush(3)
        print(json.dumps({"fork": fork_seconds}))
    """
    proc = run_python(code, statsd.env)
    assert proc.returncode == 0, proc.stderr
    fork_seconds = json.loads(proc.stdout)["fork"]
    assert fork_seconds < 0.020, f"fork() took {fork_seconds * 1000:.1f} ms"
    assert statsd.wait_total("talisker.forktest.child", 1) == 1
    # the parent's queued metric is sent once, by the parent, not again by the child
    assert statsd.wait_total("talisker.forktest.parent_pending", 1) == 1
    assert statsd.total("talisker.forktest.parent_before") == 1


def test_a_process_that_emits_and_exits_at_once_delivers(statsd):
    code = """
        import time
        start = time.perf_counter()
        import agent
        from agent import metrics
        agent.install()
        metrics.count("shortlived.count", 7)
        metrics.timing("shortlived.latency", 1.5)
        print(time.perf_counter() - start)
    """
    proc = run_python(code, statsd.env)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 0.100  # the program itself ran for under 100 ms
    assert statsd.wait_total("talisker.shortlived.count", 7) == 7
    assert statsd.samples("talisker.shortlived.latency") == [1.5]


def test_exit_does_not_hang_on_an_unreachable_destination():
    code = """
        import agent
        from agent import metrics
        agent.install()
        metrics.count("x", 1)
    """
    start = time.monotonic()
    proc = run_python(code, {"DD_AGENT_HOST": "does-not-resolve.invalid"})
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 5


def test_a_bad_value_under_import_agent_warns_once_and_the_program_runs():
    proc = run_python(
        """
        import agent
        print("ran", agent.deadline_timeout())
        """,
        {"TALISKER_REQUEST_TIMEOUT": "abc"},
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == "ran None"
    (warning,) = agent_warnings(proc.stderr)
    assert "TALISKER_REQUEST_TIMEOUT='abc'" in warning
