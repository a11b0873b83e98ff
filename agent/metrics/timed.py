"""``agent.timed``: wall and CPU time of a block of code, in milliseconds."""

from __future__ import annotations

import time

from agent import metrics

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from types import TracebackType
    from typing import Any, TypeVar

    F = TypeVar("F", bound=Callable[..., Any])

_perf_counter = time.perf_counter
_thread_time = time.thread_time


def _tag_pairs(tags: Mapping[str, Any] | Iterable[str] | None) -> tuple[tuple[str, Any], ...]:
    if not tags:
        return ()
    if hasattr(tags, "items"):
        return tuple((str(k), v) for k, v in tags.items())
    pairs = []
    for tag in tags:
        key, _, value = str(tag).partition(":")
        pairs.append((key, value))
    return tuple(pairs)


class timed:
    """Context manager and decorator: ``<name>.latency`` and ``<name>.cpu``, in ms.

    ``latency`` is wall time (``time.perf_counter``); ``cpu`` is the CPU time of
    the calling thread (``time.thread_time``), so other threads' work is not
    counted. ``tags`` is a mapping or ``key:value`` strings.

    >>> with agent.timed("billing.invoice", tags={"kind": "monthly"}):
    ...     build_invoice()
    """

    __slots__ = ("_cpu", "_start", "name", "tags")

    def __init__(self, name: str, tags: Mapping[str, Any] | Iterable[str] | None = None) -> None:
        self.name = name
        self.tags = _tag_pairs(tags)

    def __enter__(self) -> timed:
        self._start = _perf_counter()
        self._cpu = _thread_time()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cpu_ms = (_thread_time() - self._cpu) * 1000.0
        wall_ms = (_perf_counter() - self._start) * 1000.0
        metrics.timing(self.name + ".latency", wall_ms, self.tags)
        metrics.timing(self.name + ".cpu", cpu_ms, self.tags)

    def __call__(self, func: F) -> F:
        import functools

        name, tags = self.name, self.tags

        @functools.wraps(func)
        def decorated(*args: Any, **kwargs: Any) -> Any:
            start, cpu = _perf_counter(), _thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                metrics.timing(name + ".cpu", (_thread_time() - cpu) * 1000.0, tags)
                metrics.timing(name + ".latency", (_perf_counter() - start) * 1000.0, tags)

        return decorated  # type: ignore[return-value]
