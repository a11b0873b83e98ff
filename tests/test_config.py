"""Configuration: one declaration per variable; bad values named once; strict mode."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent import config, metrics
from agent.config import SETTINGS, ConfigError, Destination, load
from tests.support.proc import run_python

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_declared_once_with_a_doc():
    names = [s.env for s in SETTINGS]
    assert len(names) == len(set(names))
    for s in SETTINGS:
        assert s.doc and s.doc[-1] == ".", s.env
        assert s.attr


def test_the_design_variables_are_all_declared():
    declared = {s.env for s in SETTINGS}
    assert {
        "TALISKER_ENABLED",
        "TALISKER_DISABLED_INSTRUMENTATIONS",
        "TALISKER_METRICS_ENABLED",
        "DD_DOGSTATSD_URL",
        "DD_AGENT_HOST",
        "DD_DOGSTATSD_PORT",
        "STATSD_DSN",
        "DD_SERVICE",
        "DD_ENV",
        "DD_VERSION",
        "DD_TAGS",
        "TALISKER_METRICS_PREFIX",
        "TALISKER_REQUEST_TIMEOUT",
        "TALISKER_SOFT_REQUEST_TIMEOUT",
        "TALISKER_ENDPOINT_NAMES",
        "TALISKER_RUNTIME_METRICS_INTERVAL",
        "TALISKER_LOG_LEVEL",
        "TALISKER_ID_HEADER",
        "TALISKER_DEADLINE_HEADER",
    } <= declared


def test_defaults_with_an_empty_environment():
    cfg = load({})
    assert cfg.enabled is True
    assert cfg.metrics_enabled is True
    assert cfg.disabled_instrumentations == frozenset()
    assert cfg.request_timeout is None
    assert cfg.runtime_metrics_interval == 10.0
    assert cfg.prefix == "talisker"
    assert cfg.destination == Destination("udp", host="localhost", port=8125)
    assert cfg.id_header == "X-Request-Id"
    assert cfg.deadline_header == "X-Request-Deadline"


def test_each_default_is_what_its_parser_makes_of_the_documented_default():
    for s in SETTINGS:
        shown = s.describe_default()
        if shown in ("none", "empty"):
            continue
        assert s.parse(shown) == s.default, s.env


def test_values_are_parsed():
    cfg = load(
        {
            "TALISKER_ENABLED": "off",
            "TALISKER_REQUEST_TIMEOUT": "1500",
            "TALISKER_DISABLED_INSTRUMENTATIONS": "requests, PSYCOPG2",
            "TALISKER_ENDPOINT_NAMES": "10.0.0.5:8000=users-api, db:5432=orders",
            "DD_TAGS": "team:core,region:eu zone:a",
            "TALISKER_LOG_LEVEL": "debug",
        }
    )
    assert cfg.enabled is False
    assert cfg.request_timeout == 1.5
    assert cfg.disabled_instrumentations == {"requests", "psycopg2"}
    assert cfg.endpoint_names == {"10.0.0.5:8000": "users-api", "db:5432": "orders"}
    assert cfg.tags == ("team:core", "region:eu", "zone:a")
    assert cfg.log_level == "DEBUG"


def test_all_disables_every_instrumentation():
    cfg = load({"TALISKER_DISABLED_INSTRUMENTATIONS": "all"})
    assert cfg.disabled_instrumentations == set(config.INSTRUMENTATIONS)
    assert not any(cfg.instrumentation_enabled(n) for n in config.INSTRUMENTATIONS)


def test_a_bad_value_is_named_in_one_warning_and_the_default_is_used(caplog):
    with caplog.at_level(logging.WARNING, logger="agent"):
        cfg = load({"TALISKER_REQUEST_TIMEOUT": "abc", "DD_DOGSTATSD_PORT": "99999"})
    assert cfg.request_timeout is None
    assert cfg.dogstatsd_port == 8125
    messages = [r.getMessage() for r in caplog.records if r.name == "agent"]
    assert len(messages) == 2
    timeout = next(m for m in messages if "TALISKER_REQUEST_TIMEOUT" in m)
    assert "'abc'" in timeout and "milliseconds" in timeout and "using 'none' instead" in timeout
    port = next(m for m in messages if "DD_DOGSTATSD_PORT" in m)
    assert "'99999'" in port and "using '8125' instead" in port
    assert cfg.sources["request_timeout"] == "invalid"


def test_a_list_with_a_bad_item_keeps_the_good_items(caplog):
    with caplog.at_level(logging.WARNING, logger="agent"):
        cfg = load({"TALISKER_DISABLED_INSTRUMENTATIONS": "requests,urlib3"})
    assert cfg.disabled_instrumentations == {"requests"}
    (record,) = [r for r in caplog.records if r.name == "agent"]
    assert "'requests,urlib3'" in record.getMessage()
    assert "using 'requests' instead" in record.getMessage()


def test_strict_mode_raises_naming_the_variable():
    with pytest.raises(ConfigError) as info:
        load({"TALISKER_REQUEST_TIMEOUT": "abc"}, strict=True)
    assert info.value.variable == "TALISKER_REQUEST_TIMEOUT"
    assert "TALISKER_REQUEST_TIMEOUT='abc'" in str(info.value)


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("TALISKER_REQUEST_TIMEOUT", "-5"),
        ("TALISKER_REQUEST_TIMEOUT", "nan"),
        ("TALISKER_RUNTIME_METRICS_INTERVAL", "-1"),
        ("TALISKER_ENABLED", "maybe"),
        ("DD_DOGSTATSD_URL", "tcp://localhost:8125"),
        ("DD_DOGSTATSD_URL", "udp://localhost"),
        ("DD_DOGSTATSD_URL", "unix://relative/path"),
        ("STATSD_DSN", "http://localhost:8125"),
        ("TALISKER_METRICS_PREFIX", "9lives"),
        ("TALISKER_ID_HEADER", "X Request Id"),
        ("DD_TAGS", ":novalue"),
        ("DD_TAGS", "key:"),
        ("TALISKER_ENDPOINT_NAMES", "10.0.0.5:8000"),
        ("TALISKER_LOG_LEVEL", "LOUD"),
        ("TALISKER_METRICS_MAX_TAG_VALUES", "0"),
    ],
)
def test_invalid_values_are_rejected(env, value):
    with pytest.raises(ConfigError) as info:
        load({env: value}, strict=True)
    assert info.value.variable == env


def test_destination_precedence():
    url = "udp://10.1.1.1:9125"
    dsn = "udp://10.2.2.2:8126/legacy.app"
    assert load({"DD_DOGSTATSD_URL": url, "DD_AGENT_HOST": "x", "STATSD_DSN": dsn}).destination == (
        Destination("udp", host="10.1.1.1", port=9125)
    )
    assert load({"DD_AGENT_HOST": "agent", "STATSD_DSN": dsn}).destination == Destination(
        "udp", host="agent", port=8125
    )
    assert load({"DD_DOGSTATSD_PORT": "9000", "STATSD_DSN": dsn}).destination == Destination(
        "udp", host="localhost", port=9000
    )
    cfg = load({"STATSD_DSN": dsn})
    assert cfg.destination == Destination("udp", host="10.2.2.2", port=8126)
    assert cfg.prefix == "legacy.app"
    assert load({"STATSD_DSN": dsn, "TALISKER_METRICS_PREFIX": "mine"}).prefix == "mine"
    assert load({"TALISKER_METRICS_PREFIX": ""}).prefix == ""


def test_unix_and_ipv6_destinations():
    assert str(load({"DD_DOGSTATSD_URL": "unix:///var/run/dsd.socket"}).destination) == (
        "unix:///var/run/dsd.socket"
    )
    assert str(load({"DD_DOGSTATSD_URL": "udp://[::1]:8125"}).destination) == "udp://[::1]:8125"


def test_statsd_dsn_user_info_is_never_kept():
    cfg = load({"STATSD_DSN": "udp://user:s3cret@statsd:8125/app"})
    assert "s3cret" not in str(cfg.destination)
    assert cfg.destination == Destination("udp", host="statsd", port=8125)


def test_docs_configuration_table_matches_the_declarations():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in page, (
        "docs/configuration.md is out of date: regenerate the table with "
        "`python -c 'import agent.config as c; print(c.markdown_table())'`"
    )


def test_a_bad_url_setting_never_shows_its_password(caplog):
    with caplog.at_level(logging.WARNING, logger="agent"):
        load({"STATSD_DSN": "http://bob:s3cret@statsd:8125/app"})
    (record,) = [r for r in caplog.records if r.name == "agent"]
    assert "s3cret" not in record.getMessage() and "bob" not in record.getMessage()
    assert "http://***@statsd:8125/app" in record.getMessage()
    with pytest.raises(ConfigError) as info:
        load({"DD_DOGSTATSD_URL": "tcp://bob:s3cret@x:1"}, strict=True)
    assert "s3cret" not in str(info.value)


# -- secrets never shown -------------------------------------------------------------

#: URL user info in the shapes people write it, and the fragments that must never show.
USER_INFO = [
    ("bob42:s3/cr3t@", ("bob42", "s3", "cr3t")),  # "/" in the password
    ("bob42:s3@cr3t@", ("bob42", "s3", "cr3t")),  # "@" in the password
    ("bob42:s3%40cr3t@", ("bob42", "s3", "cr3t")),  # "@" percent-encoded
    ("bob42:9000/cr3t@", ("bob42", "9000", "cr3t")),  # a password that starts like a port
    ("bob42@", ("bob42",)),  # a user without a password
]
URL_SETTINGS = [("DD_DOGSTATSD_URL", ""), ("STATSD_DSN", "/app")]


def _agent_messages(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "agent")


@pytest.mark.parametrize(("user_info", "secrets"), USER_INFO)
@pytest.mark.parametrize(("env", "path"), URL_SETTINGS)
def test_a_bad_url_setting_never_shows_its_user_info(caplog, env, path, user_info, secrets):
    value = f"tcp://{user_info}statsd:8125{path}"  # bad: the scheme
    with caplog.at_level(logging.WARNING, logger="agent"):
        load({env: value})
    with pytest.raises(ConfigError) as info:
        load({env: value}, strict=True)
    shown = _agent_messages(caplog) + "\n" + str(info.value)
    assert env in _agent_messages(caplog) and "tcp://***@statsd:8125" in str(info.value)
    for secret in secrets:
        assert secret not in shown


@pytest.mark.parametrize(("user_info", "secrets"), USER_INFO)
@pytest.mark.parametrize(("env", "path"), URL_SETTINGS)
def test_a_url_setting_with_user_info_is_read_as_its_host_and_port(env, path, user_info, secrets):
    cfg = load({env: f"udp://{user_info}statsd:8125{path}"}, strict=True)
    assert cfg.destination == Destination("udp", host="statsd", port=8125)
    for secret in secrets:
        assert secret not in str(cfg.destination) and secret not in repr(cfg.destination)


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("DD_AGENT_HOST", "bob42:s3cr3t@statsd"),
        ("DD_AGENT_HOST", "http://bob42:s3/cr3t@statsd"),
        ("TALISKER_ENDPOINT_NAMES", "http://bob42:s3cr3t@api:80"),
        ("DD_TAGS", "url:http://bob42:s3cr3t@api :bad"),  # the good tag is what is "used instead"
        ("TALISKER_ID_HEADER", "https://bob42:s3cr3t@api/"),
    ],
)
def test_a_url_like_value_in_any_setting_never_shows_its_user_info(caplog, env, value):
    with caplog.at_level(logging.WARNING, logger="agent"):
        load({env: value})
    with pytest.raises(ConfigError) as info:
        load({env: value}, strict=True)
    shown = _agent_messages(caplog) + "\n" + str(info.value)
    assert env in shown and "***@" in shown
    assert "bob42" not in shown and "s3" not in shown and "cr3t" not in shown


def test_endpoint_names_drop_user_info_from_the_netloc():
    cfg = load({"TALISKER_ENDPOINT_NAMES": "bob42:s3cr3t@10.0.0.5:8000=users-api"}, strict=True)
    assert cfg.endpoint_names == {"10.0.0.5:8000": "users-api"}


# -- DD_TAGS: bare tags ----------------------------------------------------------------


def test_a_tag_without_a_value_is_accepted(caplog):
    with caplog.at_level(logging.WARNING, logger="agent"):
        cfg = load({"DD_TAGS": "team:core,canary blue"}, strict=True)
    assert cfg.tags == ("team:core", "canary", "blue")
    assert not _agent_messages(caplog)


def test_a_bare_tag_is_sent_bare(install_agent, statsd):
    install_agent(DD_TAGS="team:core,canary")
    metrics.count("requests.count", 1, (("peer", "a"),))
    assert statsd.wait_total("talisker.requests.count", 1) == 1
    (m,) = statsd.find("talisker.requests.count")
    assert m.tags == ["peer:a", "team:core", "canary"]


def test_datadog_tags_as_the_datadog_client_reads_them_are_sent_once_each(install_agent, statsd):
    cfg = load({"DATADOG_TAGS": "team:core, blue sky ,,canary"}, strict=True)
    assert cfg.datadog_tags == ("team:core", "blue sky", "canary")  # split on commas only
    install_agent(DD_TAGS="team:core", DATADOG_TAGS="team:core,region:eu,canary", DD_ENV="prod")
    metrics.count("requests.count", 1, (("peer", "a"),))
    assert statsd.wait_total("talisker.requests.count", 1) == 1
    (m,) = statsd.find("talisker.requests.count")
    assert m.tags == ["peer:a", "env:prod", "team:core", "region:eu", "canary"]


def test_a_bad_datadog_tag_is_named_and_the_good_ones_kept(caplog):
    with caplog.at_level(logging.WARNING, logger="agent"):
        cfg = load({"DATADOG_TAGS": "team:core,:orphan,url:http://bob:s3cr3t@h/x"})
    assert cfg.datadog_tags[0] == "team:core" and len(cfg.datadog_tags) == 2
    assert "s3cr3t" not in cfg.datadog_tags[1]
    (warning,) = _agent_messages(caplog).splitlines()
    assert "DATADOG_TAGS" in warning and "':orphan'" in warning and "s3cr3t" not in warning
    with pytest.raises(ConfigError) as info:
        load({"DATADOG_TAGS": ":orphan"}, strict=True)
    assert info.value.variables == ["DATADOG_TAGS"]


# -- every problem named ---------------------------------------------------------------


def test_strict_mode_names_every_bad_variable():
    with pytest.raises(ConfigError) as info:
        load(
            {"TALISKER_REQUEST_TIMEOUT": "abc", "DD_DOGSTATSD_PORT": "99999", "DD_ENV": "prod"},
            strict=True,
        )
    assert info.value.variables == ["DD_DOGSTATSD_PORT", "TALISKER_REQUEST_TIMEOUT"]
    message = str(info.value)
    assert "TALISKER_REQUEST_TIMEOUT='abc'" in message and "DD_DOGSTATSD_PORT='99999'" in message


@pytest.mark.parametrize(
    ("env", "value", "bad"),
    [
        ("TALISKER_DISABLED_INSTRUMENTATIONS", "requests,nonsense", "'nonsense'"),
        ("DD_TAGS", "team:core,:orphan", "':orphan'"),
        ("TALISKER_ENDPOINT_NAMES", "db:5432=orders,users-api", "'users-api'"),
    ],
)
def test_a_bad_item_of_a_list_is_named(caplog, env, value, bad):
    with caplog.at_level(logging.WARNING, logger="agent"):
        load({env: value})
    with pytest.raises(ConfigError) as info:
        load({env: value}, strict=True)
    assert bad in _agent_messages(caplog)
    assert bad in str(info.value)


# -- the agent's own logger ------------------------------------------------------------

SHOW_LEVEL = """
import agent
from agent import _log, config
if {early}:  # the logger already exists when the configuration is installed
    _log.logger()
agent.install(config.load({{"TALISKER_LOG_LEVEL": {level!r}, "TALISKER_METRICS_ENABLED": "false"}}))
_log.debug("agent: a debug line")
_log.logger().info("agent: an info line")
"""


@pytest.mark.parametrize("early", [False, True])
def test_the_log_level_of_a_config_passed_to_install_is_used(early):
    debug = run_python(SHOW_LEVEL.format(level="DEBUG", early=early), {"TALISKER_ENABLED": "false"})
    assert "agent: a debug line" in debug.stderr and "agent: an info line" in debug.stderr
    quiet = run_python(
        SHOW_LEVEL.format(level="WARNING", early=early),
        {"TALISKER_ENABLED": "false", "TALISKER_LOG_LEVEL": "DEBUG"},
    )
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_agent_prefix_is_shown_once():
    env = {"TALISKER_ENABLED": "false", "TALISKER_LOG_LEVEL": "DEBUG"}
    proc = run_python(SHOW_LEVEL.format(level="DEBUG", early=False), env)
    (line,) = [line for line in proc.stderr.splitlines() if "a debug line" in line]
    assert line.endswith(" DEBUG agent: a debug line"), line


def test_each_instrumentation_installed_is_named_at_debug_with_its_version():
    import platform
    from importlib import metadata

    proc = run_python(
        "import agent, requests, psycopg2, flask",
        {"TALISKER_ENABLED": "true", "TALISKER_LOG_LEVEL": "DEBUG"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "agent: instrumented" in line]
    expected = {
        "urllib3": metadata.version("urllib3"),
        "requests": metadata.version("requests"),
        "psycopg2": metadata.version("psycopg2-binary"),
        "flask": metadata.version("flask"),
        "asyncio": platform.python_version(),  # wrapt imports it; its version is Python's
    }
    assert len(lines) == len(expected), proc.stderr
    for name, version in expected.items():
        (line,) = [line for line in lines if f"agent: instrumented {name} " in line]
        assert f"{name} {version} (" in line, line
    (urllib3_line,) = [line for line in lines if "instrumented urllib3" in line]
    assert "urllib3.connectionpool:HTTPConnectionPool.urlopen" in urllib3_line
    assert "urllib3.poolmanager:PoolManager.urlopen" in urllib3_line


def test_an_optional_module_imported_later_is_named_in_a_line_of_its_own():
    pytest.importorskip("uvloop", reason="uvloop is in the test extras (not Windows)")
    proc = run_python(
        "import agent, asyncio, uvloop",
        {"TALISKER_ENABLED": "true", "TALISKER_LOG_LEVEL": "DEBUG"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "agent: instrumented asyncio" in line]
    assert len(lines) == 2, proc.stderr  # asyncio's loop, then uvloop's beside it
    assert "uvloop:" not in lines[0]
    assert "uvloop:Loop.run_in_executor" in lines[1]


def test_nothing_is_logged_about_instrumentations_at_the_default_level():
    proc = run_python("import agent, requests", {"TALISKER_ENABLED": "true"})
    assert proc.returncode == 0 and proc.stderr == ""


def test_a_url_in_dd_tags_never_sends_its_user_info_or_query():
    cfg = config.load({"DD_TAGS": "team:core,url:https://bob:s3cret@h.example/x?token=abc123"})
    assert cfg.tags[0] == "team:core"
    assert "s3cret" not in cfg.tags[1] and "abc123" not in cfg.tags[1]
    assert cfg.tags[1].startswith("url:https://***@h.example/x?")


def test_a_request_timeout_beyond_the_deadline_ceiling_is_named_as_invalid():
    from agent.context import MAX_DEADLINE

    assert config.load({"TALISKER_REQUEST_TIMEOUT": "86400000"}).request_timeout == MAX_DEADLINE
    with pytest.raises(config.ConfigError, match="TALISKER_REQUEST_TIMEOUT"):
        config.load({"TALISKER_REQUEST_TIMEOUT": "86400001"}, strict=True)
