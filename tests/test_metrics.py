"""The metrics pipeline against a real DogStatsD receiver with a strict parser."""

from __future__ import annotations

import socket

import pytest
import urllib3

import agent
from agent import config, metrics
from tests.support.statsd import Receiver

DROPPED = "talisker.agent.dropped"


def send(receiver, expected_lines: int = 1) -> None:
    assert agent.flush(5)
    receiver.wait_for(lambda: len(receiver.metrics) >= expected_lines, 10)


def install_to(url: str, **env: str) -> None:
    """Install the agent in this process sending to ``url`` (uninstalled by the test)."""
    environ = {"TALISKER_ENABLED": "true", "DD_DOGSTATSD_URL": url, **env}
    assert agent.install(config.load(environ))


def agent_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "agent" and r.levelno >= 30]


def test_counts_are_aggregated_per_context(install_agent, statsd):
    install_agent()
    for _ in range(1000):
        metrics.count("requests.count", 1, (("peer", "users-api"), ("status", 200)))
    metrics.count("requests.count", 1, (("peer", "users-api"), ("status", 500)))
    send(statsd, 2)
    assert statsd.total("talisker.requests.count", peer="users-api", status="200") == 1000
    assert statsd.total("talisker.requests.count", status="500") == 1
    assert len(statsd.find("talisker.requests.count")) == 2


def test_timings_are_sent_in_milliseconds_as_distribution_samples(install_agent, statsd):
    install_agent()
    for ms in (1.5, 2.25, 100.0):
        metrics.timing("requests.latency", ms, (("peer", "a"),))
    send(statsd)
    (m,) = statsd.find("talisker.requests.latency")
    assert m.type == "d"
    assert sorted(m.values) == [1.5, 2.25, 100.0]


def test_many_samples_are_split_over_lines(install_agent, statsd):
    install_agent()
    for i in range(1000):
        metrics.timing("requests.latency", float(i), ())
    send(statsd)
    statsd.wait_for(lambda: len(statsd.samples("talisker.requests.latency")) >= 1000, 10)
    assert sorted(statsd.samples("talisker.requests.latency")) == [float(i) for i in range(1000)]
    assert all(len(m.line) < 1432 for m in statsd.metrics)


def test_histogram_type_can_be_chosen(install_agent, statsd):
    install_agent(TALISKER_METRICS_TIMING_TYPE="histogram")
    metrics.timing("requests.latency", 3.0, ())
    send(statsd)
    assert statsd.find("talisker.requests.latency")[0].type == "h"


def test_gauges_send_the_last_value(install_agent, statsd):
    install_agent()
    metrics.gauge("process.cpu.percent", 10.0)
    metrics.gauge("process.cpu.percent", 12.5)
    send(statsd)
    (m,) = statsd.find("talisker.process.cpu.percent")
    assert (m.type, m.value) == ("g", 12.5)


def test_hostile_tag_values_cannot_corrupt_a_datagram(install_agent, statsd):
    install_agent()
    hostile = "a|b,c#d\n@e f\r\ng:h[::1]"
    metrics.count("requests.count", 1, (("view", hostile), ("peer", "[::1]:8080")))
    metrics.count("requests.count", 1, (("k|e,y#\n", "v"),))
    send(statsd, 2)
    (m,) = statsd.find("talisker.requests.count", peer="_::1_:8080")
    assert m.tag("view") == "a_b_c_d__e_f__g:h_::1_"
    assert statsd.find("talisker.requests.count", k_e_y__="v")
    assert not statsd.errors


def test_long_tag_values_are_cut(install_agent, statsd):
    install_agent()
    metrics.count("requests.count", 1, (("view", "x" * 1000),))
    send(statsd)
    assert statsd.find("talisker.requests.count")[0].tag("view") == "x" * 200


@pytest.mark.parametrize("key", ["host", "device", "source", "service"])
def test_reserved_tag_keys_are_renamed(install_agent, statsd, key):
    install_agent(DD_SERVICE="billing")
    metrics.count("requests.count", 1, ((key, "web-1"),))
    send(statsd)
    (m,) = statsd.find("talisker.requests.count")
    assert m.tag(key) == ("billing" if key == "service" else None)
    assert m.tag(f"tag_{key}") == "web-1"


def test_tag_values_are_capped_per_metric_and_key(install_agent, statsd):
    install_agent(TALISKER_METRICS_MAX_TAG_VALUES="10")
    for i in range(50):
        metrics.count("requests.count", 1, (("view", f"v{i}"), ("method", "GET")))
    for i in range(5):
        metrics.count("sql.queries", 1, (("view", f"other-metric-{i}"),))
    send(statsd, 12)
    views = {m.tag("view") for m in statsd.find("talisker.requests.count")}
    assert views == {f"v{i}" for i in range(10)} | {"other"}
    assert statsd.total("talisker.requests.count", view="other") == 40
    assert statsd.total("talisker.requests.count", method="GET") == 50
    # the cap is per metric: another metric keeps its own values
    assert len({m.tag("view") for m in statsd.find("talisker.sql.queries")}) == 5


def test_the_cap_holds_across_flushes(install_agent, statsd):
    install_agent(TALISKER_METRICS_MAX_TAG_VALUES="3")
    for batch in range(3):
        for i in range(5):
            metrics.count("requests.count", 1, (("view", f"b{batch}-{i}"),))
        assert agent.flush(5)
    statsd.wait_for(lambda: statsd.total("talisker.requests.count") >= 15, 10)
    assert {m.tag("view") for m in statsd.find("talisker.requests.count")} == {
        "b0-0",
        "b0-1",
        "b0-2",
        "other",
    }


def test_constant_tags_from_the_environment(install_agent, statsd):
    install_agent(
        DD_SERVICE="billing",
        DD_ENV="prod",
        DD_VERSION="1.2.3",
        DD_TAGS="team:core, host:x,zone:eu-1",
    )
    metrics.count("requests.count", 1, (("peer", "a"),))
    send(statsd)
    (m,) = statsd.find("talisker.requests.count")
    assert m.tags == [
        "peer:a",
        "service:billing",
        "env:prod",
        "version:1.2.3",
        "team:core",
        "tag_host:x",
        "zone:eu-1",
    ]


def test_prefix_is_configurable(install_agent, statsd):
    install_agent(TALISKER_METRICS_PREFIX="myapp.http")
    metrics.count("requests.count")
    send(statsd)
    assert statsd.find("myapp.http.requests.count")


def test_empty_prefix_sends_bare_names(install_agent, statsd):
    install_agent(TALISKER_METRICS_PREFIX="")
    metrics.count("requests.count")
    send(statsd)
    assert statsd.find("requests.count")


def test_statsd_dsn_gives_destination_and_prefix(install_agent, statsd):
    install_agent(DD_DOGSTATSD_URL="", STATSD_DSN=f"udp://127.0.0.1:{statsd.port}/legacy")
    metrics.count("requests.count")
    send(statsd)
    assert statsd.find("legacy.requests.count")


def test_unix_datagram_socket(statsd_unix):
    from agent import config

    cfg = config.load({"DD_DOGSTATSD_URL": statsd_unix.url})
    assert agent.install(cfg)
    try:
        metrics.count("requests.count", 3)
        send(statsd_unix)
        assert statsd_unix.total("talisker.requests.count") == 3
    finally:
        agent.uninstall()


def test_metrics_disabled_sends_nothing(install_agent, statsd):
    install_agent(TALISKER_METRICS_ENABLED="false")
    assert metrics.active() is None
    metrics.count("requests.count")
    assert agent.flush(1)
    assert not statsd.wait_for(lambda: bool(statsd.datagrams), 0.3)


def test_metric_names_are_sanitised(install_agent, statsd):
    install_agent()
    metrics.count("my block|x:y#z", 1)
    send(statsd)
    assert statsd.find("talisker.my_block_x_y_z")


def test_constant_tags_and_origin_fields_of_the_datadog_client(install_agent, statsd, monkeypatch):
    monkeypatch.setenv("DD_ENTITY_ID", "pod-42")
    monkeypatch.setenv("DD_EXTERNAL_ENV", "it-false,cn-app")
    monkeypatch.setenv("DD_ORIGIN_DETECTION_ENABLED", "false")
    install_agent(DD_SERVICE="billing")
    metrics.count("requests.count", 2, (("peer", "a"),))
    metrics.count("bare.count", 1)
    send(statsd, 2)
    lines = statsd.raw_text().splitlines()
    constant = "service:billing,dd.internal.entity_id:pod-42|e:it-false,cn-app"
    assert f"talisker.requests.count:2|c|#peer:a,{constant}" in lines
    assert f"talisker.bare.count:1|c|#{constant}" in lines


def test_datadog_dogstatsd_disable_sends_nothing(install_agent, statsd, monkeypatch):
    monkeypatch.setenv("DD_DOGSTATSD_DISABLE", "true")
    install_agent()
    metrics.count("requests.count")
    assert agent.flush(5)
    assert not statsd.wait_for(lambda: bool(statsd.datagrams), 1)


def test_unix_stream_socket():
    receiver = Receiver("unixstream")
    try:
        install_to(receiver.url)
        for i in range(2000):  # several frames
            metrics.count("requests.count", 1, (("view", f"v{i % 50}"),))
        metrics.timing("requests.latency", 2.5)
        send(receiver)
        receiver.wait_for(lambda: receiver.total("talisker.requests.count") >= 2000, 10)
        assert receiver.total("talisker.requests.count") == 2000
        assert receiver.samples("talisker.requests.latency") == [2.5]
        assert not receiver.errors
    finally:
        agent.uninstall()
        receiver.close()


def test_a_unix_url_finds_a_stream_socket():
    receiver = Receiver("unixstream")
    try:
        install_to("unix://" + receiver.path)
        metrics.count("requests.count", 3)
        send(receiver)
        assert receiver.total("talisker.requests.count") == 3
    finally:
        agent.uninstall()
        receiver.close()


# -- nothing is lost silently ------------------------------------------------------


def test_a_bad_record_is_dropped_and_counted_and_its_flush_is_sent(
    install_agent, statsd, http_server, caplog
):
    install_agent()
    for _ in range(2):  # the second flush is the same: still counted, still isolated
        with agent.timed("billing.invoice", tags={"kind": ["monthly"]}):  # a list as a value
            pass
        metrics.count("bad.count", "abc")  # not a number
        metrics.count("good.count", 1, (("k", "v"),))
        urllib3.PoolManager().request("GET", http_server.url + "/a")
        assert agent.flush(5)
    statsd.wait_for(lambda: statsd.total(DROPPED) >= 2, 10)
    assert statsd.total("talisker.good.count", k="v") == 2
    assert statsd.total("talisker.requests.count") == 2  # deferred records of the same flush
    latencies = statsd.find("talisker.billing.invoice.latency")
    assert len(latencies) == 2 and latencies[0].tag("kind") == "__monthly__"  # sent as its text
    assert not statsd.find("talisker.bad.count")
    assert statsd.total(DROPPED, reason="bad_record") == 2
    (warning,) = agent_warnings(caplog)  # rate-limited: once, though it happened twice
    assert "'bad.count'" in warning and "str" in warning and "bad_record" in warning


def test_a_value_that_is_not_finite_is_dropped_and_counted(install_agent, statsd, caplog):
    """DogStatsD parses nan and inf, then sums or averages them into the whole series."""
    install_agent()
    metrics.count("bad.count", float("inf"))
    metrics.gauge("bad.gauge", float("-inf"))
    metrics.timing("mixed.latency", float("nan"))
    metrics.timing("mixed.latency", 5)
    metrics.count("good.count", 1)
    assert agent.flush(5)
    statsd.wait_for(lambda: statsd.total(DROPPED) >= 3, 10)
    assert statsd.samples("talisker.mixed.latency") == [5.0]
    assert statsd.total("talisker.good.count") == 1
    assert not statsd.find("talisker.bad.count") and not statsd.find("talisker.bad.gauge")
    assert statsd.total(DROPPED, reason="bad_record") == 3
    (warning,) = agent_warnings(caplog)
    assert "not a finite number" in warning


def _expand_strictly(payloads):
    return [(metrics.COUNT, "expanded.count", 10 // payload, ()) for payload in payloads]


def test_a_failing_expansion_loses_only_its_bad_payloads(install_agent, statsd):
    install_agent()
    for payload in (1, 0, 2):  # 10 // 0 raises
        metrics.record_deferred(_expand_strictly, payload)
    metrics.count("other.count", 1)
    send(statsd)
    statsd.wait_for(lambda: statsd.total(DROPPED) >= 1, 10)
    assert statsd.total("talisker.expanded.count") == 15
    assert statsd.total("talisker.other.count") == 1
    assert statsd.total(DROPPED, reason="bad_record") == 1


def test_records_past_the_queue_limit_are_counted(install_agent, statsd, monkeypatch, caplog):
    from agent.metrics import worker

    monkeypatch.setattr(worker, "QUEUE_LIMIT", 1000)
    install_agent(TALISKER_METRICS_FLUSH_INTERVAL="60")  # only the explicit flush drains
    for _ in range(1500):
        metrics.count("queued.count", 1)
    send(statsd)
    statsd.wait_for(lambda: statsd.total(DROPPED) >= 1, 10)
    assert statsd.total("talisker.queued.count") == 1000
    assert statsd.total(DROPPED, reason="queue_full") == 500
    (warning,) = agent_warnings(caplog)
    assert "500 metric records dropped" in warning and "queue_full" in warning


def test_a_full_unix_socket_counts_its_losses_and_reports_them_once_read(caplog):
    receiver = Receiver("unix", reading=False)  # its reader has stopped
    try:
        install_to(receiver.url, TALISKER_METRICS_MAX_TAG_VALUES="5000")
        for i in range(3000):  # ~15 datagrams; a unix socket queues 10 by default
            metrics.count("full.count", 1, (("n", f"value-{i}"),))
        assert agent.flush(5)
        receiver.start_reading()
        metrics.count("after.count", 1)
        for _ in range(50):  # a reader slow to catch up may cost this flush too: counted
            assert agent.flush(5)
            if receiver.wait_for(lambda: receiver.find(DROPPED), 0.2):
                break
        received = len(receiver.find("talisker.full.count"))
        received += len(receiver.find("talisker.after.count"))
        dropped = receiver.total(DROPPED, reason="socket_full")
        assert dropped > 0 and received + dropped == 3001
        (warning,) = agent_warnings(caplog)
        assert "socket buffer is full" in warning and "socket_full" in warning
    finally:
        agent.uninstall()
        receiver.close()


def test_losses_while_the_socket_is_missing_are_reported_when_it_is_back(tmp_path, caplog):
    path = str(tmp_path / "dsd.socket")
    install_to(f"unix://{path}")
    receiver = None
    try:
        for i in range(20):
            metrics.count("early.count", 1, (("n", str(i)),))
        assert agent.flush(5)
        assert agent.flush(5)  # a flush with nothing new: the counts stay pending
        receiver = Receiver("unix", address=path)
        metrics.count("late.count", 1)
        assert agent.flush(5)
        receiver.wait_for(lambda: receiver.find(DROPPED), 10)
        assert receiver.total(DROPPED, reason="send_failed") == 20
        assert receiver.total("talisker.late.count") == 1
        (warning,) = agent_warnings(caplog)
        assert "are being dropped" in warning and "No such file" in warning
    finally:
        agent.uninstall()
        if receiver is not None:
            receiver.close()


def test_losses_to_a_closed_udp_port_are_reported_when_it_listens(caplog):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    install_to(f"udp://127.0.0.1:{port}")
    receiver = None
    try:
        for i in range(10):
            metrics.count("early.count", 1, (("n", str(i)),))
        assert agent.flush(5)
        receiver = Receiver("udp", address=port)
        metrics.count("late.count", 1)
        assert agent.flush(5)
        receiver.wait_for(lambda: receiver.find(DROPPED), 10)
        assert receiver.total(DROPPED, reason="send_failed") == 10
        assert receiver.total("talisker.late.count") == 1
        assert any("Connection refused" in w for w in agent_warnings(caplog))
    finally:
        agent.uninstall()
        if receiver is not None:
            receiver.close()


def test_a_flush_while_another_thread_starts_the_pipeline_waits_for_it(
    install_agent, statsd, monkeypatch
):
    """The first metric of a process, recorded in one thread while another flushes.

    The metrics thread was published before it had started, so a flush that came
    in between saw a thread that was not alive and gave up at once (the 499 WSGI
    test failed that way in CI: its server thread made the first record).
    """
    import threading

    install_agent()
    starting, release = threading.Event(), threading.Event()
    real_start = threading.Thread.start

    def slow_start(thread):
        if thread.name == "talisker-metrics":
            starting.set()
            release.wait(10)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    recorder = threading.Thread(target=metrics.count, args=("first", 1))
    real_start(recorder)
    assert starting.wait(10)
    result = []
    flusher = threading.Thread(target=lambda: result.append(agent.flush(10)))
    real_start(flusher)
    flusher.join(0.2)  # the flush is waiting for the thread to start, not given up
    release.set()
    flusher.join(10)
    recorder.join(10)
    assert result == [True]
    statsd.wait_for(lambda: statsd.total("talisker.first") == 1, 5)


def _expand_sunk(payloads):
    return [(metrics.COUNT, "sunk.count", sum(payloads), ())]


def test_a_sink_appends_to_its_queue_once_the_thread_runs(install_agent, statsd):
    install_agent()
    sink = metrics.sink(_expand_sunk)
    assert metrics.sink(_expand_sunk) is sink
    sink.append(1)  # starts the thread, makes the queue, binds
    pipeline = metrics.active()
    assert pipeline is not None and pipeline.thread is not None
    assert sink.append == pipeline.deferred[_expand_sunk].append  # the hot path: one C call
    sink.append(2)
    send(statsd)
    statsd.wait_for(lambda: statsd.total("talisker.sunk.count") >= 3, 10)
    assert statsd.total("talisker.sunk.count") == 3


def test_a_new_configuration_takes_the_sinks_from_the_old_queues(install_agent, statsd):
    install_agent()
    sink = metrics.sink(_expand_sunk)
    sink.append(1)
    send(statsd)
    other = Receiver("udp")
    try:
        install_to(other.url)  # a new pipeline; the old one is closed
        sink.append(10)
        send(other)
        other.wait_for(lambda: other.total("talisker.sunk.count") >= 10, 10)
        assert other.total("talisker.sunk.count") == 10
        assert statsd.total("talisker.sunk.count") == 1
        assert not other.errors
    finally:
        other.close()


def test_a_sink_is_not_left_on_a_queue_replaced_while_it_binds(install_agent, statsd):
    # configure() lands between the sink's record and its binding to the queue it found.
    install_agent()
    other = Receiver("udp")
    pipeline = metrics.active()
    assert pipeline is not None and pipeline.thread is None

    class Hooked(dict):
        gets = 0

        def get(self, key, default=None):
            Hooked.gets += 1
            if Hooked.gets == 2:  # the sink's own lookup, after record_deferred's
                install_to(other.url)
            return super().get(key, default)

    pipeline.deferred = Hooked()
    try:
        sink = metrics.sink(_expand_sunk)
        sink.append(1)  # to the old pipeline, which the new configuration flushes
        assert Hooked.gets >= 2
        sink.append(10)  # to the new one
        send(other)
        other.wait_for(lambda: other.total("talisker.sunk.count") >= 10, 10)
        assert other.total("talisker.sunk.count") == 10
        statsd.wait_for(lambda: statsd.total("talisker.sunk.count") >= 1, 10)
        assert statsd.total("talisker.sunk.count") == 1
        assert not other.errors
    finally:
        other.close()
