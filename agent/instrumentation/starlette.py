"""Starlette (and FastAPI, built on it): every application served through the ASGI middleware.

``Starlette.__call__`` is wrapped with :class:`agent.asgi.TaliskerMiddleware`, so
the request scope covers the whole application, its own middleware included;
the view is the route's name (FastAPI's is the endpoint function's), read from
the scope when the response starts. An application also wrapped by hand is
handled once, by the outer layer.

Loaded by the registry when ``starlette.applications`` is imported.
"""

from __future__ import annotations

from agent import config
from agent.asgi import TaliskerMiddleware
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: The versions of Starlette this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((0, 27), (2,))


def installed_version() -> str:
    """The version of Starlette imported."""
    import starlette

    return str(getattr(starlette, "__version__", ""))


def call_wrapper(
    wrapped: Callable[..., Any], app: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``Starlette.__call__(scope, receive, send)``."""
    if config.current is None or kwargs or len(args) != 3:
        return wrapped(*args, **kwargs)
    return TaliskerMiddleware(wrapped)(*args)


PATCHES = (Patch("starlette.applications", "Starlette.__call__", call_wrapper),)

__all__ = ["PATCHES", "SUPPORTED", "installed_version"]
