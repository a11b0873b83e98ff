"""Faults: a bad destination, a fork, a process that exits at once.

Each runs in its own process, the way the agent runs in an application.
Figures (time per call, fork duration) are in ``benchmarks/``; these tests
assert behaviour only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.support.http import closed_port
from tests.support.proc import ROOT, clean_env, run_python

# 10,000 metric calls, with every socket call the caller's thread makes recorded
# (audit events: DNS, connect, sendto...); stdout gets them.
TEN_THOUSAND_CALLS = """
    import json, sys, threading
    import agent
    from agent import metrics
    assert agent.install()
    main = threading.main_thread()
    calls = []
    def audit(event, args):
        if event.startswith("socket.") and threading.current_thread() is main:
            calls.append(event)
    sys.addaudithook(audit)
    tags = (("peer", "users-api"), ("view", "index"), ("method", "GET"), ("status", 200))
    for i in range(10_000):
        metrics.count("requests.count", 1, tags)
    agent.flush(2)                      # the background thread meets the fault now
    for i in range(10_000):             # and the app goes on emitting
        metrics.count("requests.count", 1, tags)
    agent.flush(2)
    print(json.dumps({"socket_calls": calls}))
"""


def agent_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("agent:")]


def test_unresolvable_destination_costs_the_caller_no_socket_call():
    proc = run_python(TEN_THOUSAND_CALLS, {"DD_AGENT_HOST": "does-not-resolve.invalid"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["socket_calls"] == []  # no DNS on the caller's thread
    warnings = agent_warnings(proc.stderr)
    assert len(warnings) == 1, proc.stderr
    assert "does-not-resolve.invalid" in warnings[0] and "does not resolve" in warnings[0]
    assert "Traceback" not in proc.stderr


def test_closed_port_costs_the_caller_no_socket_call_and_warns_once():
    port = closed_port()
    proc = run_python(TEN_THOUSAND_CALLS, {"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{port}"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["socket_calls"] == []
    warnings = agent_warnings(proc.stderr)
    assert len(warnings) == 1, proc.stderr
    assert "are being dropped" in warnings[0] and "send_failed" in warnings[0]
    assert "Traceback" not in proc.stderr


def test_missing_unix_socket_warns_once(tmp_path):
    proc = run_python(TEN_THOUSAND_CALLS, {"DD_DOGSTATSD_URL": f"unix://{tmp_path}/none.socket"})
    assert proc.returncode == 0, proc.stderr
    assert len(agent_warnings(proc.stderr)) == 1, proc.stderr


def test_a_forked_child_sends_its_own_metrics_and_not_the_parents(statsd):
    code = """
        import os
        import agent
        from agent import metrics
        assert agent.install()
        metrics.count("forktest.parent_before", 1)
        agent.flush(3)                      # the metrics thread is running and connected
        metrics.count("forktest.parent_pending", 1)   # queued in the parent at fork time
        pid = os.fork()
        if pid == 0:
            metrics.count("forktest.child", 1)
            os._exit(0 if agent.flush(3) else 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        agent.flush(3)
    """
    proc = run_python(code, statsd.env)
    assert proc.returncode == 0, proc.stderr
    assert statsd.wait_total("talisker.forktest.child", 1) == 1
    # the parent's queued metric is sent once, by the parent, not again by the child
    assert statsd.wait_total("talisker.forktest.parent_pending", 1) == 1
    assert statsd.total("talisker.forktest.parent_before") == 1
    senders = {m.sender for m in statsd.metrics}
    assert len(senders) == 2  # the child sent from a socket of its own


def test_a_forked_childs_sinks_hand_to_its_own_queues(statsd):
    # A sink bound in the parent holds the parent's queue's append; the child's
    # first payload must go to a queue of the child's, which its thread drains.
    code = """
        import os
        import agent
        from agent import metrics
        def expand(payloads):
            return [(metrics.COUNT, "forktest.sunk", sum(payloads), ())]
        assert agent.install()
        sink = metrics.sink(expand)
        sink.append(1)
        sink.append(2)  # through the parent's bound queue
        agent.flush(3)
        pid = os.fork()
        if pid == 0:
            sink.append(100)
            sink.append(1000)
            os._exit(0 if agent.flush(3) else 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        sink.append(10)
        agent.flush(3)
    """
    proc = run_python(code, statsd.env)
    assert proc.returncode == 0, proc.stderr
    assert statsd.wait_total("talisker.forktest.sunk", 1113) == 1113


def test_a_fork_while_another_thread_holds_the_agents_locks_leaves_the_child_working():
    # A thread of the parent holds every lock of the agent's that a call or an import
    # takes (the registry's, the circuit breakers' and the retry budgets'); the child
    # then imports a target and uses a breaker and a budget. It used to wait forever
    # for locks whose holder does not exist in the child.
    code = """
        import os, threading, time
        import agent
        from agent import registry
        from agent.http import breaker, retry
        assert agent.install()
        assert "urllib3" not in sys.modules
        peer = breaker.breaker_for({"*": breaker.DEFAULTS}, "peer:1")
        budget = retry.budget_for("peer:1")
        held, release = threading.Event(), threading.Event()

        def hold():
            with registry._lock, breaker._breakers_lock, peer._lock:
                with retry._budgets_lock, budget._lock:
                    held.set()
                    release.wait()

        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            import urllib3  # its post-import hook takes the registry's lock

            ours = registry.is_ours(vars(urllib3.connectionpool.HTTPConnectionPool)["urlopen"])
            breaker.breaker_for({"*": breaker.DEFAULTS}, "peer:2")  # the breakers' lock
            peer.state = breaker.OPEN
            peer.allow()  # a breaker that is not closed takes its own lock
            budget.failure()
            retry.budget_for("peer:2")  # the budgets' lock
            os._exit(0 if ours else 3)
        release.set()
        for _ in range(450):  # 45 s
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("exit", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("hung")
    """
    proc = run_python(
        "import sys\n" + textwrap.dedent(code), {"TALISKER_METRICS_ENABLED": "false"}, timeout=110
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["exit", "0"], (proc.stdout, proc.stderr)


# The repro: forks while the first metric starts the metrics thread. Each
# child must import urllib.parse and flush; a child forked while the metrics thread
# was importing got a half-initialised module (a hang or an ImportError).
FORK_WHILE_STARTING = """
    import os, time, agent
    from agent import metrics
    agent.install(); metrics.count("start", 1); agent.flush(0)
    pids = []
    for _ in range(8):
        metrics.count("flowing", 1)
        pid = os.fork()
        if pid == 0:
            import urllib.parse; urllib.parse.urlparse("http://x/")
            os._exit(0 if agent.flush(3) else 3)
        pids.append(pid)
        time.sleep(0.01)
    print([os.waitpid(pid, 0)[1] for pid in pids])
"""


def run_in_own_session(code: str, env: dict[str, str], timeout: float) -> tuple[str, str]:
    """Run ``code``; kill it and every child it left (a hung one) on timeout. (stdout, stderr)"""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=clean_env(**env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return out, err + f"\nhung for {timeout} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out, err


def test_forks_while_the_metrics_thread_starts_leave_every_child_whole(statsd):
    env = {**statsd.env, "TALISKER_METRICS_FLUSH_INTERVAL": "0.05"}
    for run in range(30):
        out, err = run_in_own_session(FORK_WHILE_STARTING, env, timeout=60)
        assert out.strip() == str([0] * 8), f"run {run}: {out}\n{err}"
        assert "Traceback" not in err, f"run {run}: {err}"


def test_the_metrics_threads_import_nothing(tmp_path, statsd, statsd_unix):
    # An import in a background thread is what a fork can catch half done: the
    # threads of the agent must find everything imported before they start.
    code = f"""
        import json, sys, threading
        imports = []
        def audit(event, args):
            if event == "import" and threading.current_thread().name.startswith("talisker"):
                imports.append(args[0])
        sys.addaudithook(audit)
        import time
        import agent
        from agent import config, metrics
        for url in ("{statsd.url}", "{statsd_unix.url}",
                    "udp://127.0.0.1:{closed_port()}", "udp://localhost:9",
                    "udp://does-not-resolve.invalid:8125", "udp://bücher.invalid:8125",
                    "unix://{tmp_path}/none.socket", "unixstream://{tmp_path}/none.socket"):
            env = {{"DD_DOGSTATSD_URL": url, "TALISKER_RUNTIME_METRICS_INTERVAL": "0.05"}}
            assert agent.install(config.load(env))
            metrics.count("ok.count", 1, (("k", "v"),))
            metrics.count("bad.count", "abc")
            metrics.timing("odd.latency", 1.0, (("k", ["a"]),))
            metrics.gauge("odd.gauge", object())
            metrics.record_deferred(lambda payloads: [1 / 0], 1)
            time.sleep(0.1)  # the CPU thread reports
            agent.flush(5)
            agent.flush(5)
        print(json.dumps(imports))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_no_secret_of_the_destination_is_logged_by_a_metrics_client():
    # The datadog client logs DD_DOGSTATSD_URL verbatim when its port is bad; the
    # agent does not import it. (The agent's own warning about the value is config.py's.)
    code = """
        import logging, sys
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        import agent
        from agent import metrics
        metrics.count("x", 1)
        agent.flush(3)
        print("datadog" in sys.modules)
    """
    proc = run_python(code, {"DD_DOGSTATSD_URL": "udp://user:pa/ss@127.0.0.1:8125"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    others = [line for line in proc.stderr.splitlines() if not line.startswith("agent:")]
    assert not [line for line in others if line.startswith("datadog")], proc.stderr
    assert not [line for line in others if "pa/ss" in line or "user:" in line], proc.stderr


def test_a_process_that_emits_and_exits_at_once_delivers(statsd):
    code = """
        import agent
        from agent import metrics
        agent.install()
        metrics.count("shortlived.count", 7)
        metrics.timing("shortlived.latency", 1.5)
    """
    proc = run_python(code, statsd.env)
    assert proc.returncode == 0, proc.stderr
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
    assert time.monotonic() - start < 15  # the exit flush waits 3 s at most: no hang


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
