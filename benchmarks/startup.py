"""Start-up cost: `python -c "import agent"` and `talisker-run python -c pass`.

Both against `python -c pass`, median of 20 alternating runs each.
Targets (issue 14): import agent at most +3 ms; talisker-run at most +20 ms. For scale,
a process that records one metric and exits (the first metric's imports, the
metrics thread, the exit flush's send).

Then, where valgrind is installed, the same in instructions (callgrind, the
median of three runs each): the figure that does not move with the host's
load, reported beside the wall time the targets are judged in. The launcher
is counted up to its ``exec`` (of a command that does not exist: callgrind
loses the count of a process that execs), and the command it runs on its own,
in the environment the launcher gives it; ``talisker-run`` is their sum.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import tempfile
from pathlib import Path

from _util import agent_env, compile_bytecode, python, time_commands

TARGETS = {'python -c "import agent"': 3.0, "talisker-run python -c pass": 20.0}


def main() -> None:
    compile_bytecode()
    py = python()
    launcher = str(Path(py).with_name("talisker-run"))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # where the one metric goes
    sink.bind(("127.0.0.1", 0))
    results = time_commands(
        {
            "python -c pass": [py, "-c", "pass"],
            'python -c "import agent"': [py, "-c", "import agent"],
            "talisker-run python -c pass": [launcher, py, "-c", "pass"],
            "one metric, then exit": [
                py,
                "-c",
                "import agent; from agent import metrics; metrics.count('x')",
            ],
        },
        agent_env(DD_DOGSTATSD_URL=f"udp://127.0.0.1:{sink.getsockname()[1]}"),
    )
    base = results["python -c pass"]
    print(f"{'command':<32} {'median ms':>10} {'added ms':>9} {'target':>8}")
    for name, ms in results.items():
        target = TARGETS.get(name)
        shown = f"{target:>+7.0f}" if target else ""
        verdict = "" if target is None or ms - base <= target else "  over target"
        print(f"{name:<32} {ms:>10.1f} {ms - base:>+9.1f} {shown:>8}{verdict}")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("(valgrind not found: start-up instructions not counted)")
        return
    env = agent_env(DD_DOGSTATSD_URL=f"udp://127.0.0.1:{sink.getsockname()[1]}")
    child_env = {**env, "PYTHONPATH": f"{BOOTSTRAP}:{env['PYTHONPATH']}"}  # as the launcher's
    counts = {
        "python -c pass": instructions(valgrind, [py, "-c", "pass"], env),
        'python -c "import agent"': instructions(valgrind, [py, "-c", "import agent"], env),
        "talisker-run, launcher to exec": instructions(
            valgrind, [launcher, "/nonexistent/talisker-bench-command"], env
        ),
        "talisker-run, the command": instructions(valgrind, [py, "-c", "pass"], child_env),
    }
    counts["talisker-run python -c pass"] = (
        counts["talisker-run, launcher to exec"] + counts["talisker-run, the command"]
    )
    base_count = counts["python -c pass"]
    print(f"\n{'command (instructions)':<32} {'millions':>10} {'added':>9}")
    for name, count in counts.items():
        added = f"{(count - base_count) / 1e6:>+9.1f}" if name in TARGETS else ""
        print(f"{name:<32} {count / 1e6:>10.1f} {added}")


#: The bootstrap directory that talisker-run puts first on its command's PYTHONPATH.
BOOTSTRAP = str(Path(__file__).resolve().parents[1] / "agent" / "bootstrap")


def instructions(valgrind: str, command: list[str], env: dict[str, str], runs: int = 3) -> float:
    """Instructions of ``command`` (and none of a process it execs), median of ``runs``."""
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        for _ in range(runs):
            subprocess.run(
                [valgrind, "-q", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                env=env,
                capture_output=True,
                check=False,  # the launcher's command does not exist: it exits 127
            )
            for line in out.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    counts.append(float(line.split()[1]))
                    break
    return statistics.median(counts)


if __name__ == "__main__":
    main()
