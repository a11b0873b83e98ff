"""The metrics thread: drains the queues, aggregates, sanitises and sends.

Started by :meth:`agent.metrics.Pipeline.start` on the thread of the first metric,
which imports this module and what it needs first, so the thread itself never
imports anything (see :mod:`agent.metrics` on fork safety). Every
``TALISKER_METRICS_FLUSH_INTERVAL`` seconds, or when a flush is asked for, it
drains the queue, aggregates it (counts summed, gauges last value, timings
packed as DogStatsD multi-value lines), applies the tag rules
(:mod:`agent.metrics.tags`) and hands the batch to the sender
(:mod:`agent.metrics.sender`). It also polls the process CPU collector
(:mod:`agent.metrics.runtime`) and trims the queues to :data:`QUEUE_LIMIT`.
"""

from __future__ import annotations

import itertools
import time

from agent import _log
from agent.metrics.sender import Batch, Sender
from agent.metrics.tags import MAX_TAG_LENGTH, TagRules, coerce_tags

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

    from agent.metrics import Pipeline
    from agent.metrics.runtime import ProcessCPU

    Tags = tuple[tuple[str, Any], ...]
    Record = tuple[int, str, float, Tags]
    Series = tuple[
        dict[tuple[str, Tags], float],
        dict[tuple[str, Tags], float],
        dict[tuple[str, Tags], list[float]],
    ]

COUNT, GAUGE, TIMING = 0, 1, 2  # as agent.metrics defines them

#: Records kept waiting per queue (the main one and each deferred one); beyond it
#: the oldest are dropped and counted (``queue_full``), so memory stays bounded.
QUEUE_LIMIT = 200_000
#: Seconds between the metrics thread's checks of the queues against the limit.
QUEUE_CHECK_PERIOD = 0.1
#: Seconds between two warnings for the same reason of loss.
WARNING_PERIOD = 300.0
#: Records aggregated between two offers of the GIL to the application's threads.
DRAIN_CHUNK = 1024

_sleep = time.sleep
_islice = itertools.islice


class Worker:
    """The metrics thread's state: tag rules, losses, the sender, the CPU collector."""

    def __init__(self, pipeline: Pipeline, tags: TagRules | None = None) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.queue = pipeline.queue
        self.deferred = pipeline.deferred
        self.tags = tags if tags is not None else TagRules(self.config.max_tag_values)
        self.losses = Losses()
        self._sender: Sender | None = None
        self.runtime: ProcessCPU | None = None
        interval = self.config.runtime_metrics_interval
        if interval > 0:
            from agent.metrics.runtime import ProcessCPU

            self.runtime = ProcessCPU(interval)

    def run(self) -> None:
        pipeline = self.pipeline
        cond = pipeline._cond
        assert cond is not None
        interval = self.config.flush_interval
        next_flush = time.monotonic() + interval
        runtime = self.runtime
        while True:
            with cond:
                now = time.monotonic()
                wake = next_flush if runtime is None else min(next_flush, runtime.due)
                left = wake - now
                if left > 0 and not (pipeline._requested > pipeline._completed or pipeline._closed):
                    cond.wait(min(left, QUEUE_CHECK_PERIOD))
                now = time.monotonic()
                due = (
                    pipeline._requested > pipeline._completed
                    or pipeline._closed
                    or now >= next_flush
                )
                target = pipeline._requested
            if runtime is not None and now >= runtime.due:
                try:
                    runtime.collect(self.queue.append)
                except Exception:
                    runtime.due = now + runtime.interval
                    _log.log_once("process-cpu", "agent: reading process CPU failed", exc_info=True)
            if not due:
                self.trim_queues()
                continue
            try:
                self.send_pending()
            except Exception:
                _log.log_once("metrics-flush", "agent: sending metrics failed", exc_info=True)
            next_flush = time.monotonic() + interval
            with cond:
                pipeline._completed = max(pipeline._completed, target)
                cond.notify_all()
            if pipeline._cond is not cond:  # a stale thread after fork
                return
            if pipeline._closed:
                if self._sender is not None:
                    self._sender.close()
                return

    def close_sender(self) -> None:
        """Close the socket (a forked child: it is the parent's)."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()

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
            self._sender = Sender(self.config, self.losses)
        self._sender.send(batch)

    def _drain(self) -> Iterator[tuple[int, Any, Any, Tags]]:
        """What is queued now, oldest first (what arrives meanwhile waits for the next flush).

        In chunks, with the GIL offered to the application's threads between two: a
        big flush would otherwise hold it for up to the 5 ms switch interval at a time.
        """
        popping = iter(self.queue.popleft, None)  # records are tuples, never None
        left = len(self.queue)
        while left > 0:
            n = min(left, DRAIN_CHUNK)
            left -= n
            yield from list(_islice(popping, n))  # the loop in C, not in bytecode
            if left:
                _sleep(0)

    def _drain_deferred(self) -> dict[Any, list[Any]]:
        drained = {}
        for expand, queue in list(self.deferred.items()):
            payloads = list(_islice(iter(queue.popleft, None), len(queue)))
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
