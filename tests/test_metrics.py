"""The metrics pipeline against a real DogStatsD receiver with a strict parser."""

from __future__ import annotations

import pytest

import agent
from agent import metrics


def send(receiver, expected_lines: int = 1) -> None:
    assert agent.flush(5)
    receiver.wait_for(lambda: len(receiver.metrics) >= expected_lines, 2)


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
    statsd.wait_for(lambda: len(statsd.samples("talisker.requests.latency")) >= 1000, 2)
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
    statsd.wait_for(lambda: statsd.total("talisker.requests.count") >= 15, 2)
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
