"""Names of remote endpoints: the ``peer`` tag of outgoing calls and SQL queries.

A peer is the name registered for its ``host:port`` (or its host alone) with
:func:`register_endpoint_name` or ``TALISKER_ENDPOINT_NAMES``, else
``host:port``. Never a URL path, a query string or user info.
"""

from __future__ import annotations

from agent import config

_registered: dict[str, str] = {}
_cache: dict[tuple[str, int | None], str] = {}
_CACHE_LIMIT = 4096
#: ``cached((host, port))``: the peer name if already computed (a hot-path shortcut).
cached = _cache.get


def register_endpoint_name(netloc: str, name: str) -> None:
    """Name an endpoint for metric tags: ``register_endpoint_name("10.0.0.5:8000", "users-api")``.

    ``netloc`` is ``host:port`` (that port only) or ``host`` (any port).
    Registrations take precedence over ``TALISKER_ENDPOINT_NAMES``.
    """
    _registered[netloc.strip().lower()] = name
    _cache.clear()


def reset() -> None:
    """Forget cached names (the configuration changed)."""
    _cache.clear()


def netloc(host: str, port: int | None) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return shown if port is None else f"{shown}:{port}"


def peer_name(host: str, port: int | None) -> str:
    """The ``peer`` tag value for an endpoint."""
    key = (host, port)
    name = _cache.get(key)
    if name is None:
        full = netloc(host, port).lower()
        bare = host.lower()
        cfg = config.current
        configured = cfg.endpoint_names if cfg is not None else {}
        name = (
            _registered.get(full)
            or configured.get(full)
            or _registered.get(bare)
            or configured.get(bare)
            or netloc(host, port)
        )
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[key] = name
    return name
