"""Development sessions: `nox -s tests lint typecheck docs bench`, and `nox -s upstream`."""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["tests", "compat", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

ALL_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def _found(version: str) -> bool:
    """Whether `pythonX.Y` runs here; pyenv installs are put on PATH first.

    pyenv's shims answer for every installed version but only run the selected
    one, so a shim on PATH proves nothing: look in ~/.pyenv/versions instead.
    """
    for bindir in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin"))):
        if bindir not in os.environ["PATH"].split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]
        return True
    found = shutil.which(f"python{version}")
    return found is not None and ".pyenv/shims" not in found


# Test on each supported Python this machine has.
PYTHONS = [v for v in ALL_PYTHONS if _found(v)] or ["3"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, on each Python 3.10-3.13 found."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS[-1:])
@nox.parametrize(
    "libraries",
    [
        # aiohttp 3.10 is the oldest with wheels for the Python 3.13 this runs on.
        nox.param("urllib3<2 requests~=2.28.0 httpx==0.23.* aiohttp==3.10.*", id="oldest"),
        nox.param("urllib3>=2 requests httpx aiohttp", id="newest"),
    ],
)
def compat(session: nox.Session, libraries: str) -> None:
    """The suite on the oldest and newest supported urllib3, requests, httpx and aiohttp."""
    session.install("-e", ".[test]")
    session.install(*libraries.split())
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS[-1:])
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.17.5,<0.18")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHONS[-1:])
def typecheck(session: nox.Session) -> None:
    """mypy --strict on agent/."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=PYTHONS[-1:])
def docs(session: nox.Session) -> None:
    """Strict documentation build."""
    session.install("-e", ".", "mkdocs")
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp() + "/site")


@nox.session(python=PYTHONS[-1:])
def bench(session: nox.Session) -> None:
    """Benchmarks: each path raw, by hand, agent, ddtrace and OpenTelemetry, judged (issue 14).

    `benchmarks/summary.py` runs the wall-clock scripts (start-up, metric call,
    HTTP, SQL, WSGI: 5-10 minutes) and the callgrind instruction counts
    (about 40 minutes: two heap layouts a row, eight for by hand and agent where a
    target is judged in instructions), then
    prints one table per path in both measures and the targets marked pass or
    over (docs/benchmarks.md).
    `nox -s bench -- instructions` runs only the counts, `-- timing` only the
    wall-clock scripts; `-- --quick` checks the harness in a few minutes.
    """
    session.install("-e", ".[test,bench]")
    parts = [arg for arg in session.posargs if arg in ("timing", "instructions")]
    rest = [arg for arg in session.posargs if arg not in parts]
    if "timing" not in parts and parts and shutil.which("valgrind") is None:
        session.error("valgrind not found: the instruction counts cannot run")
    # Bytecode is written, as `pip install` does: timing without it measures the compiler.
    env = {"PYTHONDONTWRITEBYTECODE": ""}
    session.run("python", "benchmarks/summary.py", *parts, *rest, env=env)


# The upstream suites run on one Python: 3.12 where found (urllib3 1.26's pinned
# test dependencies predate 3.13), else the newest found.
UPSTREAM_PYTHON = "3.12" if "3.12" in PYTHONS else PYTHONS[-1]


@nox.session(python=UPSTREAM_PYTHON)
def upstream(session: nox.Session) -> None:
    """The instrumented libraries' own test suites, plain and with the agent (docs/upstream.md).

    `nox -s upstream -- urllib3 --mode deadline -- -k timeout`: suites, then options,
    then pytest arguments after a second `--`. Not part of the default sessions: about
    45 minutes (aiohttp's suite alone about 30). Needs root (or user namespaces) for
    `unshare -n`, and PostgreSQL.
    """
    session.install("uv")  # reads the suites' uv.lock files; installs are pip's
    session.run("python", "upstream/harness.py", *session.posargs)
