"""Where metrics go: the :class:`Destination` type.

:mod:`agent.config` parses the two URL forms that give one, ``DD_DOGSTATSD_URL``
(``udp://host:port``, ``unix:///path``) and talisker's ``STATSD_DSN``
(``udp://host:port/prefix``); user info in either is never kept. This module
imports nothing, so the configuration can load it only when it needs it.
"""

from __future__ import annotations


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
