"""Sends aggregated batches through ``datadog``'s ``DogStatsd``, from the metrics thread.

Only the background thread of :mod:`agent.metrics` uses this module, so the
~120 ms ``import datadog`` (it pulls in ``datadog.api``) and every socket call
happen off the application's threads and off the start-up path.

- The destination is resolved once (UDP host names through ``getaddrinfo``);
  ``DogStatsd`` gets the address, so it never resolves per packet. A name that
  does not resolve is retried every :data:`RESOLVE_RETRY` seconds and metrics
  are dropped meanwhile.
- ``DogStatsd`` is built with no buffering thread, no aggregation thread, no
  background sender and no instance tracking: its fork hook has nothing to
  join, so ``fork()`` never waits on it. Batching is its ``open_buffer``.
- What it logs about failed sends, from our thread only, is folded into one
  rate-limited warning instead of one per packet.
"""

from __future__ import annotations

import socket
import threading
import time

from agent import _log
from agent.metrics import constant_tags

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    import logging
    from typing import Any

    from agent.config import Config, Destination

    Context = tuple[str, tuple[str, ...]]

#: Seconds between attempts to resolve a destination that did not resolve.
RESOLVE_RETRY = 30.0
#: Seconds between two warnings about the same failing destination.
WARNING_PERIOD = 300.0
#: Timing samples per DogStatsD line (protocol 1.1 multi-value, ``name:1:2:3|d``).
SAMPLES_PER_LINE = 32

# Thread ident -> the Sender sending on it: their datadog log records are ours.
_sending: dict[int, Sender] = {}
_filter_installed = False


class Batch:
    """One flush worth of aggregated metrics, keyed by sanitised context."""

    __slots__ = ("counts", "gauges", "timings")

    def __init__(self) -> None:
        self.counts: dict[Context, float] = {}
        self.gauges: dict[Context, float] = {}
        self.timings: dict[Context, list[float]] = {}

    def empty(self) -> bool:
        return not (self.counts or self.gauges or self.timings)


class Sender:
    """A ``DogStatsd`` client for one process, built on first use in the metrics thread."""

    def __init__(self, config: Config) -> None:
        self.destination: Destination = config.destination
        self.prefix = config.prefix
        self.constant_tags = constant_tags(config)
        self.timing_type = config.timing_type
        self._client: Any = None
        self._next_resolve = 0.0
        self._errors: list[str] = []
        self._failing = False
        self._warnings = _log.RateLimited(WARNING_PERIOD)

    def send(self, batch: Batch) -> None:
        """Send a batch; on failure, drop it and say so (rate-limited)."""
        client = self._client or self._connect()
        if client is None:
            return
        _watch_datadog_log()
        ident = threading.get_ident()
        _sending[ident] = self
        self._errors.clear()
        try:
            client.open_buffer()
            try:
                for (name, tags), value in batch.counts.items():
                    client.increment(name, _number(value), list(tags))
                for (name, tags), value in batch.gauges.items():
                    client.gauge(name, _number(value), list(tags))
                send_timing = (
                    client.distribution if self.timing_type == "distribution" else client.histogram
                )
                for (name, tags), samples in batch.timings.items():
                    tag_list = list(tags)
                    for i in range(0, len(samples), SAMPLES_PER_LINE):
                        chunk = samples[i : i + SAMPLES_PER_LINE]
                        send_timing(name, ":".join(["%.3f" % v for v in chunk]), tag_list)  # noqa: UP031 - fastest
            finally:
                client.close_buffer()
        finally:
            _sending.pop(ident, None)
        if self._errors:
            self._failing = True
            self._warnings.warning(
                "agent: metrics to %s are being dropped: %s", self.destination, self._errors[-1]
            )
        elif self._failing:
            self._failing = False
            self._warnings.reset()
            _log.logger().info("agent: metrics to %s are being delivered again", self.destination)

    def record_error(self, message: str) -> None:
        self._errors.append(message)

    def _connect(self) -> Any:
        now = time.monotonic()
        if now < self._next_resolve:
            return None
        dest = self.destination
        host = port = path = None
        if dest.scheme == "udp":
            try:
                port = dest.port
                host = _resolve(dest.host or "localhost", port or 8125)
            except OSError as exc:
                self._next_resolve = now + RESOLVE_RETRY
                self._warnings.warning(
                    "agent: metrics destination %s does not resolve (%s); metrics are dropped "
                    "until it does (retrying every %ds)",
                    dest,
                    exc,
                    RESOLVE_RETRY,
                )
                return None
        else:
            path = str(dest)  # DogStatsd picks the socket kind from the scheme
        from datadog.dogstatsd.base import DogStatsd

        client = DogStatsd(
            host=host,
            port=port,
            socket_path=path,
            namespace=self.prefix or None,
            disable_telemetry=True,
            disable_buffering=True,
            disable_aggregation=True,
            disable_background_sender=True,
            track_instance=False,
        )
        # Ours replace the ones DogStatsd reads itself (DD_ENV, DD_SERVICE...), so they
        # are sanitised by our rules and never sent twice.
        client.constant_tags = list(self.constant_tags)
        self._client = client
        return client


def _resolve(host: str, port: int) -> str:
    """The address to send to, preferring IPv4 as DogStatsd does."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _watch_datadog_log() -> None:
    global _filter_installed
    if not _filter_installed:
        import logging

        logging.getLogger("datadog.dogstatsd").addFilter(_fold_own_records)
        _filter_installed = True


def _fold_own_records(record: logging.LogRecord) -> bool:
    """Logging filter: our sends' records become one rate-limited warning of ours."""
    sender = _sending.get(record.thread or 0)
    if sender is None:
        return True
    if record.levelno >= 30:
        try:
            sender.record_error(record.getMessage())
        except Exception:  # pragma: no cover
            pass
    return False
