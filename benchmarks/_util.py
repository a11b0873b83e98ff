"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
