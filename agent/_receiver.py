"""An embedded DogStatsD receiver for ``talisker-run --print-metrics``.

Collects what a program sends over UDP on loopback and renders a readable
table, grouped by metric, at most 100 columns wide: one row per tag set, with
the total of a count, the last value of a gauge, or a timing's number of
samples and their p50, p95 and max. Constant tags are shown once, above.
"""

from __future__ import annotations

import math
import socket
import threading
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TextIO

_TIMING_TYPES = ("d", "h", "ms")
#: Columns the ``--print-metrics`` table fits in.
WIDTH = 100


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

    def render(self, out: TextIO, constant_tags: Sequence[str] = (), width: int = WIDTH) -> None:
        """Write everything received, grouped by metric, in at most ``width`` columns.

        The ``constant_tags`` found on every metric are shown once, above.
        """
        with self._lock:
            rows = sorted(self.rows.items())
        if not rows:
            out.write("talisker-run: no metrics were received\n")
            return
        constant = [t for t in constant_tags if all(t in tags for (_, _, tags), _ in rows)]
        out.write("\n")
        if constant:
            out.write(_wrap("constant tags, on every metric: " + " ".join(constant), width, "    "))
            out.write("\n")
        hidden = set(constant)
        groups: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
        for (name, kind, tags), values in rows:
            shown = " ".join(t for t in tags if t not in hidden) or "(no tags)"
            groups.setdefault((name, kind), []).append((shown, _figures(kind, values)))
        out.write(_table(groups, width))
        if self.malformed:
            out.write(f"({self.malformed} malformed lines ignored)\n")


#: What each DogStatsD type's figures are, as column headings.
_HEADINGS: dict[str, tuple[str, ...]] = {"c": ("total",), "g": ("last",)}
_TIMING_HEADINGS: tuple[str, ...] = ("samples", "p50", "p95", "max")
_KINDS = {
    "c": "count",
    "g": "gauge",
    "d": "distribution, ms",
    "h": "histogram, ms",
    "ms": "timer, ms",
}


def _figures(kind: str, values: list[float]) -> list[str]:
    """A row's figures: the total of a count, the last value of a gauge, a timing's spread."""
    if kind in _TIMING_TYPES:
        ordered = sorted(values)
        return [
            str(len(ordered)),
            _ms(_percentile(ordered, 50)),
            _ms(_percentile(ordered, 95)),
            _ms(ordered[-1]),
        ]
    if kind == "g":
        return [_number(values[-1])]
    return [_number(sum(values))]


def _table(groups: dict[tuple[str, str], list[tuple[str, list[str]]]], width: int) -> str:
    """Each metric: its name, type and column headings, then a row per tag set.

    The figures of every metric end at one right edge, at most ``width``; tags
    too long for the room left wrap onto indented lines.
    """
    # Column widths per set of headings, shared by every metric of that kind.
    widths: dict[tuple[str, ...], list[int]] = {}
    for (_, kind), rows in groups.items():
        headings = _HEADINGS.get(kind, _TIMING_HEADINGS)
        found = widths.setdefault(headings, [len(h) for h in headings])
        for _, cells in rows:
            found[:] = [max(w, len(c)) for w, c in zip(found, cells, strict=True)]

    def titled(name: str, kind: str) -> tuple[str, tuple[str, ...], int]:
        headings = _HEADINGS.get(kind, _TIMING_HEADINGS)
        room = sum(widths[headings]) + 2 * (len(headings) - 1)
        return f"{name} ({_KINDS.get(kind, kind)})", headings, room

    edge = 0
    for (name, kind), rows in groups.items():
        title, _, room = titled(name, kind)
        widest = max(len(tags) for tags, _ in rows)
        edge = max(edge, max(len(title) + 2, 4 + widest) + room)
    edge = min(edge, width)

    lines = []
    for (name, kind), rows in groups.items():
        title, headings, room = titled(name, kind)
        column = widths[headings]

        def figures(cells: Sequence[str], column: list[int] = column) -> str:
            return "  ".join(cell.rjust(w) for cell, w in zip(cells, column, strict=True))

        if len(title) + 2 + room <= edge:
            lines.append(title.ljust(edge - room) + figures(headings))
        else:  # a very long metric name: the headings go under it
            lines += [_cut(title, width), figures(headings).rjust(edge)]
        tags_room = max(20, edge - room - 4)
        for tags, cells in rows:
            wrapped = _wrap_words(tags, tags_room, tags_room - 2)
            lines.append("  " + wrapped[0].ljust(tags_room) + "  " + figures(cells))
            lines += ["    " + more for more in wrapped[1:]]
    return "".join(line.rstrip() + "\n" for line in lines)


def _wrap_words(text: str, first: int, rest: int) -> list[str]:
    """``text`` cut at spaces into lines of ``first``, then ``rest``, characters at most.

    A word longer than a line (a 200-character tag) is cut across lines, not dropped.
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        limit = rest if lines else first
        if line and len(line) + 1 + len(word) <= limit:
            line += " " + word
            continue
        if line:
            lines.append(line)
            limit = rest
        left = word
        while len(left) > limit:
            lines.append(left[:limit])
            left, limit = left[limit:], rest
        line = left
    lines.append(line)
    return lines


def _wrap(text: str, width: int, indent: str) -> str:
    lines = _wrap_words(text, width, width - len(indent))
    return "\n".join([lines[0], *(indent + line for line in lines[1:])]) + "\n"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def _ms(value: float) -> str:
    return f"{value:.1f}"  # the unit is in the metric's heading


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.1f}"
