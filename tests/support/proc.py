"""Run Python in a subprocess with a clean, explicit agent environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENT_VARIABLES = ("TALISKER_", "DD_", "STATSD_DSN")


def clean_env(**env: str) -> dict[str, str]:
    """The test process's environment without any agent setting, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(AGENT_VARIABLES)}
    base.pop("PYTHONPATH", None)
    base["PYTHONPATH"] = str(ROOT)
    base.update(env)
    return base


def run_python(
    code: str, env: dict[str, str] | None = None, timeout: float = 60, args: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) with this interpreter; capture stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *(args or [])],
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def check_python(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run ``code``; fail with its stderr unless it exits 0; return its stdout."""
    proc = run_python(code, env, timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
