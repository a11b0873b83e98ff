"""The metrics pipeline: record on the caller's thread, send from a background one.

A metric call appends one small tuple to a bounded deque (about 0.1 µs, no
lock, no I/O). A daemon thread, started on the first metric of each process,
wakes every ``TALISKER_METRICS_FLUSH_INTERVAL`` seconds, drains the deque,
aggregates it (counts summed, gauges last value, timings packed as DogStatsD
multi-value lines), sanitises names and tags, applies the per-metric tag
cardinality cap and hands the result to ``datadog``'s ``DogStatsd`` (see
:mod:`agent._sender`), which is imported in that thread, never on the start-up
path.

Fork safety: a child process starts with an empty queue and no thread; its
first metric builds its own. Nothing is joined before a fork, so ``fork()``
never waits on the pipeline. At interpreter exit pending metrics are flushed.

Instrumentations call :func:`count`, :func:`timing` and :func:`gauge` with tags
as a tuple of ``(key, value)`` pairs and know nothing about DogStatsD.
"""

from __future__ import annotations

import os
from _thread import allocate_lock

from agent import _log
from agent.config import RESERVED_TAG_KEYS

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    import threading
    from collections import deque
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

    from agent._sender import Batch, Sender
    from agent.config import Config

    Tags = tuple[tuple[str, Any], ...]
    Record = tuple[int, str, float, Tags]
else:
    from _collections import deque  # `collections` itself costs ~2 ms to import

__all__ = ["configure", "count", "flush", "gauge", "timing"]

COUNT, GAUGE, TIMING = 0, 1, 2

#: Most metric records waiting for the background thread; past it the oldest
#: are dropped, so a stuck destination cannot grow memory without bound.
QUEUE_LIMIT = 200_000
#: Raw (name, tags) -> sanitised context entries kept; cleared when full.
CONTEXT_CACHE_LIMIT = 20_000
#: How long interpreter exit waits for the last flush.
EXIT_FLUSH_TIMEOUT = 3.0
#: Tag values longer than this are cut (Datadog's own limit is 200).
MAX_TAG_LENGTH = 200
#: What a tag value becomes once its key has reached the cardinality cap.
OVERFLOW_VALUE = "other"

_pipeline: Pipeline | None = None
_exit_hook_registered = False


def record(kind: int, name: str, value: float, tags: Tags = ()) -> None:
    """Record one metric. Cheap, lock-free, never raises, never does I/O."""
    p = _pipeline
    if p is not None:
        if p.thread is None:
            p.start()
        p.queue.append((kind, name, value, tags))


def record_deferred(expand: Callable[[list[Any]], Iterable[Record]], payload: Any) -> None:
    """Record ``payload``; the metrics thread turns it into metrics with ``expand``.

    Lets a hot path hand over one tuple and leave building tags to the metrics
    thread. Each ``expand`` has its own queue; once per flush it gets every
    payload recorded for it and returns ``(kind, name, value, tags)`` records (a
    timing's value may be a list of samples). What it raises is logged once and
    those payloads are dropped.
    """
    p = _pipeline
    if p is not None:
        if p.thread is None:
            p.start()
        queue = p.deferred.get(expand)
        if queue is None:
            queue = p.deferred.setdefault(expand, deque(maxlen=QUEUE_LIMIT))
        queue.append(payload)


def count(name: str, value: float = 1, tags: Tags = ()) -> None:
    """Add ``value`` to the count ``name``."""
    record(COUNT, name, value, tags)


def timing(name: str, milliseconds: float, tags: Tags = ()) -> None:
    """One sample, in milliseconds, of the distribution (or histogram) ``name``."""
    record(TIMING, name, milliseconds, tags)


def gauge(name: str, value: float, tags: Tags = ()) -> None:
    """Set the gauge ``name``; the last value of each flush interval is sent."""
    record(GAUGE, name, value, tags)


def flush(timeout: float = 2.0) -> bool:
    """Send every metric recorded so far; wait at most ``timeout`` seconds.

    Returns whether the send finished in time. Scripts rarely need it: the
    pipeline flushes periodically and at interpreter exit.
    """
    p = _pipeline
    return True if p is None else p.flush(timeout)


def configure(config: Config | None) -> None:
    """Start sending as ``config`` says; ``None`` (or metrics disabled) stops sending."""
    global _pipeline
    old = _pipeline
    if config is not None and not config.metrics_enabled:
        config = None
    if old is not None and config is not None and old.config == config:
        return
    _pipeline = Pipeline(config) if config is not None else None
    if old is not None:
        old.close()


def active() -> Pipeline | None:
    """The running pipeline, if metrics are enabled."""
    return _pipeline


def _after_fork_in_child() -> None:
    # Runs in the child with one thread: no logging, no locks that may be held.
    if _pipeline is not None:
        _pipeline.reset_after_fork()


def _at_exit() -> None:
    if _pipeline is not None:
        _pipeline.flush(EXIT_FLUSH_TIMEOUT)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Pipeline:
    """One process's metrics: the queue, the background thread and the sender."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.interval = config.flush_interval
        self.queue: deque[tuple[int, str, float, Tags]] = deque(maxlen=QUEUE_LIMIT)
        self.deferred: dict[Any, deque[Any]] = {}  # expand -> its payloads
        self.thread: threading.Thread | None = None
        self.tags = TagRules(config.max_tag_values)
        self._start_lock = allocate_lock()
        self._cond: threading.Condition | None = None
        self._requested = 0  # flush requests made ...
        self._completed = 0  # ... and served
        self._closed = False
        self._sender: Sender | None = None

    # -- caller side ---------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (once per process)."""
        global _exit_hook_registered
        with self._start_lock:
            if self.thread is not None:
                return
            try:
                import threading

                self._cond = threading.Condition(threading.Lock())
                thread = threading.Thread(target=self._run, name="talisker-metrics", daemon=True)
                self.thread = thread
                thread.start()
                from agent import process

                process.ensure_started()
                if not _exit_hook_registered:
                    import atexit

                    atexit.register(_at_exit)
                    _exit_hook_registered = True
            except Exception:  # e.g. "can't create new thread at interpreter shutdown"
                _log.log_once(
                    "metrics-thread", "agent: cannot start the metrics thread", exc_info=True
                )

    def flush(self, timeout: float) -> bool:
        """Ask the background thread to send everything queued; wait up to ``timeout``."""
        import threading

        thread, cond = self.thread, self._cond
        if thread is None or cond is None:
            if not self.queue and not any(self.deferred.values()):
                return True
            self.start()
            thread, cond = self.thread, self._cond
            if thread is None or cond is None:
                return False
        if thread is threading.current_thread() or not thread.is_alive():
            return False
        with cond:
            self._requested += 1
            target = self._requested
            cond.notify_all()
            return cond.wait_for(lambda: self._completed >= target, timeout)

    def close(self) -> None:
        """Send what is queued and stop the thread (when the agent is reconfigured)."""
        if self.thread is not None:
            self.flush(1.0)
        self._closed = True
        cond = self._cond
        if cond is not None:
            with cond:
                cond.notify_all()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's queue, thread and socket."""
        self.queue = deque(maxlen=QUEUE_LIMIT)
        self.deferred = {}
        self.thread = None
        self._cond = None
        self._start_lock = allocate_lock()
        self._requested = self._completed = 0
        self._sender = None  # its locks may have been held by the parent's thread

    # -- background thread -----------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        assert cond is not None
        while True:
            with cond:
                cond.wait_for(
                    lambda: self._requested > self._completed or self._closed, self.interval
                )
                target = self._requested
            try:
                self.send_pending()
            except Exception:
                _log.log_once("metrics-flush", "agent: sending metrics failed", exc_info=True)
            with cond:
                self._completed = max(self._completed, target)
                cond.notify_all()
            if self._closed or self._cond is not cond:  # closed, or a stale thread after fork
                return

    def send_pending(self) -> None:
        """Drain the queue, aggregate, sanitise and send (background thread)."""
        batch = self.aggregate(self._drain(), self._drain_deferred())
        if batch.empty():
            return
        if self._sender is None:
            from agent._sender import Sender

            self._sender = Sender(self.config)
        self._sender.send(batch)

    def _drain(self) -> Iterator[tuple[int, Any, Any, Tags]]:
        """What is queued now, oldest first (what arrives meanwhile waits for the next flush)."""
        pop = self.queue.popleft
        for _ in range(len(self.queue)):
            try:
                yield pop()
            except IndexError:  # pragma: no cover - only this thread pops
                return

    def _drain_deferred(self) -> dict[Any, list[Any]]:
        drained = {}
        for expand, queue in list(self.deferred.items()):
            pop = queue.popleft
            payloads = [pop() for _ in range(len(queue))]
            if payloads:
                drained[expand] = payloads
        return drained

    def aggregate(
        self,
        items: Iterable[tuple[int, Any, Any, Tags]],
        deferred: dict[Any, list[Any]] | None = None,
    ) -> Batch:
        """Sum counts, keep last gauges, collect timing samples, per sanitised context.

        Aggregates on the raw ``(name, tags)`` first (one hash per record), then
        resolves each distinct raw context once.
        """
        from agent._sender import Batch

        counts: dict[tuple[str, Tags], float] = {}
        gauges: dict[tuple[str, Tags], float] = {}
        timings: dict[tuple[str, Tags], list[float]] = {}
        add = self._add
        for kind, name, value, tags in items:
            add(counts, gauges, timings, kind, name, value, tags)
        for expand, payloads in (deferred or {}).items():
            try:
                for kind, name, value, tags in expand(payloads):
                    add(counts, gauges, timings, kind, name, value, tags)
            except Exception:
                _log.log_once("metrics-expand", "agent: a metric record failed", exc_info=True)

        batch = Batch()
        context = self.tags.context
        for raw, value in counts.items():
            key = context(*raw)
            batch.counts[key] = batch.counts.get(key, 0) + value
        for raw, value in gauges.items():
            batch.gauges[context(*raw)] = value
        for raw, samples in timings.items():
            key = context(*raw)
            existing = batch.timings.get(key)
            if existing is None:
                batch.timings[key] = samples
            else:
                existing.extend(samples)
        return batch

    @staticmethod
    def _add(
        counts: dict[tuple[str, Tags], float],
        gauges: dict[tuple[str, Tags], float],
        timings: dict[tuple[str, Tags], list[float]],
        kind: int,
        name: str,
        value: Any,
        tags: Tags,
    ) -> None:
        raw = (name, tags)
        if kind == COUNT:
            counts[raw] = counts.get(raw, 0) + value
        elif kind == TIMING:
            many = value if type(value) is list else [value]
            samples = timings.get(raw)
            if samples is None:
                timings[raw] = many
            else:
                samples.extend(many)
        else:
            gauges[raw] = value


class TagRules:
    """Sanitising and the per-metric cardinality cap, applied in the background thread.

    - Names keep letters, digits, ``_`` and ``.``; anything else becomes ``_``.
    - Tag keys keep letters, digits, ``_ - . /``; values also keep ``:``. Anything
      else (``|``, ``,``, ``#``, newlines, ``@``, spaces, brackets...) becomes
      ``_``, so no value can break a datagram. Values are cut at 200 characters.
    - A reserved key (``host``, ``device``, ``source``, ``service``) is renamed
      ``tag_<key>``: Datadog gives those keys a meaning of their own.
    - Each tag key of each metric keeps at most ``max_values`` distinct values;
      later ones are sent as ``other``.
    """

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._contexts: dict[tuple[str, Tags], tuple[str, tuple[str, ...]]] = {}
        self._seen: dict[tuple[str, str], set[str]] = {}

    def context(self, name: str, tags: Tags) -> tuple[str, tuple[str, ...]]:
        """The sanitised, capped ``(name, ("key:value", ...))`` of a raw metric."""
        key = (name, tags)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) >= CONTEXT_CACHE_LIMIT:
                self._contexts.clear()  # admitted values stay admitted: results do not change
            clean = sanitize_name(name)
            ctx = self._contexts[key] = (clean, tuple(self._tag(clean, k, v) for k, v in tags))
        return ctx

    def _tag(self, metric: str, key: str, value: Any) -> str:
        key = sanitize_tag_key(key)
        value = sanitize_tag_value(value)
        seen = self._seen.get((metric, key))
        if seen is None:
            seen = self._seen[(metric, key)] = set()
        if value not in seen:
            if len(seen) >= self.max_values:
                value = OVERFLOW_VALUE
            else:
                seen.add(value)
        return f"{key}:{value}"


_NAME_RE: Any = None
_KEY_RE: Any = None
_VALUE_RE: Any = None


def _compile() -> None:
    global _NAME_RE, _KEY_RE, _VALUE_RE
    import re

    # The same character classes as the datadog client's tag normalisation, so it
    # changes nothing after us and the cap counts the values actually sent.
    _NAME_RE = re.compile(r"[^A-Za-z0-9_.]")
    _KEY_RE = re.compile(r"[^\w\-./]")
    _VALUE_RE = re.compile(r"[^\w\-./:]")


def sanitize_name(name: str) -> str:
    """A metric name DogStatsD accepts: starts with a letter; ``[A-Za-z0-9_.]``."""
    if _NAME_RE is None:
        _compile()
    clean: str = _NAME_RE.sub("_", str(name))[:MAX_TAG_LENGTH].strip(".")
    if not clean or not clean[0].isalpha():
        clean = "m_" + clean
    return clean


def sanitize_tag_key(key: str) -> str:
    """A tag key: ``[\\w\\-./]``, starting with a letter, never a reserved key."""
    if _KEY_RE is None:
        _compile()
    clean: str = _KEY_RE.sub("_", str(key))[:MAX_TAG_LENGTH]
    if not clean or not clean[0].isalpha():
        clean = "t_" + clean
    if clean in RESERVED_TAG_KEYS:
        clean = "tag_" + clean
    return clean


def sanitize_tag_value(value: object) -> str:
    """A tag value: ``[\\w\\-./:]``, at most 200 characters, never empty."""
    if _VALUE_RE is None:
        _compile()
    clean: str = _VALUE_RE.sub("_", str(value).strip())[:MAX_TAG_LENGTH]
    return clean or "none"


def constant_tags(config: Config) -> list[str]:
    """``service``/``env``/``version`` from ``DD_SERVICE`` etc., then ``DD_TAGS``, bare or not."""
    tags = []
    for key, value in (
        ("service", config.service),
        ("env", config.env),
        ("version", config.version),
    ):
        if value:
            tags.append(f"{key}:{sanitize_tag_value(value)}")
    for item in config.tags:
        key, sep, value = item.partition(":")
        # A bare tag (DD_TAGS="canary") stays bare, as the Datadog agent sends it.
        tags.append(
            f"{sanitize_tag_key(key)}:{sanitize_tag_value(value)}" if sep else sanitize_tag_key(key)
        )
    return tags
