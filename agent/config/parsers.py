"""The parsers of the settings' values: each takes the raw text, returns the value or raises.

:class:`InvalidValue` says what a valid value looks like and what of the value
can still be used; :func:`agent.config.load` turns it into a warning (or, for
``talisker-run``, an error). :func:`redact` keeps secrets out of every message.
"""

from __future__ import annotations

from agent import _log
from agent.instrumentation import NAMES

#: Instrumentations the agent knows, in the order they are documented.
INSTRUMENTATIONS = NAMES

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms


class InvalidValue(ValueError):
    """Raised by a parser: ``expected`` says what a valid value looks like.

    ``salvaged`` is the part of the value that could be used (for a list with
    bad items, the good items); it is used instead of the default.
    ``bad_items`` names the items of a list that were not valid.
    """

    def __init__(
        self, expected: str, salvaged: object = None, bad_items: tuple[str, ...] = ()
    ) -> None:
        super().__init__(expected)
        self.expected = expected
        self.salvaged = salvaged
        self.bad_items = bad_items


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: str) -> bool:
    """``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidValue("true or false")


def _number(raw: str, expected: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise InvalidValue(expected) from None
    if value - value != 0.0:  # inf or nan (math.isfinite, without importing math)
        raise InvalidValue(expected)
    return value


def parse_milliseconds(raw: str) -> float | None:
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


def parse_interval(raw: str) -> float:
    """A number of seconds, zero or more."""
    value = _number(raw, "a number of seconds, 0 or more")
    if value < 0:
        raise InvalidValue("a number of seconds, 0 or more")
    return value


def parse_positive_seconds(raw: str) -> float:
    """A positive number of seconds."""
    value = _number(raw, "a positive number of seconds")
    if value <= 0:
        raise InvalidValue("a positive number of seconds")
    return value


def parse_positive_int(raw: str) -> int:
    """A whole number, 1 or more."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidValue("a whole number, 1 or more") from None
    if value < 1:
        raise InvalidValue("a whole number, 1 or more")
    return value


def parse_port(raw: str) -> int:
    """A port number, 1 to 65535."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidValue("a port number, 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise InvalidValue("a port number, 1 to 65535")
    return value


def parse_text(raw: str) -> str:
    """Any text; surrounding spaces are removed."""
    return raw.strip()


def parse_optional_text(raw: str) -> str | None:
    """Any text; empty means none."""
    return raw.strip() or None


def parse_host(raw: str) -> str:
    """A host name or address."""
    value = raw.strip()
    if not value or any(c in value for c in " /@?#"):
        raise InvalidValue("a host name or IP address")
    return value


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def parse_prefix(raw: str) -> str:
    """A metric name prefix: letters, digits, ``_`` and ``.``; empty for none."""
    value = raw.strip().strip(".")
    if value and (not value[0].isalpha() or not set(value) <= _NAME_CHARS):
        raise InvalidValue("a metric prefix: a letter, then letters, digits, '_' or '.'")
    return value


_HEADER_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
)


def parse_header_name(raw: str) -> str:
    """An HTTP header name (an RFC 9110 token)."""
    value = raw.strip()
    if not value or not set(value) <= _HEADER_CHARS:
        raise InvalidValue("an HTTP header name such as X-Request-Id")
    return value


def parse_log_level(raw: str) -> str:
    """One of DEBUG, INFO, WARNING, ERROR, CRITICAL."""
    value = _log.level_name(raw)
    if value is None:
        raise InvalidValue("one of " + ", ".join(_log.LEVELS))
    return value


def parse_instrumentations(raw: str) -> frozenset[str]:
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


def parse_timing_type(raw: str) -> str:
    """``distribution`` or ``histogram``."""
    value = raw.strip().lower()
    if value not in ("distribution", "histogram"):
        raise InvalidValue("distribution or histogram")
    return value


def parse_deadline_headers(raw: str) -> str:
    """``absolute``, ``relative`` or ``both``."""
    value = raw.strip().lower()
    if value not in ("absolute", "relative", "both"):
        raise InvalidValue("absolute, relative or both")
    return value


def parse_retry_policy(raw: str) -> dict[str, int]:
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


def parse_circuit_breakers(raw: str) -> dict[str, tuple[float, int, float, float]]:
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


def parse_tags(raw: str) -> tuple[str, ...]:
    """``key:value`` pairs or bare ``key`` tags, separated by commas or spaces.

    As the Datadog agent and ddtrace read ``DD_TAGS``; DogStatsD carries a bare tag.
    """
    return _tag_items(raw.replace(",", " ").split(), "separated by commas or spaces")


def parse_datadog_tags(raw: str) -> tuple[str, ...]:
    """``key:value`` pairs or bare ``key`` tags, separated by commas.

    As the Datadog client's DogStatsD reads ``DATADOG_TAGS`` (a space is part of a
    tag there, and becomes ``_`` once the tag is sanitised).
    """
    return _tag_items(
        [item.strip() for item in raw.split(",") if item.strip()], "separated by commas"
    )


def _tag_items(items: list[str], separated: str) -> tuple[str, ...]:
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


def parse_endpoint_names(raw: str) -> dict[str, str]:
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


def redact(text: str) -> str:
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
