"""Where metrics go: the :class:`Destination` type and the two URL forms that give one.

``DD_DOGSTATSD_URL`` (``udp://host:port``, ``unix:///path``) and talisker's
``STATSD_DSN`` (``udp://host:port/prefix``). User info in either is never kept.
"""

from __future__ import annotations

from agent.config.parsers import InvalidValue, parse_port, parse_prefix

_DSD_SCHEMES = ("udp", "unix", "unixgram", "unixstream")


class Destination:
    """Where metrics go: ``udp`` with a host and port, or a unix socket path."""

    __slots__ = ("host", "path", "port", "prefix", "scheme")

    def __init__(
        self,
        scheme: str,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        prefix: str | None = None,
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path
        self.prefix = prefix  # only STATSD_DSN carries one

    def __repr__(self) -> str:
        return f"Destination({self})"

    def __str__(self) -> str:
        if self.scheme == "udp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"udp://{host}:{self.port}"
        return f"{self.scheme}://{self.path}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Destination) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _without_user_info(rest: str) -> str:
    """What follows ``scheme://`` without its user info, never kept.

    The user info ends at the last ``@`` before any query string: a password
    may hold a ``/`` or an ``@`` that its author did not percent-encode.
    """
    before_query = rest.partition("?")[0]
    if "@" in before_query:
        return rest[before_query.rindex("@") + 1 :]
    return rest


def _split_host_port(netloc: str, default_port: int | None) -> tuple[str, int]:
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


def parse_dogstatsd_url(raw: str) -> Destination | None:
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


def parse_statsd_dsn(raw: str) -> Destination | None:
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
