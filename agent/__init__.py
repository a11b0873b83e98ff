"""talisker-agent: request ids, deadlines and DogStatsD metrics with no code changes.

``import agent`` activates the agent as the environment says (see
``docs/configuration.md``): it is idempotent, cheap (no instrumented library,
no ``datadog``, no ``wrapt`` and not even ``typing`` is imported) and never
raises. Instrumentations go in when their target modules are imported.
"""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

#: The package version (hatch reads it here: one module fewer to import at start-up).
__version__ = "0.1.0"

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

    from agent import asgi as asgi
    from agent import context as context
    from agent import wsgi as wsgi
    from agent.config import Config
    from agent.context import (
        DeadlineExceeded,
        deadline,
        deadline_timeout,
        metric_names,
        priority,
        request_context,
        suppress,
    )
    from agent.http.breaker import CircuitOpen
    from agent.http.hedge import hedged, hedged_sync
    from agent.metrics.timed import timed
    from agent.naming import register_endpoint_name
    from agent.sessions import get_session
    from agent.wsgi import request_timeout

__all__ = [
    "CircuitOpen",
    "DeadlineExceeded",
    "__version__",
    "deadline",
    "deadline_timeout",
    "flush",
    "get_session",
    "hedged",
    "hedged_sync",
    "install",
    "metric_names",
    "priority",
    "register_endpoint_name",
    "request_context",
    "request_timeout",
    "suppress",
    "timed",
    "uninstall",
]


def install(config: "Config | None" = None) -> "bool":
    """Activate the agent with ``config`` (default: read from the environment).

    Idempotent: installing the same configuration again changes nothing; a
    different one replaces the first. Honours ``TALISKER_ENABLED`` and
    ``TALISKER_DISABLED_INSTRUMENTATIONS``. Returns whether the agent is
    active. Never raises: a failure is logged once.
    """
    try:
        import sys

        from agent import _log, metrics, registry
        from agent import config as config_module

        cfg = config if config is not None else config_module.load()
        _log.set_level(cfg.log_level)
        with registry._lock:
            if not cfg.enabled:
                _uninstall_locked()
                registry.install(cfg)  # only what keeps code written against the API working
                return False
            config_module.current = cfg
            naming = sys.modules.get("agent.naming")  # not loaded: nothing cached to forget
            if naming is not None:
                naming.reset()
            metrics.configure(cfg)
            registry.install(cfg)
        return True
    except Exception:
        from agent._log import log_once

        log_once(
            "install", "agent: install failed; the application runs uninstrumented", exc_info=True
        )
        return False


def uninstall() -> "None":
    """Deactivate the agent: every patched object is restored, metrics stop."""
    try:
        from agent import registry

        with registry._lock:
            _uninstall_locked()
    except Exception:
        from agent._log import log_once

        log_once("uninstall", "agent: uninstall failed", exc_info=True)


def _uninstall_locked() -> "None":
    from agent import config as config_module
    from agent import metrics, registry

    registry.uninstall()
    metrics.configure(None)
    config_module.current = None


def flush(timeout: "float" = 2.0) -> "bool":
    """Send the metrics recorded so far now, waiting at most ``timeout`` seconds.

    Rarely needed: metrics are sent periodically and at interpreter exit. Use
    it before ``os._exit()``, which skips exit handlers.
    """
    from agent import metrics

    return metrics.flush(timeout)


#: The API that loads on first use (``from agent import deadline`` too, PEP 562): the
#: context module alone, with contextvars and math, is a third of ``import agent``,
#: and a process that only has the agent active (every Python process under
#: ``talisker-run``) may never use it.
_LAZY = {
    "DeadlineExceeded": ("agent.context", "DeadlineExceeded"),
    "deadline": ("agent.context", "deadline"),
    "deadline_timeout": ("agent.context", "deadline_timeout"),
    "metric_names": ("agent.context", "metric_names"),
    "priority": ("agent.context", "priority"),
    "request_context": ("agent.context", "request_context"),
    "suppress": ("agent.context", "suppress"),
    "context": ("agent.context", None),
    "CircuitOpen": ("agent.http.breaker", "CircuitOpen"),
    "hedged": ("agent.http.hedge", "hedged"),
    "hedged_sync": ("agent.http.hedge", "hedged_sync"),
    "get_session": ("agent.sessions", "get_session"),
    "register_endpoint_name": ("agent.naming", "register_endpoint_name"),
    "request_timeout": ("agent.wsgi", "request_timeout"),
    "timed": ("agent.metrics.timed", "timed"),
    "wsgi": ("agent.wsgi", None),
    "asgi": ("agent.asgi", None),
}


def __getattr__(name: "str") -> "Any":
    # Heavier parts of the API load on first use, keeping `import agent` cheap.
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        import sys

        __import__(module_name)
        module = sys.modules[module_name]
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'agent' has no attribute {name!r}")


def _activate() -> "None":
    try:
        import os
        import sys

        if os.path.basename(getattr(sys, "argv", [""])[0] or "") == "talisker-run":
            return  # the launcher validates strictly itself; the command it runs activates
        from agent.config import load

        install(load())  # off, it still keeps the documented API working (registry.API_TARGETS)
    except Exception:  # pragma: no cover - import agent must never raise
        pass


_activate()
