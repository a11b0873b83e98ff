"""Start-up cost: `python -c "import agent"` and `talisker-run python -c pass`.

Both against `python -c pass`, median of 20 alternating runs each.
Targets (issue 14): import agent at most +3 ms; talisker-run at most +20 ms. For scale,
a process that records one metric and exits (the first metric's imports, the
metrics thread, the exit flush's send).
"""

from __future__ import annotations

import socket
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


if __name__ == "__main__":
    main()
