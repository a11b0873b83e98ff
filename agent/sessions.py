"""``agent.get_session()``: one requests session per class, per thread and per process."""

from __future__ import annotations

import threading

from agent import _fork

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import Any

_local = threading.local()
_default_class: type | None = None


def get_session(cls: type | None = None) -> Any:
    """The calling thread's session of ``cls`` (default ``requests.Session``).

    Sessions keep connections alive, so reusing one per thread is much cheaper
    than a new one per call; they are not shared between threads, which
    requests does not promise to be safe. A forked child gets fresh sessions:
    connections cannot be shared with the parent.
    """
    if cls is None:
        cls = _default_class or _requests_session_class()
    sessions: dict[type, Any] | None = getattr(_local, "sessions", None)
    if sessions is None:
        sessions = _local.sessions = {}
    session = sessions.get(cls)
    if session is None:
        session = sessions[cls] = cls()
    return session


def _requests_session_class() -> type:
    global _default_class
    import requests

    _default_class = requests.Session
    return _default_class


def _after_fork_in_child() -> None:
    global _local
    _local = threading.local()


_fork.after_in_child(_fork.RESET, _after_fork_in_child)
