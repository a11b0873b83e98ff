"""Configuration: every environment variable the agent reads, declared once.

Each :class:`Setting` carries its variable name, parser, default and a one-line
doc. The same declarations drive validation (:func:`load`), the reference table
in ``docs/configuration.md`` (:func:`markdown_table`) and ``talisker-run --check``.
The parsers are in :mod:`agent.config.parsers`; the metrics destination's type
and its two URL forms in :mod:`agent.metrics.destination`.

This module is on the start-up path of every process that runs the agent, so it
imports nothing beyond ``os``: no ``typing``, no ``re``, no ``logging`` (a
warning about a bad value imports ``logging`` only when there is one to give).
"""

from __future__ import annotations

import os

from agent import _log
from agent.config.parsers import (
    INSTRUMENTATIONS,
    InvalidValue,
    parse_bool,
    parse_circuit_breakers,
    parse_datadog_tags,
    parse_deadline_headers,
    parse_endpoint_names,
    parse_header_name,
    parse_host,
    parse_instrumentations,
    parse_interval,
    parse_log_level,
    parse_milliseconds,
    parse_optional_text,
    parse_port,
    parse_positive_int,
    parse_positive_seconds,
    parse_prefix,
    parse_retry_policy,
    parse_tags,
    parse_timing_type,
    redact,
)

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    from agent.metrics.destination import Destination

    T = TypeVar("T")

__all__ = [
    "INSTRUMENTATIONS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "InvalidValue",
    "load",
    "redact",
]


class ConfigError(ValueError):
    """Environment variables have values the agent cannot use (strict mode).

    ``problems`` holds one ``(variable, message)`` pair per bad variable, in
    the order of :data:`SETTINGS`; ``str()`` is their messages, one a line.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(message for _, message in problems))
        self.problems = problems
        self.variables = [variable for variable, _ in problems]
        self.variable = self.variables[0]


class Setting:
    """One environment variable: its name, parser, default and documentation.

    Declared as a class attribute of :class:`Config`; on an instance the parsed
    value is a plain attribute, so reading configuration costs a dict lookup.
    """

    __slots__ = ("attr", "default", "doc", "env", "parse", "shown_default", "unit")

    def __init__(
        self,
        env: str,
        parse: Callable[[str], Any],
        default: Any,
        doc: str,
        shown_default: str | None = None,
        unit: str = "",
    ) -> None:
        self.env = env
        self.parse = parse
        self.default = default
        self.doc = doc
        self.attr = ""
        self.shown_default = shown_default
        self.unit = unit  # "ms" (parsed to seconds) or "s": how --check shows the value

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        raise AttributeError(self.attr)  # pragma: no cover - load() sets every attribute

    def describe_default(self) -> str:
        """The default as the documentation shows it."""
        if self.shown_default is not None:
            return self.shown_default
        return describe(self.default)

    def show(self, value: object) -> str:
        """A parsed value as it is set in the environment, with its unit (``1000 ms``)."""
        if value is None:
            return "none"
        if self.unit == "ms" and isinstance(value, (int, float)):
            value = round(value * 1000, 6)  # parsed to seconds; round off the float error
        text = describe(value)
        return f"{text} {self.unit}" if self.unit else text


def setting(
    env: str,
    parse: Callable[[str], T],
    default: T,
    doc: str,
    shown_default: str | None = None,
    unit: str = "",
) -> T:
    """Declare a setting. Typed as its value so ``config.enabled`` is a ``bool``."""
    return Setting(env, parse, default, doc, shown_default, unit)  # type: ignore[return-value]


def describe(value: object) -> str:
    """Render a parsed value the way a user would write it in the environment."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def parse_dogstatsd_url(raw: str) -> Destination | None:
    """``udp://host:port`` or ``unix:///path/to/dsd.socket``; empty means unset."""
    from agent.metrics.destination import parse_dogstatsd_url

    return parse_dogstatsd_url(raw)


def parse_statsd_dsn(raw: str) -> Destination | None:
    """talisker's ``udp://host:port/prefix``; empty means unset."""
    from agent.metrics.destination import parse_statsd_dsn

    return parse_statsd_dsn(raw)


# -- the declarations -----------------------------------------------------------


class Config:
    """The agent's effective configuration, read from the environment by :func:`load`.

    Class attributes are the :class:`Setting` declarations; instance attributes
    are the parsed values. Instances are treated as immutable.
    """

    enabled = setting(
        "TALISKER_ENABLED", parse_bool, True, "Master switch: `false` turns the agent off."
    )
    disabled_instrumentations: frozenset[str] = setting(
        "TALISKER_DISABLED_INSTRUMENTATIONS",
        parse_instrumentations,
        frozenset(),
        "Comma list of instrumentations to leave off: `urllib3`, `requests`, `psycopg2`, "
        "`flask`, `httpx`, `aiohttp`, `asyncio`, `starlette`, or `all`.",
        shown_default="empty",
    )
    metrics_enabled = setting(
        "TALISKER_METRICS_ENABLED",
        parse_bool,
        True,
        "`false`: request ids, deadlines and timeouts still work; no metric is sent.",
    )
    dogstatsd_url = setting(
        "DD_DOGSTATSD_URL",
        parse_dogstatsd_url,
        None,
        "Metrics destination: `udp://host:port` or `unix:///path/to/dsd.socket`. "
        "Takes precedence over the three below.",
    )
    agent_host = setting(
        "DD_AGENT_HOST",
        parse_host,
        "localhost",
        "DogStatsD host, when `DD_DOGSTATSD_URL` is unset. Resolved once, off the request path.",
    )
    dogstatsd_port = setting(
        "DD_DOGSTATSD_PORT", parse_port, 8125, "DogStatsD UDP port, with `DD_AGENT_HOST`."
    )
    statsd_dsn = setting(
        "STATSD_DSN",
        parse_statsd_dsn,
        None,
        "talisker's `udp://host:port/prefix`, used when none of the three above is set.",
    )
    service = setting(
        "DD_SERVICE", parse_optional_text, None, "Constant tag `service:` on every metric."
    )
    env = setting("DD_ENV", parse_optional_text, None, "Constant tag `env:` on every metric.")
    version = setting(
        "DD_VERSION", parse_optional_text, None, "Constant tag `version:` on every metric."
    )
    tags: tuple[str, ...] = setting(
        "DD_TAGS",
        parse_tags,
        (),
        "Constant tags: `key:value` pairs or bare `key` tags, separated by commas or spaces.",
        shown_default="empty",
    )
    datadog_tags: tuple[str, ...] = setting(
        "DATADOG_TAGS",
        parse_datadog_tags,
        (),
        "More constant tags, separated by commas, as the Datadog client reads them.",
        shown_default="empty",
    )
    metrics_prefix = setting(
        "TALISKER_METRICS_PREFIX",
        parse_prefix,
        "talisker",
        "Prefix of every metric name (`talisker.requests.count`); empty for none. "
        "Unset, a `STATSD_DSN` prefix is used.",
    )
    max_tag_values = setting(
        "TALISKER_METRICS_MAX_TAG_VALUES",
        parse_positive_int,
        100,
        "Distinct values kept per tag key and metric; later values are sent as `other`.",
    )
    timing_type = setting(
        "TALISKER_METRICS_TIMING_TYPE",
        parse_timing_type,
        "distribution",
        "DogStatsD type of latency and CPU metrics: `distribution` or `histogram`.",
    )
    flush_interval = setting(
        "TALISKER_METRICS_FLUSH_INTERVAL",
        parse_positive_seconds,
        1.0,
        "Seconds between sends from the background thread; metrics are also sent at exit.",
        unit="s",
    )
    request_timeout = setting(
        "TALISKER_REQUEST_TIMEOUT",
        parse_milliseconds,
        None,
        "Milliseconds, at most a day: the deadline of every incoming request.",
        unit="ms",
    )
    soft_request_timeout = setting(
        "TALISKER_SOFT_REQUEST_TIMEOUT",
        parse_milliseconds,
        None,
        "Milliseconds: slower incoming requests are logged as a warning and counted.",
        unit="ms",
    )
    endpoint_names: dict[str, str] = setting(
        "TALISKER_ENDPOINT_NAMES",
        parse_endpoint_names,
        {},
        "`netloc=name` pairs, e.g. `10.0.0.5:8000=users-api`: the `peer` tag of calls to them.",
        shown_default="empty",
    )
    runtime_metrics_interval = setting(
        "TALISKER_RUNTIME_METRICS_INTERVAL",
        parse_interval,
        10.0,
        "Seconds between process CPU metrics; `0` turns them off.",
        unit="s",
    )
    log_level = setting(
        "TALISKER_LOG_LEVEL",
        parse_log_level,
        "WARNING",
        "Level of the agent's own logger, `agent`.",
    )
    id_header = setting(
        "TALISKER_ID_HEADER", parse_header_name, "X-Request-Id", "Header carrying the request id."
    )
    deadline_header = setting(
        "TALISKER_DEADLINE_HEADER",
        parse_header_name,
        "X-Request-Deadline",
        "Header carrying the absolute deadline.",
    )
    deadline_headers = setting(
        "TALISKER_DEADLINE_HEADERS",
        parse_deadline_headers,
        "both",
        "Deadline headers sent on outgoing calls: `absolute` (the deadline header, an "
        "ISO 8601 time), `relative` (`X-Request-Timeout`, the seconds left, as aio-request "
        "reads it) or `both`.",
    )
    retry_after_max = setting(
        "TALISKER_RETRY_AFTER_MAX",
        parse_positive_seconds,
        10.0,
        "Seconds: under a deadline, the longest a retry waits for a `Retry-After` (longer "
        "ones wait this long); a wait that would end after the deadline is not made.",
        unit="s",
    )
    retry_policy: dict[str, int] = setting(
        "TALISKER_RETRY_POLICY",
        parse_retry_policy,
        {},
        "Opt-in retries of the agent's: `peer:retries` pairs, `*` for any other peer "
        "(`users-api:3,*:0`). Replaces only the library's default retries; see resilience.",
        shown_default="empty",
    )
    circuit_breaker: dict[str, tuple[float, int, float, float]] = setting(
        "TALISKER_CIRCUIT_BREAKER",
        parse_circuit_breakers,
        {},
        "Opt-in circuit breakers: `peer` or `peer=ratio/minimum/break/window` items, `*` for "
        "any other peer (`users-api=0.5/20/30/10`); see resilience.",
        shown_default="empty",
    )
    compose_request_id = setting(
        "TALISKER_COMPOSE_REQUEST_ID",
        parse_bool,
        False,
        "`true`: an incoming id becomes `<new id>-<incoming id>` (talisker's fan-out form).",
    )

    def __init__(self, values: Mapping[str, object], sources: Mapping[str, str]) -> None:
        self.__dict__.update(values)
        #: setting attribute -> "env" or "default" (or "invalid" when the default replaced it)
        self.sources = dict(sources)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, s.attr) == getattr(other, s.attr) for s in SETTINGS)

    __hash__ = None  # type: ignore[assignment]

    @property
    def destination(self) -> Destination:
        """Where metrics go, by the documented precedence."""
        if self.dogstatsd_url is not None:
            return self.dogstatsd_url
        agent_set = self.sources["agent_host"] == "env" or self.sources["dogstatsd_port"] == "env"
        if not agent_set and self.statsd_dsn is not None:
            return self.statsd_dsn
        from agent.metrics.destination import Destination

        return Destination("udp", host=self.agent_host, port=self.dogstatsd_port)

    @property
    def prefix(self) -> str:
        """``TALISKER_METRICS_PREFIX``, else the ``STATSD_DSN`` prefix, else ``talisker``."""
        if self.sources["metrics_prefix"] != "env":
            dsn = self.statsd_dsn
            if dsn is not None and dsn.prefix and self.destination is dsn:
                return dsn.prefix
        return self.metrics_prefix

    def instrumentation_enabled(self, name: str) -> bool:
        """Whether the named instrumentation is to be installed."""
        return self.enabled and name not in self.disabled_instrumentations


#: The configuration the agent was installed with; ``None`` when it is not active.
#: Wrappers read it on every call and pass through when it is ``None``.
current: Config | None = None

SETTINGS: tuple[Setting, ...] = tuple(v for v in vars(Config).values() if isinstance(v, Setting))


def load(environ: Mapping[str, str] | None = None, strict: bool = False) -> Config:
    """Read every setting from ``environ`` (default ``os.environ``).

    A bad value is named in one warning (variable, value, its bad items, what
    is used instead) and the default, or the usable part of the value, is used.
    With ``strict=True`` a :class:`ConfigError` naming every bad value is raised
    instead. No message shows URL user info (see :func:`redact`).
    """
    if environ is None:
        environ = os.environ
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    errors: list[tuple[str, str]] = []
    for s in SETTINGS:
        raw = environ.get(s.env)
        if raw is None:
            values[s.attr], sources[s.attr] = s.default, "default"
            continue
        try:
            values[s.attr], sources[s.attr] = s.parse(raw), "env"
        except InvalidValue as exc:
            used = s.default if exc.salvaged is None else exc.salvaged
            values[s.attr], sources[s.attr] = used, "invalid"
            shown = f"{s.env}={redact(raw)!r} is not valid"
            detail = _problem(exc)
            errors.append((s.env, f"{shown}: {detail}"))
            warnings.append(f"agent: {shown} ({detail}); using {redact(describe(used))!r} instead")
    if strict and errors:
        raise ConfigError(errors)
    if warnings:
        for message in warnings:
            _log.logger().warning("%s", message)
    return Config(values, sources)


def _problem(exc: InvalidValue) -> str:
    """What is wrong with a value: its bad items, if a list, and what was expected."""
    if not exc.bad_items:
        return f"expected {exc.expected}"
    items = ", ".join(repr(redact(item)) for item in exc.bad_items)
    noun = "bad item" if len(exc.bad_items) == 1 else "bad items"
    return f"{noun} {items}; expected {exc.expected}"


def markdown_table() -> str:
    """The configuration reference table for ``docs/configuration.md``."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.env}` | {_md_default(s)} | {s.doc} |")
    return "\n".join(lines) + "\n"


def _md_default(s: Setting) -> str:
    shown = s.describe_default()
    return shown if shown in ("none", "empty") else f"`{shown}`"
