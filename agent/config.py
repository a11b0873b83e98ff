"""Configuration: every environment variable the agent reads, declared once.

Each :class:`Setting` carries its variable name, parser, default and a one-line
doc. The same declarations drive validation (:func:`load`), the reference table
in ``docs/configuration.md`` (:func:`markdown_table`) and ``talisker-run --check``.
The parsers come first: each takes the raw text and returns the value or
raises :class:`InvalidValue`, which says what a valid value looks like and what
of the value can still be used; :func:`load` turns it into a warning (or, for
``talisker-run``, an error), and :func:`redact` keeps secrets out of every
message. The metrics destination is a :class:`Destination`, defined here too: a
module of its own would cost start-up half a million instructions wherever
``DD_DOGSTATSD_URL`` is set.

This module is on the start-up path of every process that runs the agent, so it
imports nothing beyond ``os``: no ``typing``, no ``re``, no ``logging`` (a
warning about a bad value imports ``logging`` only when there is one to give).
"""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

import os

from agent import _log

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    T = TypeVar("T")

__all__ = [
    "INSTRUMENTATIONS",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Destination",
    "InvalidValue",
    "load",
    "redact",
]

#: instrumentation name -> the modules whose import triggers it, in the order
#: they are documented. An instrumentation may also patch modules that these
#: import first (urllib3's ``util.retry``): they are patched when it goes in. Kept
#: here, not in :mod:`agent.instrumentation`, so that start-up does not load that
#: package (the registry watches these, the configuration checks names against
#: them): adding an instrumentation is adding its module there and one line here.
TARGETS: "dict[str, tuple[str, ...]]" = {
    "urllib3": ("urllib3.connectionpool", "urllib3.poolmanager"),
    "requests": ("requests.sessions",),
    "psycopg2": ("psycopg2",),
    "flask": ("flask.app",),
    "httpx": ("httpx",),
    "aiohttp": ("aiohttp.client", "aiohttp.web_app"),
    "asyncio": ("asyncio.base_events", "uvloop"),
    "starlette": ("starlette.applications",),
}

#: instrumentation name -> modules whose import triggers its ``API_PATCHES`` when
#: the instrumentation itself is off (``TALISKER_ENABLED=false`` or listed in
#: ``TALISKER_DISABLED_INSTRUMENTATIONS``): an application written against the
#: agent's documented API (requests' ``metric_api_name=``) must keep working
#: when an operator turns the agent off.
API_TARGETS: "dict[str, tuple[str, ...]]" = {
    "requests": ("requests.sessions",),
}

#: The instrumentations' names, as ``TALISKER_DISABLED_INSTRUMENTATIONS`` takes them.
NAMES: "tuple[str, ...]" = tuple(TARGETS)

#: Instrumentations the agent knows, in the order they are documented.
INSTRUMENTATIONS = NAMES


# -- the parsers: each takes the raw text, returns the value or raises InvalidValue ----------


class InvalidValue(ValueError):
    """Raised by a parser: ``expected`` says what a valid value looks like.

    ``salvaged`` is the part of the value that could be used (for a list with
    bad items, the good items); it is used instead of the default.
    ``bad_items`` names the items of a list that were not valid.
    """

    def __init__(
        self, expected: "str", salvaged: "object" = None, bad_items: "tuple[str, ...]" = ()
    ) -> "None":
        super().__init__(expected)
        self.expected = expected
        self.salvaged = salvaged
        self.bad_items = bad_items


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: "str") -> "bool":
    """``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidValue("true or false")


def _number(raw: "str", expected: "str") -> "float":
    try:
        value = float(raw.strip())
    except ValueError:
        raise InvalidValue(expected) from None
    if value - value != 0.0:  # inf or nan (math.isfinite, without importing math)
        raise InvalidValue(expected)
    return value


def parse_milliseconds(raw: "str") -> "float | None":
    """A positive number of milliseconds, at most a day, returned in seconds; empty means none.

    A deadline further away behaves as none (``agent.context.MAX_DEADLINE``), so
    a longer value is named as invalid rather than silently doing nothing.
    """
    if not raw.strip():
        return None
    expected = "a positive number of milliseconds, at most 86400000 (a day)"
    value = _number(raw, expected)
    if not 0 < value <= 86_400_000:
        raise InvalidValue(expected)
    return value / 1000.0


def parse_interval(raw: "str") -> "float":
    """A number of seconds, zero or more."""
    value = _number(raw, "a number of seconds, 0 or more")
    if value < 0:
        raise InvalidValue("a number of seconds, 0 or more")
    return value


def parse_positive_seconds(raw: "str") -> "float":
    """A positive number of seconds."""
    value = _number(raw, "a positive number of seconds")
    if value <= 0:
        raise InvalidValue("a positive number of seconds")
    return value


def parse_positive_int(raw: "str") -> "int":
    """A whole number, 1 or more."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidValue("a whole number, 1 or more") from None
    if value < 1:
        raise InvalidValue("a whole number, 1 or more")
    return value


def parse_port(raw: "str") -> "int":
    """A port number, 1 to 65535."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidValue("a port number, 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise InvalidValue("a port number, 1 to 65535")
    return value


def parse_text(raw: "str") -> "str":
    """Any text; surrounding spaces are removed."""
    return raw.strip()


def parse_optional_text(raw: "str") -> "str | None":
    """Any text; empty means none."""
    return raw.strip() or None


def parse_host(raw: "str") -> "str":
    """A host name or address."""
    value = raw.strip()
    if not value or any(c in value for c in " /@?#"):
        raise InvalidValue("a host name or IP address")
    return value


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def parse_prefix(raw: "str") -> "str":
    """A metric name prefix: letters, digits, ``_`` and ``.``; empty for none."""
    value = raw.strip().strip(".")
    if value and (not value[0].isalpha() or not set(value) <= _NAME_CHARS):
        raise InvalidValue("a metric prefix: a letter, then letters, digits, '_' or '.'")
    return value


_HEADER_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
)


def parse_header_name(raw: "str") -> "str":
    """An HTTP header name (an RFC 9110 token)."""
    value = raw.strip()
    if not value or not set(value) <= _HEADER_CHARS:
        raise InvalidValue("an HTTP header name such as X-Request-Id")
    return value


def parse_log_level(raw: "str") -> "str":
    """One of DEBUG, INFO, WARNING, ERROR, CRITICAL."""
    value = _log.level_name(raw)
    if value is None:
        raise InvalidValue("one of " + ", ".join(_log.LEVELS))
    return value


def parse_instrumentations(raw: "str") -> "frozenset[str]":
    """A comma list of instrumentation names, or ``all``."""
    items = [n.strip() for n in raw.split(",") if n.strip()]
    names = {n.lower() for n in items}
    if "all" in names:
        return frozenset(INSTRUMENTATIONS)
    unknown = tuple(n for n in items if n.lower() not in INSTRUMENTATIONS)
    if unknown:
        raise InvalidValue(
            "a comma list of " + ", ".join(INSTRUMENTATIONS) + ", or all",
            salvaged=frozenset(names.intersection(INSTRUMENTATIONS)),
            bad_items=unknown,
        )
    return frozenset(names)


def parse_timing_type(raw: "str") -> "str":
    """``distribution`` or ``histogram``."""
    value = raw.strip().lower()
    if value not in ("distribution", "histogram"):
        raise InvalidValue("distribution or histogram")
    return value


def parse_deadline_headers(raw: "str") -> "str":
    """``absolute``, ``relative`` or ``both``."""
    value = raw.strip().lower()
    if value not in ("absolute", "relative", "both"):
        raise InvalidValue("absolute, relative or both")
    return value


def parse_retry_policy(raw: "str") -> "dict[str, int]":
    """``peer:retries`` pairs separated by commas; ``*`` is any other peer."""
    policy: dict[str, int] = {}
    bad = []
    for item in raw.split(","):
        if not item.strip():
            continue
        peer, sep, count = item.strip().rpartition(":")
        peer = peer.strip()
        try:
            retries = int(count.strip())
        except ValueError:
            retries = -1
        if not sep or not peer or not 0 <= retries <= 10:
            bad.append(item.strip())
            continue
        policy[peer] = retries
    if bad:
        raise InvalidValue(
            "peer:retries pairs (0 to 10) separated by commas, * for any other peer",
            salvaged=policy,
            bad_items=tuple(bad),
        )
    return policy


def parse_circuit_breakers(raw: "str") -> "dict[str, tuple[float, int, float, float]]":
    """``peer[=ratio/minimum/break/window]`` items separated by commas; ``*`` any other peer."""
    from agent.http.breaker import DEFAULTS

    breakers: dict[str, tuple[float, int, float, float]] = {}
    bad = []
    for item in raw.split(","):
        if not item.strip():
            continue
        peer, sep, spec = item.strip().partition("=")
        peer = peer.strip()
        settings: tuple[float, int, float, float] | None = DEFAULTS
        if sep:
            parts = spec.split("/")
            try:
                ratio, minimum, break_s, window_s = (
                    float(parts[0]),
                    int(parts[1]),
                    float(parts[2]),
                    float(parts[3]),
                )
                ok = 0 < ratio < 1 and minimum > 0 and break_s > 0 and window_s > 0
                settings = (ratio, minimum, break_s, window_s) if ok and len(parts) == 4 else None
            except (ValueError, IndexError):
                settings = None
        if not peer or settings is None:
            bad.append(item.strip())
            continue
        breakers[peer] = settings
    if bad:
        raise InvalidValue(
            "peer or peer=ratio/minimum/break seconds/window seconds items separated by commas "
            "(users-api=0.5/20/30/10), * for any other peer",
            salvaged=breakers,
            bad_items=tuple(bad),
        )
    return breakers


def parse_tags(raw: "str") -> "tuple[str, ...]":
    """``key:value`` pairs or bare ``key`` tags, separated by commas or spaces.

    As the Datadog agent and ddtrace read ``DD_TAGS``; DogStatsD carries a bare tag.
    """
    return _tag_items(raw.replace(",", " ").split(), "separated by commas or spaces")


def parse_datadog_tags(raw: "str") -> "tuple[str, ...]":
    """``key:value`` pairs or bare ``key`` tags, separated by commas.

    As the Datadog client's DogStatsD reads ``DATADOG_TAGS`` (a space is part of a
    tag there, and becomes ``_`` once the tag is sanitised).
    """
    return _tag_items(
        [item.strip() for item in raw.split(",") if item.strip()], "separated by commas"
    )


def _tag_items(items: "list[str]", separated: "str") -> "tuple[str, ...]":
    tags = []
    bad = []
    for item in items:
        key, sep, value = item.partition(":")
        if not key or (sep and not value):
            bad.append(item)
            continue
        if "@" in value or "%40" in value.lower() or "?" in value:
            tags.append(f"{key}:{redact(value)}")  # a URL's user info or query: never sent
        else:
            tags.append(item)
    if bad:
        raise InvalidValue(
            f"key:value pairs or bare keys, {separated}",
            salvaged=tuple(tags),
            bad_items=tuple(bad),
        )
    return tuple(tags)


def parse_endpoint_names(raw: "str") -> "dict[str, str]":
    """``netloc=name`` pairs separated by commas, e.g. ``10.0.0.5:8000=users-api``."""
    names: dict[str, str] = {}
    bad = []
    for item in raw.split(","):
        if not item.strip():
            continue
        netloc, sep, name = item.partition("=")
        # A netloc never matches with user info in it (peers are host:port); never keep it.
        netloc, name = netloc.rpartition("@")[2].strip().lower(), name.strip()
        if not sep or not netloc or not name:
            bad.append(item.strip())
            continue
        names[netloc] = name
    if bad:
        raise InvalidValue(
            "netloc=name pairs separated by commas", salvaged=names, bad_items=tuple(bad)
        )
    return names


def redact(text: "str") -> "str":
    """``text`` as it may be shown in a message: user info and URL query strings as ``***``.

    Cautious by design, for any setting, URL or not: everything before the last
    ``@`` (or ``%40``) is taken as user info, since a password may hold ``/``,
    ``@``, ``:`` or ``,``. ``udp://bob:pa/ss@statsd:8125`` gives
    ``udp://***@statsd:8125``.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    at = max(rest.rfind("@"), rest.lower().rfind("%40"))
    if at >= 0:
        rest = "***" + rest[at:]
    if sep and "?" in rest:
        rest = rest.partition("?")[0] + "?***"
    return f"{scheme}{sep}{rest}"


class ConfigError(ValueError):
    """Environment variables have values the agent cannot use (strict mode).

    ``problems`` holds one ``(variable, message)`` pair per bad variable, in
    the order of :data:`SETTINGS`; ``str()`` is their messages, one a line.
    """

    def __init__(self, problems: "list[tuple[str, str]]") -> "None":
        super().__init__("\n".join(message for _, message in problems))
        self.problems = problems
        self.variables = [variable for variable, _ in problems]
        self.variable = self.variables[0]


class Setting:
    """One environment variable: its name, parser, default and documentation.

    Declared as a class attribute of :class:`Config` and taken off the class once
    :data:`SETTINGS` holds it: on an instance the parsed value is a plain attribute
    that shadows nothing, which Python 3.12 and 3.13 read with a specialised
    instruction (a class attribute of the same name makes every read the generic
    lookup, 250 instructions more; the request path reads five).
    """

    __slots__ = ("attr", "default", "doc", "env", "parse", "shown_default", "unit")

    def __init__(
        self,
        env: "str",
        parse: "Callable[[str], Any]",
        default: "Any",
        doc: "str",
        shown_default: "str | None" = None,
        unit: "str" = "",
    ) -> "None":
        self.env = env
        self.parse = parse
        self.default = default
        self.doc = doc
        self.attr = ""
        self.shown_default = shown_default
        self.unit = unit  # "ms" (parsed to seconds) or "s": how --check shows the value

    def __set_name__(self, owner: "type", name: "str") -> "None":
        self.attr = name

    def describe_default(self) -> "str":
        """The default as the documentation shows it."""
        if self.shown_default is not None:
            return self.shown_default
        return describe(self.default)

    def show(self, value: "object") -> "str":
        """A parsed value as it is set in the environment, with its unit (``1000 ms``)."""
        if value is None:
            return "none"
        if self.unit == "ms" and isinstance(value, (int, float)):
            value = round(value * 1000, 6)  # parsed to seconds; round off the float error
        text = describe(value)
        return f"{text} {self.unit}" if self.unit else text


def setting(
    env: "str",
    parse: "Callable[[str], T]",
    default: "T",
    doc: "str",
    shown_default: "str | None" = None,
    unit: "str" = "",
) -> "T":
    """Declare a setting. Typed as its value so ``config.enabled`` is a ``bool``."""
    return Setting(env, parse, default, doc, shown_default, unit)  # type: ignore[return-value]


def describe(value: "object") -> "str":
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


_DSD_SCHEMES = ("udp", "unix", "unixgram", "unixstream")


class Destination:
    """Where metrics go: ``udp`` with a host and port, or a unix socket path."""

    __slots__ = ("host", "path", "port", "prefix", "scheme")

    def __init__(
        self,
        scheme: "str",
        host: "str | None" = None,
        port: "int | None" = None,
        path: "str | None" = None,
        prefix: "str | None" = None,
    ) -> "None":
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path
        self.prefix = prefix  # only STATSD_DSN carries one

    def __repr__(self) -> "str":
        return f"Destination({self})"

    def __str__(self) -> "str":
        if self.scheme == "udp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"udp://{host}:{self.port}"
        return f"{self.scheme}://{self.path}"

    def __eq__(self, other: "object") -> "bool":
        return isinstance(other, Destination) and str(self) == str(other)

    def __hash__(self) -> "int":
        return hash(str(self))


def _without_user_info(rest: "str") -> "str":
    """What follows ``scheme://`` without its user info, never kept.

    The user info ends at the last ``@`` before any query string: a password
    may hold a ``/`` or an ``@`` that its author did not percent-encode.
    """
    before_query = rest.partition("?")[0]
    if "@" in before_query:
        return rest[before_query.rindex("@") + 1 :]
    return rest


def _split_host_port(netloc: "str", default_port: "int | None") -> "tuple[str, int]":
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = netloc.partition(":")
    if not host:
        raise InvalidValue("a URL with a host")
    if port_text:
        return host, parse_port(port_text)
    if default_port is None:
        raise InvalidValue("a URL with a host and a port")
    return host, default_port


def parse_dogstatsd_url(raw: "str") -> "Destination | None":
    """``udp://host:port`` or ``unix:///path/to/dsd.socket``; empty means unset."""
    value = raw.strip()
    if not value:
        return None
    expected = "udp://host:port or unix:///path/to/dsd.socket"
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DSD_SCHEMES:
        raise InvalidValue(expected)
    if scheme == "udp":
        try:
            host, port = _split_host_port(_without_user_info(rest).partition("/")[0], None)
        except InvalidValue:
            raise InvalidValue(expected) from None
        return Destination("udp", host=host, port=port)
    if not rest.startswith("/"):
        raise InvalidValue(expected)
    return Destination(scheme, path=rest)


def parse_statsd_dsn(raw: "str") -> "Destination | None":
    """talisker's ``udp://host:port/prefix``; empty means unset."""
    value = raw.strip()
    if not value:
        return None
    expected = "udp://host:port/prefix"
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() != "udp":
        raise InvalidValue(expected)
    netloc, _, path = _without_user_info(rest).partition("/")
    try:
        host, port = _split_host_port(netloc, 8125)
        prefix = parse_prefix(path.partition("?")[0].replace("/", "."))
    except InvalidValue:
        raise InvalidValue(expected) from None
    return Destination("udp", host=host, port=port, prefix=prefix or None)


# -- the declarations -----------------------------------------------------------


class Config:
    """The agent's effective configuration, read from the environment by :func:`load`.

    Its body declares the settings (:class:`Setting`), which :data:`SETTINGS` then
    holds in place of the class; instance attributes are the parsed values.
    Instances are treated as immutable.
    """

    enabled = setting(
        "TALISKER_ENABLED", parse_bool, True, "Master switch: `false` turns the agent off."
    )
    disabled_instrumentations: "frozenset[str]" = setting(
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
    tags: "tuple[str, ...]" = setting(
        "DD_TAGS",
        parse_tags,
        (),
        "Constant tags: `key:value` pairs or bare `key` tags, separated by commas or spaces.",
        shown_default="empty",
    )
    datadog_tags: "tuple[str, ...]" = setting(
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
    endpoint_names: "dict[str, str]" = setting(
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
    retry_policy: "dict[str, int]" = setting(
        "TALISKER_RETRY_POLICY",
        parse_retry_policy,
        {},
        "Opt-in retries of the agent's: `peer:retries` pairs, `*` for any other peer "
        "(`users-api:3,*:0`). Replaces only the library's default retries; see resilience.",
        shown_default="empty",
    )
    circuit_breaker: "dict[str, tuple[float, int, float, float]]" = setting(
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

    def __init__(self, values: "Mapping[str, object]", sources: "Mapping[str, str]") -> "None":
        self.__dict__.update(values)
        #: setting attribute -> "env" or "default" (or "invalid" when the default replaced it)
        self.sources = dict(sources)
        #: A retry policy or a circuit breaker is set: what a request path tests as one
        #: bool (an empty dict's truth is the generic TO_BOOL, a bool's the specialised one).
        self.resilient = bool(values.get("retry_policy") or values.get("circuit_breaker"))

    def __eq__(self, other: "object") -> "bool":
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, s.attr) == getattr(other, s.attr) for s in SETTINGS)

    __hash__ = None  # type: ignore[assignment]

    @property
    def destination(self) -> "Destination":
        """Where metrics go, by the documented precedence."""
        if self.dogstatsd_url is not None:
            return self.dogstatsd_url
        agent_set = self.sources["agent_host"] == "env" or self.sources["dogstatsd_port"] == "env"
        if not agent_set and self.statsd_dsn is not None:
            return self.statsd_dsn
        return Destination("udp", host=self.agent_host, port=self.dogstatsd_port)

    @property
    def prefix(self) -> "str":
        """``TALISKER_METRICS_PREFIX``, else the ``STATSD_DSN`` prefix, else ``talisker``."""
        if self.sources["metrics_prefix"] != "env":
            dsn = self.statsd_dsn
            if dsn is not None and dsn.prefix and self.destination is dsn:
                return dsn.prefix
        return self.metrics_prefix

    def instrumentation_enabled(self, name: "str") -> "bool":
        """Whether the named instrumentation is to be installed."""
        return self.enabled and name not in self.disabled_instrumentations


#: The configuration the agent was installed with; ``None`` when it is not active.
#: Wrappers read it on every call and pass through when it is ``None``.
current: "Config | None" = None

SETTINGS: "tuple[Setting, ...]" = tuple(v for v in vars(Config).values() if isinstance(v, Setting))
for _declared in SETTINGS:  # the instance's values shadow nothing (see Setting)
    delattr(Config, _declared.attr)
del _declared


def load(environ: "Mapping[str, str] | None" = None, strict: "bool" = False) -> "Config":
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


def _problem(exc: "InvalidValue") -> "str":
    """What is wrong with a value: its bad items, if a list, and what was expected."""
    if not exc.bad_items:
        return f"expected {exc.expected}"
    items = ", ".join(repr(redact(item)) for item in exc.bad_items)
    noun = "bad item" if len(exc.bad_items) == 1 else "bad items"
    return f"{noun} {items}; expected {exc.expected}"


def markdown_table() -> "str":
    """The configuration reference table for ``docs/configuration.md``."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.env}` | {_md_default(s)} | {s.doc} |")
    return "\n".join(lines) + "\n"


def _md_default(s: "Setting") -> "str":
    shown = s.describe_default()
    return shown if shown in ("none", "empty") else f"`{shown}`"
