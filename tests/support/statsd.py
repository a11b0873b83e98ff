"""A DogStatsD receiver on a real socket, with a strict datagram parser.

Every line received is parsed; a line with an illegal name, value, type or
tag is recorded in ``errors``, and the ``statsd`` fixture fails the test that
produced it.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")
TAG_RE = re.compile(r"^[A-Za-z][\w\-./]*(:[\w\-./:]+)?$")
TYPES = {"c", "g", "ms", "h", "d", "s"}
MULTI_VALUE_TYPES = {"ms", "h", "d"}
RESERVED_KEYS = {"host", "device", "source"}


class DatagramError(ValueError):
    """A line that a DogStatsD server would reject or misread."""


class Metric:
    """One parsed DogStatsD line."""

    def __init__(self, name: str, values: list[float], type_: str, tags: list[str], line: str):
        self.sender: object = None  # the address the datagram came from
        self.name = name
        self.values = values
        self.type = type_
        self.tags = tags
        self.line = line

    @property
    def value(self) -> float:
        return self.values[0]

    def tag(self, key: str) -> str | None:
        """The value of tag ``key`` (None when absent)."""
        for t in self.tags:
            k, _, v = t.partition(":")
            if k == key:
                return v
        return None

    @property
    def tag_dict(self) -> dict[str, str]:
        return dict(t.partition(":")[::2] for t in self.tags)

    def __repr__(self) -> str:
        return f"Metric({self.line!r})"


def parse_line(line: str) -> Metric:
    """Parse one line strictly; raise :class:`DatagramError` on anything doubtful."""
    if not line or line != line.strip() or "\r" in line:
        raise DatagramError(f"empty or padded line: {line!r}")
    head, *fields = line.split("|")
    name, sep, raw_values = head.partition(":")
    if not sep:
        raise DatagramError(f"no value: {line!r}")
    if not NAME_RE.match(name) or ".." in name or len(name) > 200:
        raise DatagramError(f"illegal metric name {name!r} in {line!r}")
    if not fields:
        raise DatagramError(f"no type: {line!r}")
    type_ = fields[0]
    if type_ not in TYPES:
        raise DatagramError(f"illegal type {type_!r} in {line!r}")
    values = []
    for raw in raw_values.split(":"):
        try:
            value = float(raw)
        except ValueError:
            raise DatagramError(f"illegal value {raw!r} in {line!r}") from None
        if value - value != 0:  # nan, inf: parsed, then summed into every series
            raise DatagramError(f"a value that is not finite {raw!r} in {line!r}")
        values.append(value)
    if len(values) > 1 and type_ not in MULTI_VALUE_TYPES:
        raise DatagramError(f"several values for type {type_!r}: {line!r}")
    tags: list[str] = []
    seen_tags = False
    for field in fields[1:]:
        if field.startswith("#"):
            if seen_tags:
                raise DatagramError(f"two tag sections: {line!r}")
            seen_tags = True
            tags = field[1:].split(",")
            for tag in tags:
                if not TAG_RE.match(tag) or len(tag) > 250:
                    raise DatagramError(f"illegal tag {tag!r} in {line!r}")
                if tag.partition(":")[0] in RESERVED_KEYS:
                    raise DatagramError(f"reserved tag key in {tag!r}: {line!r}")
        elif field.startswith("@"):
            float(field[1:])
        elif field.startswith(("c:", "e:", "card:")) or (
            field.startswith("T") and field[1:].isdigit()
        ):
            pass  # container id, external data, cardinality, timestamp
        else:
            raise DatagramError(f"unknown field {field!r} in {line!r}")
    services = [t for t in tags if t.startswith("service:")]
    if len(services) > 1:
        raise DatagramError(f"service tag twice: {line!r}")
    return Metric(name, values, type_, tags, line)


class Receiver:
    """Receives DogStatsD datagrams on a UDP port, a unix datagram socket or a unix stream.

    ``kind`` is ``udp``, ``unix`` (datagrams) or ``unixstream`` (frames, each with
    its little-endian 32-bit length). ``address`` binds a given port or path
    instead of a fresh one; ``reading=False`` binds without reading until
    :meth:`start_reading` (a stopped reader, whose socket buffer fills up).
    """

    def __init__(
        self, kind: str = "udp", address: int | str | None = None, reading: bool = True
    ) -> None:
        self.kind = kind
        self.metrics: list[Metric] = []
        self.errors: list[str] = []
        self.datagrams: list[bytes] = []
        self._cond = threading.Condition()
        self._dir: str | None = None
        if kind == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", int(address or 0)))
            self.port = self.sock.getsockname()[1]
            self.url = f"udp://127.0.0.1:{self.port}"
            self.path = None
        else:
            if address is None:
                self._dir = tempfile.mkdtemp(prefix="dsd")
                address = os.path.join(self._dir, "dsd.socket")
            self.path = str(address)
            stream = kind == "unixstream"
            self.sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM
            )
            self.sock.bind(self.path)
            if stream:
                self.sock.listen(8)
            self.url = f"{'unixstream' if stream else 'unix'}://{self.path}"
        if kind != "unixstream":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        if reading:
            self._thread.start()

    def start_reading(self) -> None:
        """Start reading (a receiver made with ``reading=False``)."""
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        """Environment pointing the agent at this receiver."""
        return {"DD_DOGSTATSD_URL": self.url}

    def _run(self) -> None:
        if self.kind == "unixstream":
            self._accept()
            return
        while not self._closed:
            try:
                data, sender = self.sock.recvfrom(65535)
            except OSError:
                return
            if self._closed:
                return
            self._received(data, sender)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read_frames, args=(conn,), daemon=True).start()

    def _read_frames(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while not self._closed:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 4:
                    size = int.from_bytes(buffer[:4], "little")
                    if len(buffer) < 4 + size:
                        break
                    self._received(buffer[4 : 4 + size], id(conn))
                    buffer = buffer[4 + size :]

    def _received(self, data: bytes, sender: object) -> None:
        with self._cond:
            self.datagrams.append(data)
            for line in data.decode("utf-8", "replace").split("\n"):
                if not line:
                    continue
                try:
                    metric = parse_line(line)
                    metric.sender = sender
                    self.metrics.append(metric)
                except DatagramError as exc:
                    self.errors.append(str(exc))
            self._cond.notify_all()

    def find(self, name: str, **tags: str) -> list[Metric]:
        """Received metrics named ``name`` (with the prefix) having all of ``tags``."""
        with self._cond:
            return [
                m
                for m in self.metrics
                if m.name == name and all(m.tag(k) == v for k, v in tags.items())
            ]

    def total(self, name: str, **tags: str) -> float:
        """Sum of the values of the matching metrics (counts add up across flushes)."""
        return sum(v for m in self.find(name, **tags) for v in m.values)

    def samples(self, name: str, **tags: str) -> list[float]:
        """Every sample of the matching timing metrics."""
        return [v for m in self.find(name, **tags) for v in m.values]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds (re-checked as datagrams arrive)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def flushed(
        self, flush: Callable[[], object], predicate: Callable[[], bool], timeout: float = 10.0
    ) -> bool:
        """``flush()``, then wait until ``predicate()`` holds, flushing again while it does not.

        A server records a request once its response is sent, which can be after the
        client has read it: one flush right after the response may come too early.
        """
        deadline = time.monotonic() + timeout
        while True:
            flush()
            if self.wait_for(predicate, 0.25):
                return True
            if time.monotonic() >= deadline:
                return False

    def wait_total(self, name: str, expected: float, timeout: float = 5.0, **tags: str) -> float:
        """Wait until the total of ``name`` reaches ``expected``; return the total."""
        self.wait_for(lambda: self.total(name, **tags) >= expected, timeout)
        time.sleep(0.05)  # let a surplus arrive, so over-counting is caught too
        return self.total(name, **tags)

    def names(self) -> set[str]:
        with self._cond:
            return {m.name for m in self.metrics}

    def clear(self) -> None:
        with self._cond:
            self.metrics.clear()
            self.datagrams.clear()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            if self.path:
                try:
                    os.unlink(self.path)
                    if self._dir:
                        os.rmdir(self._dir)
                except OSError:
                    pass

    def raw_text(self) -> str:
        with self._cond:
            return "\n".join(d.decode("utf-8", "replace") for d in self.datagrams)


def lines_of(metrics: Iterable[Metric]) -> list[str]:
    return [m.line for m in metrics]
