"""agent.timed and process CPU metrics."""

from __future__ import annotations

import time

import agent
from tests.support.proc import run_python


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_timed_as_a_context_manager(install_agent, statsd):
    install_agent()
    with agent.timed("billing.invoice", tags={"kind": "monthly"}):
        burn(0.03)
        time.sleep(0.05)
    assert agent.flush(5)
    statsd.wait_for(lambda: statsd.find("talisker.billing.invoice.cpu"))
    (latency,) = statsd.find("talisker.billing.invoice.latency", kind="monthly")
    (cpu,) = statsd.find("talisker.billing.invoice.cpu", kind="monthly")
    assert latency.type == cpu.type == "d"
    assert latency.value >= 80
    assert 25 <= cpu.value < 70  # the sleep is not CPU


def test_timed_as_a_decorator_with_tag_strings(install_agent, statsd):
    install_agent()

    @agent.timed("jobs.run", tags=["queue:high"])
    def job(n: int) -> int:
        return n * 2

    assert job(21) == 42
    assert job(1) == 2
    assert agent.flush(5)
    statsd.wait_for(lambda: len(statsd.samples("talisker.jobs.run.latency")) >= 2)
    assert len(statsd.samples("talisker.jobs.run.latency", queue="high")) == 2
    assert len(statsd.samples("talisker.jobs.run.cpu", queue="high")) == 2


def test_timed_records_when_the_block_raises(install_agent, statsd):
    install_agent()
    try:
        with agent.timed("failing"):
            raise KeyError("x")
    except KeyError:
        pass
    assert agent.flush(5)
    assert statsd.wait_for(lambda: statsd.find("talisker.failing.latency"))


PROCESS_CPU = """
import os, time
import agent
from agent import metrics
agent.install()
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
metrics.count("start", 1)      # the first metric starts the reporter
burn(0.6)
pid = os.fork()
if pid == 0:
    time.sleep(0.7)            # the child only waits: its CPU is near zero
    agent.flush(3)
    os._exit(0)
burn(0.2)
os.waitpid(pid, 0)
time.sleep(0.3)
agent.flush(3)
"""


def test_process_cpu_per_interval_and_a_child_reports_only_its_own(statsd):
    # Flushing more often than sampling sends every sample of the gauge: with the
    # default 1 s flush only the last sample before each flush would be sent, and
    # which one that is was a race between the two threads.
    env = {
        **statsd.env,
        "TALISKER_RUNTIME_METRICS_INTERVAL": "0.2",
        "TALISKER_METRICS_FLUSH_INTERVAL": "0.05",
    }
    proc = run_python(PROCESS_CPU, env)
    assert proc.returncode == 0, proc.stderr
    statsd.wait_for(lambda: len({m.sender for m in statsd.find("talisker.process.cpu.user")}) >= 2)
    by_sender: dict[object, float] = {}
    for m in statsd.find("talisker.process.cpu.user") + statsd.find("talisker.process.cpu.system"):
        by_sender[m.sender] = by_sender.get(m.sender, 0) + m.value
    assert len(by_sender) == 2, proc.stderr
    parent_ms, child_ms = sorted(by_sender.values(), reverse=True)
    assert parent_ms >= 600
    assert child_ms < 200  # not the parent's 600 ms again
    parent = max(by_sender, key=by_sender.__getitem__)
    gauges = statsd.find("talisker.process.cpu.percent")
    assert gauges and all(m.type == "g" and m.value >= 0 for m in gauges)
    # How much of a core the burning parent got depends on the machine's load; that
    # it used more of one than its sleeping child did does not.
    parent_percent = max(m.value for m in gauges if m.sender == parent)
    child_percent = max(m.value for m in gauges if m.sender != parent)
    assert parent_percent > child_percent


def test_a_forked_childs_reporter_is_a_live_thread_it_can_stop():
    # threading's own fork hook forgets every thread but the forking one: a reporter
    # started by a hook that ran before it was marked stopped while it ran.
    code = """
        import os, agent
        from agent import metrics
        agent.install()
        metrics.count("start", 1)  # the agent imports threading and starts its thread
        pid = os.fork()
        if pid == 0:
            import threading
            thread = metrics.active_thread()  # started by the fork hook, for the CPU metrics
            alive = thread is not None and thread.is_alive()
            known = thread in threading.enumerate()
            agent.uninstall()  # stops the metrics thread: it ends
            os._exit(0 if alive and known else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """
    proc = run_python(code, {"TALISKER_RUNTIME_METRICS_INTERVAL": "0.01"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0", proc.stderr
    assert "Traceback" not in proc.stderr


RUNTIME_THREADS = """
import threading, time, agent
from agent import metrics
agent.install()
metrics.count("x")
time.sleep(0.5)
agent.flush(3)
print(sorted(t.name for t in threading.enumerate() if t.name.startswith("talisker")))
"""


def test_runtime_metrics_can_be_turned_off_and_need_no_thread_of_their_own(statsd):
    off = run_python(RUNTIME_THREADS, {**statsd.env, "TALISKER_RUNTIME_METRICS_INTERVAL": "0"})
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "['talisker-metrics']"
    statsd.wait_for(lambda: statsd.total("talisker.x") == 1)
    assert not statsd.find("talisker.process.cpu.user")
    on = run_python(RUNTIME_THREADS, {**statsd.env, "TALISKER_RUNTIME_METRICS_INTERVAL": "0.1"})
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip() == "['talisker-metrics']"  # polled by the metrics thread
    statsd.wait_for(lambda: statsd.find("talisker.process.cpu.user"))  # the control
