"""Flask: every application served through the WSGI middleware, the endpoint as view.

``Flask.wsgi_app`` is wrapped with :func:`agent.wsgi.app_wrapper`; the view name is
the request's endpoint (``users.show``), read when Flask starts the response,
while its request context is still active. An application also wrapped in
``TaliskerMiddleware`` by hand is handled once, by the outer layer.

Loaded by the registry when ``flask.app`` is imported.
"""

from __future__ import annotations

from agent import wsgi
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any


def _endpoint(environ: dict[str, Any]) -> str | None:
    """The endpoint of the request Flask is serving (werkzeug keeps it in the environ)."""
    try:
        rule = environ["werkzeug.request"].url_rule
        if rule is None:
            return None  # no rule matched: a 404 or a 405
        endpoint = rule.endpoint
    except (KeyError, AttributeError):  # not served by Flask's request context
        return None
    return endpoint if isinstance(endpoint, str) else None


#: The versions of flask this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((2, 2), (4,))


def installed_version() -> str:
    """The version of flask imported (from its metadata: ``flask.__version__`` is deprecated)."""
    from importlib.metadata import version

    return version("flask")


#: ``Flask.wsgi_app(environ, start_response)`` is served by this one function
#: (``agent.wsgi``'s, naming the view by the endpoint).
serve = wsgi.app_server(_endpoint)

#: Per instance: an application lives as long as its process, and ``Flask.__call__``
#: looks ``self.wsgi_app`` up on every request (see ``agent.registry``). Bound to
#: ``serve`` itself, with no wrapt call between; the class's wrapper hands a call to
#: an application not bound yet (or never: a subclass's override) to it.
PATCHES = (
    Patch(
        "flask.app",
        "Flask.wsgi_app",
        wsgi.app_wrapper(serve),
        per_instance=True,
        bound_call=serve,
    ),
)

__all__ = ["PATCHES", "SUPPORTED", "installed_version"]
