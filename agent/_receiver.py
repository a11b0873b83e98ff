"""An embedded DogStatsD receiver for ``talisker-run --print-metrics``.

Collects what a program sends over UDP on loopback and renders a readable
table: one row per metric and tag set, with the count (or last gauge value) and,
for timings, the number of samples and their p50, p95 and max.
"""

from __future__ import annotations

import math
import socket
import threading
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import TextIO

_TIMING_TYPES = ("d", "h", "ms")


class Collector:
    """Receives DogStatsD datagrams on ``127.0.0.1:<port>`` in a daemon thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.port: int = self.sock.getsockname()[1]
        self.rows: dict[tuple[str, str, tuple[str, ...]], list[float]] = {}
        self.malformed = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        threading.Thread(target=self._run, name="talisker-print-metrics", daemon=True).start()

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except OSError:
                return
            with self._lock:
                self._last = time.monotonic()
                for line in data.decode("utf-8", "replace").splitlines():
                    if line:
                        self._add(line)

    def _add(self, line: str) -> None:
        try:
            head, *fields = line.split("|")
            name, _, values = head.partition(":")
            kind = fields[0]
            tags: tuple[str, ...] = ()
            for field in fields[1:]:
                if field.startswith("#"):
                    tags = tuple(sorted(field[1:].split(",")))
            numbers = [float(v) for v in values.split(":")]
        except (IndexError, ValueError):
            self.malformed += 1
            return
        key = (name, kind, tags)
        found = self.rows.get(key)
        if found is None:
            self.rows[key] = numbers
        elif kind == "g":
            found[:] = numbers
        else:
            found.extend(numbers)

    def settle(self, quiet: float = 0.3, timeout: float = 3.0) -> None:
        """Wait until nothing has arrived for ``quiet`` seconds (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = time.monotonic() - self._last
            if idle >= quiet:
                return
            time.sleep(quiet - idle)

    def close(self) -> None:
        self.sock.close()

    def render(self, out: TextIO) -> None:
        """Write the table of everything received."""
        with self._lock:
            rows = sorted(self.rows.items())
        if not rows:
            out.write("talisker-run: no metrics were received\n")
            return
        table = [("metric", "tags", "count", "p50", "p95", "max")]
        for (name, kind, tags), values in rows:
            shown_tags = ",".join(
                t for t in tags if not t.startswith(("service:", "env:", "version:"))
            )
            if kind in _TIMING_TYPES:
                ordered = sorted(values)
                table.append(
                    (
                        name,
                        shown_tags,
                        str(len(ordered)),
                        _ms(_percentile(ordered, 50)),
                        _ms(_percentile(ordered, 95)),
                        _ms(ordered[-1]),
                    )
                )
            elif kind == "g":
                table.append((name, shown_tags, _number(values[-1]) + " (gauge)", "", "", ""))
            else:
                table.append((name, shown_tags, _number(sum(values)), "", "", ""))
        widths = [max(len(row[i]) for row in table) for i in range(6)]
        out.write("\n")
        for i, row in enumerate(table):
            out.write(
                "  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip() + "\n"
            )
            if i == 0:
                out.write("  ".join("-" * w for w in widths) + "\n")
        if self.malformed:
            out.write(f"({self.malformed} malformed lines ignored)\n")


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def _ms(value: float) -> str:
    return f"{value:.1f}ms"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.1f}"
