"""The metrics pipeline: record on the caller's thread, send from a background one.

A metric call appends one small tuple to a deque (about 0.1 µs, no lock, no
I/O). A daemon thread, started on the first metric of each process, wakes
every ``TALISKER_METRICS_FLUSH_INTERVAL`` seconds, drains the deque, aggregates
it (counts summed, gauges last value, timings packed as DogStatsD multi-value
lines), sanitises names and tags, applies the per-metric tag cardinality cap
and writes the result to the destination's socket (:mod:`agent._sender`).

Nothing is lost silently: records beyond :data:`QUEUE_LIMIT`, records that
cannot be aggregated and lines that cannot be sent are counted by reason in
:class:`Losses`, warned about (rate-limited) and sent as ``agent.dropped``.
A bad record is isolated: the rest of its flush is sent.

Fork safety: the metrics thread imports nothing (what it needs is imported by
:meth:`Pipeline.start` on the thread of the first metric), so a child forked
at any moment inherits no half-imported module. A child starts with an empty
queue and no thread; its first metric builds its own. Nothing is joined before
a fork, so ``fork()`` never waits on the pipeline. At interpreter exit pending
metrics are flushed.

Instrumentations call :func:`count`, :func:`timing` and :func:`gauge` with tags
as a tuple of ``(key, value)`` pairs and know nothing about DogStatsD.
"""

from __future__ import annotations

import os
import time
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
    Series = tuple[
        dict[tuple[str, Tags], float],
        dict[tuple[str, Tags], float],
        dict[tuple[str, Tags], list[float]],
    ]
else:
    from _collections import deque  # `collections` itself costs ~2 ms to import

__all__ = ["configure", "count", "flush", "gauge", "timing"]

COUNT, GAUGE, TIMING = 0, 1, 2

#: Most metric records (per queue) waiting for the background thread; past it
#: the oldest are dropped and counted (``queue_full``), so memory stays bounded.
QUEUE_LIMIT = 200_000
#: Seconds between the metrics thread's checks of the queues against the limit.
QUEUE_CHECK_PERIOD = 0.1
#: Seconds between two warnings for the same reason of loss.
WARNING_PERIOD = 300.0
#: Records aggregated between two offers of the GIL to the application's threads.
DRAIN_CHUNK = 1024
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
_sleep = time.sleep


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
    timing's value may be a list of samples). When it raises, the payloads are
    expanded one by one and those that still fail are dropped and counted.
    """
    p = _pipeline
    if p is not None:
        if p.thread is None:
            p.start()
        queue = p.deferred.get(expand)
        if queue is None:
            queue = p.deferred.setdefault(expand, deque())
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
        # No maxlen: the metrics thread trims and counts what exceeds QUEUE_LIMIT.
        self.queue: deque[tuple[int, str, float, Tags]] = deque()
        self.deferred: dict[Any, deque[Any]] = {}  # expand -> its payloads
        self.thread: threading.Thread | None = None
        self.tags = TagRules(config.max_tag_values)
        self.losses = Losses()
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

                # What the metrics thread will need, imported here: an import in that
                # thread during the application's fork() leaves the child a
                # half-initialised module (a hang or an ImportError).
                import agent._sender  # noqa: F401 - _socket, errno

                _compile()  # re
                _log.logger()  # logging
                host = self.config.destination.host
                if host and not host.isascii():
                    try:
                        host.encode("idna")  # imports the codecs resolving the name needs
                    except UnicodeError:
                        pass
                self._cond = threading.Condition(threading.Lock())
                thread = threading.Thread(target=self._run, name="talisker-metrics", daemon=True)
                thread.start()
                # Published once alive: a flush that sees it may wait for it.
                self.thread = thread
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
            if not self.queue and not any(self.deferred.values()) and not self.losses.pending:
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
        """In a forked child: forget the parent's queue, thread, socket and losses."""
        self.queue = deque()
        self.deferred = {}
        self.thread = None
        self._cond = None
        self._start_lock = allocate_lock()
        self._requested = self._completed = 0
        self.losses = Losses()  # the parent reports its own
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()  # the parent's socket, inherited: the child opens its own

    # -- background thread -----------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        assert cond is not None
        next_flush = time.monotonic() + self.interval
        while True:
            with cond:
                left = next_flush - time.monotonic()
                if left > 0 and not (self._requested > self._completed or self._closed):
                    cond.wait(min(left, QUEUE_CHECK_PERIOD))
                due = (
                    self._requested > self._completed
                    or self._closed
                    or time.monotonic() >= next_flush
                )
                target = self._requested
            if not due:
                self.trim_queues()
                continue
            try:
                self.send_pending()
            except Exception:
                _log.log_once("metrics-flush", "agent: sending metrics failed", exc_info=True)
            next_flush = time.monotonic() + self.interval
            with cond:
                self._completed = max(self._completed, target)
                cond.notify_all()
            if self._cond is not cond:  # a stale thread after fork
                return
            if self._closed:
                if self._sender is not None:
                    self._sender.close()
                return

    def trim_queues(self) -> None:
        """Drop (and count) the oldest records of any queue longer than QUEUE_LIMIT."""
        dropped = 0
        for queue in (self.queue, *list(self.deferred.values())):
            excess = len(queue) - QUEUE_LIMIT
            if excess > 0:
                pop = queue.popleft
                for _ in range(excess):
                    pop()
                dropped += excess
        if dropped:
            self.losses.add(
                "queue_full",
                dropped,
                "agent: %d metric records dropped: more than %d were waiting to be sent "
                "(reason queue_full)",
                dropped,
                QUEUE_LIMIT,
            )

    def send_pending(self) -> None:
        """Drain the queue, aggregate, sanitise and send (background thread)."""
        self.trim_queues()
        batch = self.aggregate(self._drain(), self._drain_deferred())
        if batch.empty() and not self.losses.pending:
            return
        if self._sender is None:
            from agent._sender import Sender

            self._sender = Sender(self.config, self.losses)
        self._sender.send(batch)

    def _drain(self) -> Iterator[tuple[int, Any, Any, Tags]]:
        """What is queued now, oldest first (what arrives meanwhile waits for the next flush).

        In chunks, with the GIL offered to the application's threads between two: a
        big flush would otherwise hold it for up to the 5 ms switch interval at a time.
        """
        pop = self.queue.popleft
        left = len(self.queue)
        while left > 0:
            n = min(left, DRAIN_CHUNK)
            left -= n
            yield from [pop() for _ in range(n)]
            if left:
                _sleep(0)

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

        series: Series = ({}, {}, {})
        self._add_all(series, items)
        for expand, payloads in (deferred or {}).items():
            self._add_all(series, self._expand(expand, payloads))
        counts, gauges, timings = series

        batch = Batch()
        context = self._context
        for raw, value in counts.items():
            key = context(raw, 1)
            if key is not None:
                batch.counts[key] = batch.counts.get(key, 0) + value
        for raw, value in gauges.items():
            key = context(raw, 1)
            if key is not None:
                batch.gauges[key] = value
        for raw, samples in timings.items():
            key = context(raw, len(samples))
            if key is None:
                continue
            existing = batch.timings.get(key)
            if existing is None:
                batch.timings[key] = samples
            else:
                existing.extend(samples)
        return batch

    def _add_all(self, series: Series, records: Iterable[Any]) -> None:
        """Aggregate ``records``; one that raises takes the slow path alone."""
        counts, gauges, timings = series
        add = self._add
        records = iter(records)
        while True:
            record = None
            try:  # around the loop, not in it: the common case pays nothing
                for record in records:
                    add(counts, gauges, timings, *record)
                return
            except Exception:
                self._add_coerced(series, record)

    def _add_coerced(self, series: Series, record: Any) -> None:
        """A record the fast path rejected: make its tags hashable, its value a number.

        A tag value that is not hashable (a list) is sent as its text, as every tag
        value is; a value that is not a number drops the record, counted.
        """
        name: Any = "unknown"
        try:
            kind, name, value, tags = record
            name = name if type(name) is str else str(name)
            tags = coerce_tags(tags)
            counts, gauges, timings = series
            raw = (name, tags)
            if kind == TIMING:
                samples = timings.setdefault(raw, [])
                for sample in value if type(value) is list else [value]:
                    try:
                        samples.append(float(sample))
                    except Exception:
                        self._bad_record(name, f"a value of type {type(sample).__name__}")
            elif kind == COUNT:
                counts[raw] = float(counts.get(raw, 0)) + float(value)
            else:
                gauges[raw] = float(value)
        except Exception as exc:
            what = f"a value of type {type(record[2]).__name__}" if _is_record(record) else ""
            self._bad_record(str(name), what or type(exc).__name__)

    def _expand(self, expand: Callable[[list[Any]], Iterable[Record]], payloads: list[Any]) -> Any:
        """``expand(payloads)``; if it raises, payload by payload, dropping those that fail."""
        try:
            return list(expand(payloads))
        except Exception:
            _log.logger().debug("agent: expanding metric records failed", exc_info=True)
        records: list[Any] = []
        for payload in payloads:
            try:
                records.extend(expand([payload]))
            except Exception as exc:
                self._bad_record(getattr(expand, "__qualname__", "?"), type(exc).__name__)
        return records

    def _context(self, raw: tuple[str, Tags], lines: int) -> tuple[str, tuple[str, ...]] | None:
        """The sanitised context of ``raw``; None (counted) if even coerced it cannot be made."""
        try:
            return self.tags.context(*raw)
        except Exception:
            pass
        name, tags = raw
        try:
            return self.tags.context(str(name), coerce_tags(tags))
        except Exception as exc:
            for _ in range(lines):
                self._bad_record(str(name), f"tags that cannot be sent ({type(exc).__name__})")
            return None

    def _bad_record(self, name: str, what: str) -> None:
        self.losses.bad_record(name, what)

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


def _is_record(record: Any) -> bool:
    return type(record) is tuple and len(record) == 4


def coerce_tags(tags: Any) -> Tags:
    """Any tags as hashable ``(key, value)`` pairs: a mapping, ``key:value`` strings, None.

    A value that cannot be hashed (a list) becomes its text, which is what
    sanitising makes of every value anyway.
    """
    if tags is None:
        return ()
    if hasattr(tags, "items"):
        tags = list(tags.items())
    elif isinstance(tags, str):
        tags = [tags]
    pairs = []
    for tag in tags:
        if isinstance(tag, (tuple, list)) and len(tag) == 2:
            key, value = tag
        else:
            key, _, value = str(tag).partition(":")
        try:
            hash(value)
        except TypeError:
            value = str(value)
        pairs.append((str(key), value))
    return tuple(pairs)


class Losses:
    """What the agent could not deliver, counted by reason until sent as ``agent.dropped``.

    Reasons: ``queue_full`` and ``bad_record`` count records (metric calls);
    ``unresolved``, ``socket_full`` and ``send_failed`` count DogStatsD lines (one
    metric and tag set of a flush; up to 32 timing samples). Each reason warns on
    the ``agent`` logger once, then at most once per :data:`WARNING_PERIOD`.
    Used by the metrics thread only.
    """

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self._warnings: dict[str, _log.RateLimited] = {}

    def count(self, reason: str, n: int) -> None:
        """Count ``n`` more lost for ``reason``, without a warning."""
        if n > 0:
            self.pending[reason] = self.pending.get(reason, 0) + n

    def add(self, reason: str, n: int, message: str, *args: object) -> None:
        """Count ``n`` more lost for ``reason`` and warn (rate-limited per reason)."""
        self.count(reason, n)
        self.warn(reason, message, *args)

    def warn(self, reason: str, message: str, *args: object) -> None:
        """The warning of ``reason``: the first, then one per period."""
        limiter = self._warnings.get(reason)
        if limiter is None:
            limiter = self._warnings[reason] = _log.RateLimited(WARNING_PERIOD)
        limiter.warning(message, *args)

    def bad_record(self, name: str, what: str) -> None:
        """One record of metric ``name`` dropped because it has ``what``."""
        self.add(
            "bad_record",
            1,
            "agent: a metric record was dropped: metric %r has %s (reason bad_record)",
            name[:MAX_TAG_LENGTH],
            what,
        )

    def reported(self, counts: dict[str, int]) -> None:
        """``counts`` reached the destination: they are no longer pending."""
        for reason, n in counts.items():
            left = self.pending.get(reason, 0) - n
            if left > 0:
                self.pending[reason] = left
            else:
                self.pending.pop(reason, None)

    def reset_warnings(self, reasons: Iterable[str]) -> None:
        """Metrics get through again: the next failure of ``reasons`` warns at once."""
        for reason in reasons:
            limiter = self._warnings.get(reason)
            if limiter is not None:
                limiter.reset()


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
