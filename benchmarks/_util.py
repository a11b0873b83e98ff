"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import compileall
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path
from typing import Any

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


def run_awaited(loop: Any, do_request: Callable[[], Any], n: int) -> float:
    """Seconds for ``n`` calls of an async ``do_request``, awaited one after the other in
    one run of ``loop`` (the loop's own start and stop outside the timing)."""

    async def calls() -> float:
        start = time.perf_counter()
        for _ in range(n):
            await do_request()
        return time.perf_counter() - start

    seconds: float = loop.run_until_complete(calls())
    return seconds


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


# The peers: other agents, measured beside this one in the same run.
PEERS = ("ddtrace", "otel")
PEER_NAMES = {"ddtrace": "ddtrace", "otel": "OpenTelemetry"}
#: What each peer needs installed (the bench extra of pyproject.toml).
PEER_PACKAGES = {
    "ddtrace": ("ddtrace",),
    "otel": (
        "opentelemetry-distro",
        "opentelemetry-instrumentation-urllib3",
        "opentelemetry-instrumentation-requests",
        "opentelemetry-instrumentation-httpx",
        "opentelemetry-instrumentation-aiohttp-client",
        "opentelemetry-instrumentation-psycopg2",
        "opentelemetry-instrumentation-flask",
    ),
}


def missing_peers() -> dict[str, list[str]]:
    """The peers that cannot run here, each with the packages it lacks."""
    missing: dict[str, list[str]] = {}
    for peer, packages in PEER_PACKAGES.items():
        for package in packages:
            try:
                metadata.version(package)
            except metadata.PackageNotFoundError:
                missing.setdefault(peer, []).append(package)
    return missing


def available_peers(skip: bool = False) -> list[str]:
    """The peers to run: every installed one, saying which are skipped and why."""
    if skip:
        print("(peers skipped: --no-peers)")
        return []
    missing = missing_peers()
    for peer, packages in missing.items():
        print(
            f"({PEER_NAMES[peer]} skipped: {', '.join(packages)} not installed; "
            f"pip install -e '.[bench]')"
        )
    return [peer for peer in PEERS if peer not in missing]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): where ddtrace's writer sends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def peer_env(mode: str, agent_root: str, closed: int) -> dict[str, str]:
    """The environment ``ddtrace-run`` or ``opentelemetry-instrument`` gives a process.

    Each launcher puts its bootstrap directory (whose ``sitecustomize`` starts
    the agent) at the head of ``PYTHONPATH`` and execs the command; doing the
    same here keeps the measured process the one under callgrind (or the one
    whose loop is timed). ddtrace: the urllib3 integration enabled (it is off
    by default), traces to a closed local port, written at the end of the
    process as ours are (an interval of an hour: a periodic job under
    callgrind is charged fifty times its share), telemetry and remote
    configuration (periodic, not per request) off. OpenTelemetry: the distro's
    SDK with the traces, metrics and logs exporters ``none``; every
    instrumentation installed (urllib3, requests, httpx, aiohttp, psycopg2, Flask) is loaded,
    as ``opentelemetry-instrument`` does.
    """
    if mode == "ddtrace":
        import ddtrace

        bootstrap = os.path.join(os.path.dirname(ddtrace.__file__), "bootstrap")
        return {
            "PYTHONPATH": f"{bootstrap}{os.pathsep}{agent_root}",
            "DD_TRACE_AGENT_URL": f"http://127.0.0.1:{closed}",
            "DD_PATCH_MODULES": "urllib3:true",
            "DD_TRACE_WRITER_INTERVAL_SECONDS": "3600",
            "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
            "DD_REMOTE_CONFIGURATION_ENABLED": "false",
            "DD_SERVICE": "bench",
        }
    from opentelemetry.instrumentation import auto_instrumentation

    bootstrap = os.path.dirname(auto_instrumentation.__file__)
    return {
        "PYTHONPATH": f"{bootstrap}{os.pathsep}{agent_root}",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "bench",
    }


def peer_process_env(mode: str, closed: int, **extra: str) -> dict[str, str]:
    """A wall-clock peer process's whole environment: ours less any agent's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TALISKER_", "DD_", "OTEL_", "STATSD_DSN", "PYTHONPATH", "BENCH_"))
    }
    env.update(peer_env(mode, str(ROOT), closed))
    env.update(extra)
    return env


WORKER = Path(__file__).resolve().with_name("_peer_worker.py")


class PeerWorker:
    """A process running one path's loop under a peer, a round at a time, on command.

    ``_peer_worker.py PATH`` started with :func:`peer_process_env`: it sets the
    path up (connection, warm-up), says ``ready``, then for each line
    ``KIND N`` it reads makes N calls and answers with the µs per call. KIND is
    ``peer`` (the path's loop, instrumented by the peer) or, where the worker
    has one, ``raw`` (the same loop through the library's own class on the same
    connection: psycopg2's cursor, so that the peer's added cost is measured
    against its own PostgreSQL backend).
    """

    def __init__(self, path: str, mode: str, closed: int, **extra: str) -> None:
        self.label = f"{path} under {PEER_NAMES[mode]}"
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), path, mode],
            env=peer_process_env(mode, closed, **extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._readline()
        if line != "ready":
            raise SystemExit(f"{self.label}: the worker did not start ({line!r})")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"{self.label}: the worker exited ({code})")
        return line.strip()

    def round(self, n: int, kind: str = "peer") -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{kind} {n}\n")
        self.proc.stdin.flush()
        return float(self._readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Issue 14's targets, per path: (the measure it is judged in, agent / by hand at
# most, the agent's added cost at most this share of the cheaper peer's added cost).
TARGETS: dict[str, tuple[str, float, float]] = {
    "urllib3": ("instructions", 1.02, 1 / 8),
    "requests": ("instructions", 1.01, 1 / 4),
    "psycopg2-autocommit": ("wall", 1.03, 1 / 8),
    "psycopg2-transaction": ("wall", 1.03, 1 / 8),
    "wsgi": ("instructions", 1.03, 1 / 8),
}
MODES = ("raw", "hand", "wrapt", "agent", *PEERS)
#: ``wrapt``: the by-hand row under wrapt wrappers that only call through, on what the
#: agent patches (instructions only): the floor of any agent that patches with wrapt.
LABELS = {
    "raw": "raw",
    "hand": "by hand",
    "wrapt": "by hand + wrapt",
    "agent": "agent",
    **PEER_NAMES,
}


def share_text(share: float | None, target: float | None = None) -> str:
    if share is None:
        return "-"
    text = f"{share:.3f}"
    if target is not None:
        text += f" (target {_fraction(target)}: {'pass' if share <= target else 'over'})"
    return text


def _fraction(value: float) -> str:
    return f"1/{round(1 / value)}" if value < 1 else f"{value:g}"


def wall_rows(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Per mode: the median µs per call, the paired ratio to by hand, the added cost.

    A mode's added cost is the median over rounds of its µs less the raw round's
    of the same round; a peer worker that measured its own raw rounds (psycopg2:
    its own cursor on the peer's connection, the same backend) is taken against
    those (``<peer> raw``). ``agent_share`` is the agent's added cost over the
    cheaper peer's.
    """
    hand, raw = samples["hand"], samples["raw"]
    rows: dict[str, Any] = {}
    for mode, values in samples.items():
        if mode.endswith(" raw"):
            continue
        base = samples.get(f"{mode} raw", raw)
        rows[mode] = {
            "median": statistics.median(values),
            "vs_hand": paired_ratio(hand, values),
            "added": statistics.median(v - b for v, b in zip(values, base, strict=True)),
            "baseline": "own" if f"{mode} raw" in samples else "raw",
        }
        if f"{mode} raw" in samples:
            rows[mode]["own_raw"] = statistics.median(base)
    rows["agent_share"] = agent_share({m: r["added"] for m, r in rows.items()})
    return rows


def agent_share(added: dict[str, float]) -> tuple[float, str] | None:
    """The agent's added cost as a share of the cheaper peer's, and that peer."""
    peers = {mode: added[mode] for mode in PEERS if mode in added}
    if "agent" not in added or not peers:
        return None
    cheaper = min(peers, key=lambda mode: peers[mode])
    return added["agent"] / peers[cheaper], cheaper


def print_wall(path: str, rows: dict[str, Any], unit: str = "µs") -> None:
    """One path's wall-clock rows: median, ratio to by hand (IQR), added over raw."""
    measure, hand_target, share_target = TARGETS.get(path, ("", None, None))
    judged = measure == "wall"
    print(f"\n{path} (wall time, median of paired rounds)")
    print(f"  {'mode':<22} {unit + '/call':>9} {'/ by hand (IQR)':>22} {'added':>9}")
    for mode, row in rows.items():
        if mode == "agent_share":
            continue
        label = LABELS.get(mode, mode)
        note = ""
        if row["baseline"] == "own":
            note = f"  (added over its own raw cursor, {row['own_raw']:.1f})"
        if mode == "agent" and judged:
            verdict = "pass" if row["vs_hand"][0] <= hand_target else "over"
            note += f"  target {hand_target}: {verdict}"
        added = f"{row['added']:>+9.1f}" if mode != "raw" else f"{'':>9}"
        ratio = format_ratio(row["vs_hand"])
        print(f"  {label:<22} {row['median']:>9.1f} {ratio:>22} {added}{note}")
    if rows.get("agent_share"):
        share, cheaper = rows["agent_share"]
        print(
            f"  agent's added / {LABELS[cheaper]}'s (the cheaper peer): "
            + share_text(share, share_target if judged else None)
        )


def add_common_options(parser: Any) -> None:
    """The options every overhead script shares: peers, JSON output, the instructions mode."""
    parser.add_argument(
        "--no-peers", action="store_true", help="leave out the ddtrace and OpenTelemetry rows"
    )
    parser.add_argument("--json", type=Path, help="write the samples and rows here")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per call of this script's paths instead (instructions.py)",
    )
    parser.add_argument("--layouts", type=int, default=2, help="--instructions: heap layouts")
    parser.add_argument("--small", type=int, default=100, help="--instructions: short run")
    parser.add_argument("--big", type=int, default=700, help="--instructions: long run")


def instructions_mode(paths: tuple[str, ...], opts: Any) -> None:
    """instructions.py's counts for ``paths`` in every mode, and their table."""
    import instructions

    modes = ["raw", "hand", "wrapt", "agent", *available_peers(opts.no_peers)]
    figures = instructions.measure(
        paths=list(paths), modes=modes, small=opts.small, big=opts.big, layouts=opts.layouts
    )
    instructions.print_summary(figures)
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2) + "\n")


def write_json(opts: Any, script: str, paths: dict[str, Any], **settings: Any) -> None:
    if opts.json:
        figures = {"script": script, "settings": settings, "paths": paths}
        opts.json.write_text(json.dumps(figures, indent=2) + "\n")
