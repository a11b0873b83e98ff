"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import compileall
import os
import random
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[1]
ORDER_SEED = 20261121


def compile_bytecode() -> None:
    """Write .pyc files for the agent, as `pip install` does.

    Some machines set PYTHONDONTWRITEBYTECODE=1; timing imports without bytecode
    would measure the compiler, which no installed deployment runs.
    """
    compileall.compile_dir(str(ROOT / "agent"), quiet=1)


def agent_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TALISKER_", "DD_", "STATSD_DSN"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def time_commands(
    commands: dict[str, list[str]], env: dict[str, str], runs: int = 20
) -> dict[str, float]:
    """Median wall time (ms) of each command, the commands alternating run by run."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for cmd in commands.values():  # warm the page cache once
        subprocess.run(cmd, env=env, check=True)
    for _ in range(runs):
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def python() -> str:
    return sys.executable


def run_alternating(modes: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each mode once per round, in an order shuffled from round to round.

    On a noisy host the time per request drifts, and a round is affected by the
    one before it (an instrumented round ends with a metrics flush, whose work
    spills into the next round). A fixed order, or one rotated round by round,
    gives some mode a systematic predecessor once there are more than two
    modes: with four rotated, the raw round always followed a flush. A shuffle
    (seeded, so runs are comparable) gives every mode every predecessor equally
    often on average, which turns that carry-over into noise instead of bias.
    """
    names = list(modes)
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(ORDER_SEED)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            samples[name].append(modes[name]())
    return samples


def paired_ratio(base: list[float], other: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range of ``other/base`` over rounds taken close in time.

    Pairs from the same round cancel the drift that separate medians carry; the
    interquartile range says how far the host's noise moves one pair.
    """
    ratios = sorted(b / a for a, b in zip(base, other, strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return quartiles[1], quartiles[0], quartiles[2]


def format_ratio(ratio: tuple[float, float, float]) -> str:
    median, low, high = ratio
    return f"{median:.3f} ({low:.3f}-{high:.3f})"


# A fast server: a thread per keep-alive connection answering each request head with
# a canned response. It parses nothing, so the header bytes the agent adds cost the
# server nothing and what is measured is the client's (the application's) cost.
SERVER = textwrap.dedent(
    """
    import os, socket, threading
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    RESPONSE = (b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nX-View-Name: bench\\r\\n"
                b"Content-Type: text/plain\\r\\n\\r\\nok")
    def serve(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return conn.close()
            buf += data
            while b"\\r\\n\\r\\n" in buf:
                _, buf = buf.split(b"\\r\\n\\r\\n", 1)
                conn.sendall(RESPONSE)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)

RECEIVER = textwrap.dedent(
    """
    import os, socket
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    while True:
        s.recv(65535)
    """
)


def start(code: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())
