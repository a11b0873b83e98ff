"""The agent's fork hooks, in one ordered list.

Each module that keeps per-process state (the metrics pipeline, the request id
generator, the per-thread requests sessions) registers a hook here instead of
with ``os.register_at_fork``, so the hooks run in a known order whatever order
the modules were imported in: first every :data:`RESET` hook (forget the
parent's state: no lock, no logging, no thread), then every :data:`START` hook
(start what the child needs, such as the metrics thread).

A :data:`START` hook may start a thread, so it must run after ``threading``'s own
child hook, which forgets every thread but the current one (a thread started
before it would be marked stopped while it runs). Hooks run in the order they
were registered with the interpreter, and ``threading`` registers its hook when
it is imported, so the START hooks are registered with the interpreter at the
first fork that happens once ``threading`` is imported (a hook registered while
the ``before`` hooks run still runs in that fork's child).
"""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable

#: Phases, in the order they run in the child.
RESET, START = 0, 1

_hooks: "tuple[list[Callable[[], None]], list[Callable[[], None]]]" = ([], [])
_start_registered = False


def after_in_child(phase: "int", hook: "Callable[[], None]") -> "None":
    """Run ``hook`` in every forked child, in ``phase``, after the hooks registered before it."""
    if hook not in _hooks[phase]:
        _hooks[phase].append(hook)


def _run(phase: "int") -> "None":
    for hook in _hooks[phase]:
        try:
            hook()
        except Exception:  # pragma: no cover - a hook of ours must never break a fork
            pass


def _reset() -> "None":
    _run(RESET)


def _start() -> "None":
    _run(START)


def _before() -> "None":
    global _start_registered
    if not _start_registered and "threading" in sys.modules:
        _start_registered = True
        os.register_at_fork(after_in_child=_start)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before, after_in_child=_reset)
