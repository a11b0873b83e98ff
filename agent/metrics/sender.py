"""Writes aggregated batches to the DogStatsD destination, from the metrics thread.

The agent aggregates, sanitises and batches metrics itself, so sending is a
small socket writer of its own, not ``datadog``'s ``DogStatsd``: importing
``datadog`` costs 0.1-0.3 s (it pulls in ``urllib.parse``, ``typing``,
``urllib3``, ``requests``...), and a ``fork()`` of the application during that
import in the metrics thread gave children half-initialised modules (hangs and
``ImportError``). This module imports only ``_socket``, and it is imported by
:meth:`agent.metrics.Pipeline.start` on the thread that records the first
metric, so the metrics thread itself never imports anything.

The wire format is the ``datadog`` client's: ``<prefix>.<name>:<value>|<type>``,
then ``|#`` and the metric's tags followed by the constant tags, then ``|c:``
and the container id (origin detection from ``/proc/self/cgroup``, unless
``DD_ORIGIN_DETECTION_ENABLED`` is false) and ``|e:`` with ``DD_EXTERNAL_ENV``.
Lines are joined with newlines into datagrams of at most 1432 bytes over UDP
and 8192 over a unix socket (``unixstream://`` frames each with its
little-endian 32-bit length). ``DD_ENTITY_ID`` becomes the constant tag
``dd.internal.entity_id``; ``DD_DOGSTATSD_DISABLE`` sends nothing.

- The destination is resolved once (UDP host names through ``getaddrinfo``); a
  name that does not resolve is retried every :data:`RESOLVE_RETRY` seconds.
- A full socket buffer (a unix socket whose reader stopped) is waited for at
  most :data:`SOCKET_FULL_WAIT` per flush, then the rest of the flush is dropped.
- Every line that cannot be delivered is counted in the pipeline's
  :class:`agent.metrics.worker.Losses` by reason (``unresolved``, ``socket_full``,
  ``send_failed``); after each flush the pending counts are sent as
  ``agent.dropped`` in a datagram of their own and kept until one is delivered.
"""

from __future__ import annotations

import _socket
import errno
import os
import time

from agent import _log
from agent.metrics.origin import origin_fields
from agent.metrics.tags import constant_tags, sanitize_tag_value

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Any

    from agent.config import Config, Destination
    from agent.metrics.worker import Losses

    Context = tuple[str, tuple[str, ...]]

#: Seconds between attempts to resolve a destination that did not resolve.
RESOLVE_RETRY = 30.0
#: Timing samples per DogStatsD line (protocol 1.1 multi-value, ``name:1:2:3|d``).
SAMPLES_PER_LINE = 32
#: Most bytes per datagram, as the datadog client sends them.
UDP_PAYLOAD = 1432
UDS_PAYLOAD = 8192
#: Seconds per flush the metrics thread waits for a full socket buffer to drain.
SOCKET_FULL_WAIT = 0.1
#: Send buffer a socket is given at least (macOS gives 4 KiB, less than one datagram).
MIN_SEND_BUFFER = 32 * 1024
#: What the agent's own loss counts are sent as (with a ``reason`` tag).
DROPPED_METRIC = "agent.dropped"
#: The reasons a send can fail for; their warnings start again once metrics get through.
DELIVERY_REASONS = ("unresolved", "socket_full", "send_failed")

_FULL_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})


class Batch:
    """One flush worth of aggregated metrics, keyed by sanitised context."""

    __slots__ = ("counts", "gauges", "timings")

    def __init__(self) -> None:
        self.counts: dict[Context, float] = {}
        self.gauges: dict[Context, float] = {}
        self.timings: dict[Context, list[float]] = {}

    def empty(self) -> bool:
        return not (self.counts or self.gauges or self.timings)


class _SocketFull(Exception):
    """The socket's buffer stayed full for the flush's whole waiting budget."""


class Sender:
    """The DogStatsD socket of one process, opened on first use in the metrics thread."""

    def __init__(self, config: Config, losses: Losses) -> None:
        environ = os.environ
        self.destination: Destination = config.destination
        self.losses = losses
        self.namespace = config.prefix + "." if config.prefix else ""
        self.timing_type = "d" if config.timing_type == "distribution" else "h"
        tags = constant_tags(config)
        entity_id = environ.get("DD_ENTITY_ID")
        if entity_id:
            tags.append(f"dd.internal.entity_id:{sanitize_tag_value(entity_id)}")
        self.constant_tags = ",".join(tags)
        self.origin = origin_fields(environ)
        self.enabled = environ.get("DD_DOGSTATSD_DISABLE") not in {"True", "true", "yes", "1"}
        self.stream = False
        self.udp = self.destination.scheme == "udp"
        self.payload = UDP_PAYLOAD if self.udp else UDS_PAYLOAD
        self._sock: _socket.socket | None = None
        self._address: tuple[int, Any] | None = None
        self._next_resolve = 0.0
        self._failing = False

    # -- formatting ----------------------------------------------------------------

    def lines(self, batch: Batch) -> Iterator[str]:
        """The DogStatsD lines of ``batch``; a value that is not a number is counted, not sent."""
        ns, end = self.namespace, self.origin
        for kind, series in (("c", batch.counts), ("g", batch.gauges)):
            for (name, tags), value in series.items():
                try:
                    text = _number(value)
                except Exception:
                    self._bad_value(name, value)
                    continue
                yield f"{ns}{name}:{text}|{kind}{self._tags(tags)}{end}"
        kind = self.timing_type
        for (name, tags), samples in batch.timings.items():
            tag_part = self._tags(tags)
            for i in range(0, len(samples), SAMPLES_PER_LINE):
                chunk = samples[i : i + SAMPLES_PER_LINE]
                try:
                    # One format of the whole line: a "%.3f" per sample joined costs
                    # half as much again (one format call and string per sample).
                    fmt = _FORMATS.get(len(chunk)) or _line_format(len(chunk))
                    text = fmt % tuple(chunk)
                    if "n" in text:  # nan or inf: no digit, "-", "." or ":" has an n
                        raise ValueError
                except Exception:
                    text = self._good_samples(name, chunk)
                    if not text:
                        continue
                yield f"{ns}{name}:{text}|{kind}{tag_part}{end}"

    def _tags(self, tags: tuple[str, ...]) -> str:
        if tags:
            joined = ",".join(tags)
            return f"|#{joined},{self.constant_tags}" if self.constant_tags else "|#" + joined
        return "|#" + self.constant_tags if self.constant_tags else ""

    def _good_samples(self, name: str, chunk: list[float]) -> str:
        good = []
        for v in chunk:
            try:
                good.append(_number_text(v))
            except Exception:
                self._bad_value(name, v)
        return ":".join(good)

    def _bad_value(self, name: str, value: object) -> None:
        what = type(value).__name__
        if what == "float":
            self.losses.bad_record(name, f"a value that is not a finite number ({value!r})")
        else:
            self.losses.bad_record(name, f"a value of type {what}")

    # -- sending ----------------------------------------------------------------------

    def send(self, batch: Batch) -> None:
        """Send ``batch``, then the pending loss counts; count what cannot be sent."""
        if not self.enabled:
            return
        # Packed as they are sent: each send releases the GIL for the application's threads.
        datagrams = pack(self.lines(batch), self.payload)
        lost, detail, sent_any = self._send_all(datagrams, time.monotonic() + SOCKET_FULL_WAIT)
        for reason, n in lost.items():
            if reason == "unresolved":  # _open has warned, rate-limited, when it did not resolve
                self.losses.count(reason, n)
            else:
                self.losses.add(
                    reason,
                    n,
                    "agent: metrics to %s are being dropped: %s (%d lines, reason %s)",
                    self.destination,
                    detail,
                    n,
                    reason,
                )
        pending = dict(self.losses.pending)
        if pending:
            report = [
                f"{self.namespace}{DROPPED_METRIC}:{n}|c{self._tags(('reason:' + reason,))}"
                f"{self.origin}"
                for reason, n in sorted(pending.items())
            ]
            # The report's own failure is no loss of the application's: the counts stay pending.
            if not self._send_all(pack(report, self.payload), time.monotonic())[0]:
                self.losses.reported(pending)
        if lost:
            self._failing = True
        elif self._failing and sent_any:
            self._failing = False
            self.losses.reset_warnings(DELIVERY_REASONS)
            _log.logger().info("agent: metrics to %s are being delivered again", self.destination)

    def _send_all(
        self, datagrams: Iterator[tuple[bytes, int]], wait_until: float
    ) -> tuple[dict[str, int], str, bool]:
        """Send each ``(datagram, lines)``: lines lost by reason, the last error, any sent."""
        lost: dict[str, int] = {}
        detail = ""
        sent_any = False
        may_reconnect = True
        for data, n in datagrams:
            had_socket = self._sock is not None
            failure = self._deliver(data, wait_until)
            retry = failure and failure[0] == "send_failed" and had_socket and not self.udp
            if retry and may_reconnect:  # the reader may have restarted: reconnect once per flush
                may_reconnect = False
                failure = self._deliver(data, wait_until)
            if failure is None:
                sent_any = True
                continue
            reason, detail = failure
            lost[reason] = lost.get(reason, 0) + n
            if reason == "socket_full":
                wait_until = 0.0  # waited once this flush: the rest is tried without waiting
            if self._sock is None:
                # Not connected (no address, a refused connect, a broken stream): the rest of
                # the flush shares the fate, without one more attempt per datagram.
                lost[reason] += sum(m for _, m in datagrams)
                break
        return lost, detail, sent_any

    def _deliver(self, data: bytes, wait_until: float) -> tuple[str, str] | None:
        """Send one datagram: None, or why it was not sent ``(reason, detail)``."""
        try:
            sock = self._sock or self._open()
            if sock is None:
                return "unresolved", "the destination does not resolve"
            self._write(sock, data, wait_until)
            return None
        except _SocketFull:
            if self.stream:
                self._close()  # part of a frame may be written: the stream is unusable
            return "socket_full", "its socket buffer is full (its reader is not reading)"
        except OSError as exc:
            if not self.udp:
                self._close()  # the next datagram reconnects (UDP errors leave the socket usable)
            return "send_failed", _describe(exc)

    def _write(self, sock: _socket.socket, data: bytes, wait_until: float) -> None:
        if self.stream:
            data = len(data).to_bytes(4, "little") + data
            sock.settimeout(max(wait_until - time.monotonic(), 0.001))
            try:
                sock.sendall(data)
            except TimeoutError:
                raise _SocketFull from None
            return
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno not in _FULL_ERRNOS:
                raise
            left = wait_until - time.monotonic()
            if left <= 0:
                raise _SocketFull from None
            sock.settimeout(left)
            try:
                sock.send(data)
            except (TimeoutError, BlockingIOError):
                raise _SocketFull from None
            finally:
                sock.settimeout(0.0)
        if self.udp:
            # A closed port answers with ICMP; on loopback it is already here: this one bounced.
            error = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))

    def _open(self) -> _socket.socket | None:
        """Connect a non-blocking socket to the destination; None while it does not resolve."""
        dest = self.destination
        if dest.scheme == "udp":
            if self._address is None:
                now = time.monotonic()
                if now < self._next_resolve:
                    return None
                try:
                    self._address = resolve(dest.host or "localhost", dest.port or 8125)
                except OSError as exc:
                    self._next_resolve = now + RESOLVE_RETRY
                    self.losses.warn(
                        "unresolved",
                        "agent: metrics destination %s does not resolve (%s); metrics are "
                        "dropped until it does (retrying every %ds)",
                        dest,
                        exc,
                        RESOLVE_RETRY,
                    )
                    return None
            family, address = self._address
            sock = _socket.socket(family, _socket.SOCK_DGRAM)
            try:
                _grow_send_buffer(sock)
                sock.connect(address)
                sock.settimeout(0.0)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            return sock
        kinds = {
            "unixgram": (_socket.SOCK_DGRAM,),
            "unixstream": (_socket.SOCK_STREAM,),
        }.get(dest.scheme, (_socket.SOCK_DGRAM, _socket.SOCK_STREAM))
        for kind in kinds:
            sock = _socket.socket(_socket.AF_UNIX, kind)
            try:
                _grow_send_buffer(sock)
                sock.settimeout(SOCKET_FULL_WAIT)
                sock.connect(dest.path or "")
                sock.settimeout(0.0)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EPROTOTYPE and kind != kinds[-1]:
                    continue  # a stream socket at a unix:// path: try the other kind
                raise
            self.stream = kind == _socket.SOCK_STREAM
            self._sock = sock
            return sock
        return None  # pragma: no cover - kinds is never empty

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:  # pragma: no cover
                pass

    def close(self) -> None:
        """Close the socket (the pipeline is replaced, or this is a forked child)."""
        self._close()


def pack(lines: Iterable[str], limit: int) -> Iterator[tuple[bytes, int]]:
    """Newline-terminated lines in datagrams of at most ``limit`` bytes: ``(bytes, lines)``.

    A line longer than ``limit`` goes alone, as the datadog client sends it.
    """
    parts: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode("utf-8") + b"\n"
        if parts and size + len(data) > limit:
            yield b"".join(parts), len(parts)
            parts, size = [], 0
        parts.append(data)
        size += len(data)
    if parts:
        yield b"".join(parts), len(parts)


def resolve(host: str, port: int) -> tuple[int, Any]:
    """``(family, address)`` to send to, preferring IPv4 as the datadog client does."""
    # Bytes: given a str, getaddrinfo encodes it with the idna codec, importing it in
    # this thread (Pipeline.start imports it beforehand for a name that needs it).
    name = host.encode("ascii") if host.isascii() else host.encode("idna")
    infos = _socket.getaddrinfo(name, port, 0, _socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != _socket.AF_INET)
    family, _, _, _, address = infos[0]
    return family, address


def _grow_send_buffer(sock: _socket.socket) -> None:
    if sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF) <= MIN_SEND_BUFFER:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, MIN_SEND_BUFFER)


def _describe(exc: OSError) -> str:
    """``[Errno 111] Connection refused``: the error, never an address."""
    if exc.errno is not None:
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return type(exc).__name__


#: "%.3f:%.3f:...", by the number of samples in a line.
_FORMATS: dict[int, str] = {}


def _line_format(samples: int) -> str:
    fmt = _FORMATS[samples] = ":".join(["%.3f"] * samples)
    return fmt


def _number(value: float) -> str:
    number = float(value)
    if number - number != 0:  # nan or inf: DogStatsD would sum or average it into every series
        raise ValueError(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _number_text(value: float) -> str:
    number = float(value)
    if number - number != 0:
        raise ValueError(value)
    return "%.3f" % number  # noqa: UP031
