"""asyncio: the request scope follows a call into ``loop.run_in_executor``.

A request's id and deadline follow ``asyncio`` tasks by themselves (they are a
context variable), but ``loop.run_in_executor`` runs its function in the
executor's thread without the caller's context (``asyncio.to_thread`` copies
it). Inside a request scope, the function is run in that scope: only the
agent's own context variable is set, for the call's duration, so no other
library sees a context it would not have without the agent.

Loaded by the registry when ``asyncio.base_events`` (the event loop of the
standard library) or ``uvloop`` is imported. uvloop's loop is a Cython type that
cannot be patched; ``uvloop.Loop``, the Python class ``uvloop.new_event_loop()``
and ``uvloop.run()`` make, is given the wrapper around the method it inherits.
"""

from __future__ import annotations

import platform

from agent import config, context
from agent.instrumentation import Patch

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: The Pythons whose asyncio this instrumentation supports: ``(lowest, first not supported)``.
SUPPORTED = ((3, 10), (4,))

_current = context.current
_EMPTY = context.EMPTY
_set = context._scope.set
_reset = context._scope.reset


def installed_version() -> str:
    """asyncio's version is Python's."""
    return platform.python_version()


def run_in_executor_wrapper(
    wrapped: Callable[..., Any], loop: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Around ``BaseEventLoop.run_in_executor(executor, func, *args)``."""
    scope = _current()
    if scope is _EMPTY or config.current is None or len(args) < 2 or kwargs:
        return wrapped(*args, **kwargs)
    executor, func, *rest = args
    return wrapped(executor, _in_scope(scope, func), *rest)


def _in_scope(scope: context.Scope, func: Callable[..., Any]) -> Callable[..., Any]:
    def in_scope(*args: Any) -> Any:
        token = _set(scope)
        try:
            return func(*args)
        finally:
            _reset(token)

    return in_scope


PATCHES = (
    Patch("asyncio.base_events", "BaseEventLoop.run_in_executor", run_in_executor_wrapper),
    Patch("uvloop", "Loop.run_in_executor", run_in_executor_wrapper, inherited=True, optional=True),
)

__all__ = ["PATCHES", "SUPPORTED", "installed_version"]
