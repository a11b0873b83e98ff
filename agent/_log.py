"""The agent's own logger, ``agent``, created on first use.

``import logging`` costs more than the agent's whole start-up budget, so
nothing here imports it until there is something to log. Agent errors go
through :func:`log_once` (one record per distinct problem, ever) or
:class:`RateLimited` (a failing metrics destination: one record per period,
with the count of what was suppressed).
"""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

import os
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms

if TYPE_CHECKING:
    import logging

_logger: "logging.Logger | None" = None
_seen: "set[str]" = set()
#: The level of the installed configuration (:func:`set_level`); until one is
#: installed, ``TALISKER_LOG_LEVEL`` read from the environment.
_level: "str | None" = None
_handler: "logging.Handler | None" = None  # ours, when the application configured none

#: Our records start with "agent: " (the application's format may not show the
#: logger's name), so our own handler's format does not repeat the name.
FORMAT = "%(asctime)s %(levelname)s %(message)s"


#: The levels ``TALISKER_LOG_LEVEL`` takes.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def level_name(raw: "str") -> "str | None":
    """``raw`` as one of :data:`LEVELS` (``warn`` is ``WARNING``), or None."""
    value = raw.strip().upper()
    if value == "WARN":
        value = "WARNING"
    return value if value in LEVELS else None


def _configured_level() -> "str":
    global _level
    if _level is None:
        # Read here, not from a loaded Config: loading one may need this logger.
        # A bad value is WARNING here; load() names it in its own warning.
        _level = level_name(os.environ.get("TALISKER_LOG_LEVEL", "WARNING")) or "WARNING"
    return _level


def logger() -> "logging.Logger":
    """The ``agent`` logger, at the level of ``TALISKER_LOG_LEVEL``."""
    global _logger
    if _logger is None:
        import logging

        log = logging.getLogger("agent")
        _apply(log, _configured_level())
        _logger = log
    return _logger


def set_level(level: "str") -> "None":
    """Use ``level`` (the ``TALISKER_LOG_LEVEL`` of the configuration installed).

    Changes the logger only when the level changes, so a level the application
    set on the ``agent`` logger itself is not undone by installing the same
    configuration again.
    """
    global _level
    if level == _configured_level():
        return
    _level = level
    if _logger is not None:
        _apply(_logger, level)


def _apply(log: "logging.Logger", level: "str") -> "None":
    global _handler
    import logging

    log.setLevel(level)
    # Asking for debug output and seeing none because the application never
    # configured logging helps no one: give the agent's logger a handler then.
    wanted = level in ("DEBUG", "INFO")
    if wanted and _handler is None and not log.handlers and not logging.getLogger().handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter(FORMAT))
        log.addHandler(_handler)
    elif not wanted and _handler is not None:
        log.removeHandler(_handler)
        _handler = None


def debug_enabled() -> "bool":
    """Whether a debug record would be logged; imports ``logging`` only if it would."""
    if _logger is not None:
        return _logger.isEnabledFor(10)
    return _configured_level() == "DEBUG"


def log_once(key: "str", message: "str", *args: "object", exc_info: "bool" = False) -> "None":
    """Log ``message`` as a warning the first time ``key`` is seen in this process.

    Used for agent errors caught on the application's path: the call goes
    through, and the problem is reported once instead of once per request.
    """
    if key in _seen:
        return
    _seen.add(key)
    try:
        logger().warning(message, *args, exc_info=exc_info)
    except Exception:  # pragma: no cover - logging itself failing must not reach the app
        pass


def debug(message: "str", *args: "object") -> "None":
    """A debug record, without importing logging when debug output is off."""
    if debug_enabled():
        logger().debug(message, *args)


class RateLimited:
    """Logs the first occurrence as a warning, then at most once per ``period``.

    The later records say how many occurrences were suppressed in between.
    """

    def __init__(self, period: "float" = 300.0) -> "None":
        self.period = period
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: "str", *args: "object") -> "bool":
        """Log unless one was logged less than ``period`` ago; returns whether it logged."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return False
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self.period
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        try:
            logger().warning(message, *args)
        except Exception:  # pragma: no cover
            pass
        return True

    def reset(self) -> "None":
        """Forget the history: the next occurrence is logged."""
        self._next = 0.0
        self._suppressed = 0
