"""The metrics API and pipeline: record on the caller's thread, send from a background one.

A metric call appends one small tuple to a deque (about 0.1 µs, no lock, no
I/O). A daemon thread, started on the first metric of each process
(:mod:`agent.metrics.worker`), wakes every ``TALISKER_METRICS_FLUSH_INTERVAL``
seconds, aggregates what was queued, applies the tag rules
(:mod:`agent.metrics.tags`) and writes DogStatsD datagrams
(:mod:`agent.metrics.sender`); it also polls the process CPU collector
(:mod:`agent.metrics.runtime`).

Nothing is lost silently: records beyond the queue limit, records that cannot
be aggregated and lines that cannot be sent are counted by reason
(:class:`agent.metrics.worker.Losses`), warned about (rate-limited) and sent as
``agent.dropped``. A bad record is isolated: the rest of its flush is sent.

Fork safety: the metrics thread imports nothing (what it needs is imported by
:meth:`Pipeline.start` on the thread of the first metric), so a child forked
at any moment inherits no half-imported module. A child starts with an empty
queue and no thread; its first metric, or the fork hook when process CPU
metrics are on, starts its own. Nothing is joined before a fork, so ``fork()``
never waits on the pipeline. At interpreter exit pending metrics are flushed.

Instrumentations call :func:`count`, :func:`timing` and :func:`gauge` with tags
as a tuple of ``(key, value)`` pairs and know nothing about DogStatsD.
"""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

from _thread import allocate_lock

from agent import _fork, _log

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    import threading
    from collections import deque
    from collections.abc import Callable, Iterable
    from typing import Any

    from agent.config import Config
    from agent.metrics.tags import TagRules
    from agent.metrics.worker import Worker

    Tags = tuple[tuple[str, Any], ...]
    Record = tuple[int, str, float, Tags]
else:
    from _collections import deque  # `collections` itself costs ~2 ms to import

__all__ = ["configure", "count", "flush", "gauge", "timing"]

COUNT, GAUGE, TIMING = 0, 1, 2

#: How long interpreter exit waits for the last flush.
EXIT_FLUSH_TIMEOUT = 3.0

_pipeline: "Pipeline | None" = None
_exit_hook_registered = False


def record(kind: "int", name: "str", value: "float", tags: "Tags" = ()) -> "None":
    """Record one metric. Cheap, lock-free, never raises, never does I/O."""
    p = _pipeline
    if p is not None:
        if p.thread is None:
            p.start()
        p.queue.append((kind, name, value, tags))


def record_deferred(expand: "Callable[[list[Any]], Iterable[Record]]", payload: "Any") -> "None":
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


class Sink:
    """A hot path's hand-over to one ``expand``'s queue: ``sink.append(payload)``.

    What ``record_deferred(expand, payload)`` does, for a frame and a lookup less:
    once the metrics thread runs, ``append`` is its queue's own ``deque.append``.
    Until then, and from a fork or a new configuration until the next payload, it
    is :meth:`record`, which calls :func:`record_deferred` (that starts the
    thread and makes the queue) and binds ``append`` to the queue. Get one with
    :func:`sink`.
    """

    def __init__(self, expand: "Callable[[list[Any]], Iterable[Record]]") -> "None":
        self.expand = expand
        # An instance attribute that no class attribute shadows: the hot path's read
        # of it is specialised (see agent.context.Scope).
        self.append: Callable[[Any], None] = self.record

    def record(self, payload: "Any") -> "None":
        """``record_deferred`` for this sink's expand; then bind ``append`` to its queue."""
        expand = self.expand
        record_deferred(expand, payload)
        p = _pipeline
        if p is not None and p.thread is not None:
            queue = p.deferred.get(expand)
            if queue is not None:
                self.append = queue.append
                # configure() or a fork may have replaced the queue meanwhile (each
                # unbinds the sinks after): bound to a queue no thread drains, the
                # payloads would be lost.
                if _pipeline is not p or p.deferred.get(expand) is not queue:
                    self.append = self.record


_sinks: "dict[Any, Sink]" = {}


def sink(expand: "Callable[[list[Any]], Iterable[Record]]") -> "Sink":
    """The :class:`Sink` of ``expand`` (one per expand, kept for the process's life)."""
    found = _sinks.get(expand)
    if found is None:
        found = _sinks.setdefault(expand, Sink(expand))
    return found


def _unbind_sinks() -> "None":
    for found in list(_sinks.values()):
        found.append = found.record


def count(name: "str", value: "float" = 1, tags: "Tags" = ()) -> "None":
    """Add ``value`` to the count ``name``."""
    record(COUNT, name, value, tags)


def timing(name: "str", milliseconds: "float", tags: "Tags" = ()) -> "None":
    """One sample, in milliseconds, of the distribution (or histogram) ``name``."""
    record(TIMING, name, milliseconds, tags)


def gauge(name: "str", value: "float", tags: "Tags" = ()) -> "None":
    """Set the gauge ``name``; the last value of each flush interval is sent."""
    record(GAUGE, name, value, tags)


def flush(timeout: "float" = 2.0) -> "bool":
    """Send every metric recorded so far; wait at most ``timeout`` seconds.

    Returns whether the send finished in time. Scripts rarely need it: the
    pipeline flushes periodically and at interpreter exit.
    """
    p = _pipeline
    return True if p is None else p.flush(timeout)


def configure(config: "Config | None") -> "None":
    """Start sending as ``config`` says; ``None`` (or metrics disabled) stops sending."""
    global _pipeline
    old = _pipeline
    if config is not None and not config.metrics_enabled:
        config = None
    if old is not None and config is not None and old.config == config:
        return
    _pipeline = Pipeline(config) if config is not None else None
    _unbind_sinks()  # after the swap: see Sink.record
    if old is not None:
        old.close()


def active() -> "Pipeline | None":
    """The running pipeline, if metrics are enabled."""
    return _pipeline


def _reset_in_child() -> "None":
    # Runs in the child with one thread: no logging, no locks that may be held.
    if _pipeline is not None:
        _pipeline.reset_after_fork()
    _unbind_sinks()  # they hold the parent's queues


def _start_in_child() -> "None":
    # After threading's own child hook (see agent._fork): each worker of a
    # pre-forking server reports its CPU from its start, before its first metric.
    p = _pipeline
    if p is not None and p.config.runtime_metrics_interval > 0:
        p.start()


def _at_exit() -> "None":
    if _pipeline is not None:
        _pipeline.flush(EXIT_FLUSH_TIMEOUT)


_fork.after_in_child(_fork.RESET, _reset_in_child)
_fork.after_in_child(_fork.START, _start_in_child)


class Pipeline:
    """One process's metrics: the queues and the background thread (its :class:`Worker`)."""

    def __init__(self, config: "Config") -> "None":
        self.config = config
        # No maxlen: the metrics thread trims and counts what exceeds its limit.
        self.queue: deque[tuple[int, str, float, Tags]] = deque()
        self.deferred: dict[Any, deque[Any]] = {}  # expand -> its payloads
        self.thread: threading.Thread | None = None
        self.worker: Worker | None = None
        self._tags: TagRules | None = None  # the cap's state, kept across a fork
        self._start_lock = allocate_lock()
        self._cond: threading.Condition | None = None
        self._requested = 0  # flush requests made ...
        self._completed = 0  # ... and served
        self._closed = False

    # -- caller side ---------------------------------------------------------

    def start(self) -> "None":
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
                from agent.metrics import tags
                from agent.metrics.worker import Worker  # the sender, _socket, errno

                tags.compile_patterns()  # re
                _log.logger()  # logging
                host = self.config.destination.host
                if host and not host.isascii():
                    try:
                        host.encode("idna")  # imports the codecs resolving the name needs
                    except UnicodeError:
                        pass
                self._cond = threading.Condition(threading.Lock())
                worker = self.worker = Worker(self, self._tags)
                thread = threading.Thread(target=worker.run, name="talisker-metrics", daemon=True)
                thread.start()
                # Published once alive: a flush that sees it may wait for it.
                self.thread = thread
                if not _exit_hook_registered:
                    import atexit

                    atexit.register(_at_exit)
                    _exit_hook_registered = True
            except Exception:  # e.g. "can't create new thread at interpreter shutdown"
                _log.log_once(
                    "metrics-thread", "agent: cannot start the metrics thread", exc_info=True
                )

    def flush(self, timeout: "float") -> "bool":
        """Ask the background thread to send everything queued; wait up to ``timeout``."""
        import threading

        thread, cond = self.thread, self._cond
        if thread is None or cond is None:
            worker = self.worker
            losses = worker is not None and worker.losses.pending
            if not self.queue and not any(self.deferred.values()) and not losses:
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

    def close(self) -> "None":
        """Send what is queued and stop the thread (when the agent is reconfigured)."""
        if self.thread is not None:
            self.flush(1.0)
        self._closed = True
        cond = self._cond
        if cond is not None:
            with cond:
                cond.notify_all()

    def reset_after_fork(self) -> "None":
        """In a forked child: forget the parent's queue, thread, socket and losses."""
        self.queue = deque()
        self.deferred = {}
        self.thread = None
        self._cond = None
        self._start_lock = allocate_lock()
        self._requested = self._completed = 0
        worker, self.worker = self.worker, None  # its losses are the parent's to report
        if worker is not None:
            self._tags = worker.tags  # values already admitted stay admitted
            worker.close_sender()  # the parent's socket, inherited: the child opens its own


def active_thread() -> "threading.Thread | None":
    """The metrics thread of this process, if it runs."""
    p = _pipeline
    return p.thread if p is not None else None
