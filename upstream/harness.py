"""``nox -s upstream``: the instrumented libraries' own test suites, without and with the agent.

For each suite (a pinned sdist of urllib3 2.x, urllib3 1.26, requests, psycopg2,
flask, httpx, starlette, aiohttp): download the sdist, install the test
dependencies its own files name (httpx's names none: a pinned list) into a venv
of its own (cached in ``.upstream-cache/``), with the library from the sdist and
the agent from this checkout, then run the suite in three modes:

``plain``     without the agent (the plugin checks it is not even imported);
``agent``     under ``talisker-run`` (the plugin checks the wrappers are in place);
``deadline``  as ``agent``, each test phase inside ``agent.request_context(deadline=30)``.

A test that passes plain and fails, errors or is skipped in another mode, or
that turns slower than 5x and more than 3 s there, is a difference. A suite
with differences not in ``upstream/allowlist.txt`` runs again, plain and in
those modes, without the allowed tests; a difference seen again is unexpected,
and the exit status is 1 if there is any (or if a run could not be trusted).
See ``docs/upstream.md``.

Usage: ``python upstream/harness.py [SUITE...] [--mode agent|deadline|all] [--jobs N]
[--no-rerun] [-- PYTEST_ARGS...]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / ".upstream-cache"
PLUGIN_DIR = HERE / "plugin"
ALLOWLIST = HERE / "allowlist.txt"

MODES = ("plain", "agent", "deadline")
#: A test slower than this factor *and* this many seconds under the agent is a difference.
SLOW_FACTOR, SLOW_SECONDS = 5.0, 3.0
#: pytest-timeout per test, and the bound of one whole suite run.
TEST_TIMEOUT, RUN_TIMEOUT = 120, 1200
#: A process still running this long after its session ended is killed (and its stacks shown).
EXIT_GRACE = 30
#: With more candidates than this in one suite and mode, something broke wholesale:
#: they are reported without a rerun.
RERUN_LIMIT = 300
#: The only kinds of difference the allow-list may hold (see docs/upstream.md).
CATEGORIES = {
    "headers": ("agent", "deadline"),
    "type-identity": ("agent", "deadline"),
    "child-stderr": ("agent", "deadline"),
    "deadline-timeout": ("deadline",),
    "deadline-dsn": ("deadline",),
    "deadline-retry": ("deadline",),
}
GOOD = "passed"


# -- suites -------------------------------------------------------------------------------


@dataclass
class Suite:
    """One upstream test suite: where it comes from, what it needs, how it runs."""

    name: str
    project: str
    version: str
    targets: tuple[str, ...]  # instrumentations whose wrappers the plugin checks
    tests: tuple[str, ...]  # paths given to pytest, relative to the sdist root
    requirements: Callable[[Path], list[str]]  # the test dependencies, from the sdist's files
    netns: bool = True  # run in a loopback-only network namespace
    metric: str = ""  # a metric the agent must have sent in the agent modes
    pytest_args: tuple[str, ...] = ()
    run_timeout: float = RUN_TIMEOUT  # the bound of one whole run

    @property
    def sdist(self) -> str:
        return f"{self.project}-{self.version}.tar.gz"


def _git_to_index(line: str) -> str:
    """``name @ git+https://...`` -> ``name`` (a release from the index; no VCS fetch)."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*@\s*git\+\S+\s*(;.*)?$", line)
    if match is None:
        return line
    return match.group(1) + (f" {match.group(2)}" if match.group(2) else "")


def _clean(lines: Iterable[str]) -> list[str]:
    out = []
    for raw in lines:
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-e", "-r", "--")):
            out.append(_git_to_index(line))
    return out


def uv_lock_group(*groups: str) -> Callable[[Path], list[str]]:
    """The pinned closure of dependency groups, from the sdist's ``uv.lock``."""

    def read(src: Path) -> list[str]:
        only = [arg for g in groups for arg in ("--only-group", g)]
        result = subprocess.run(
            [
                _uv(),
                "export",
                "--frozen",
                "--offline",
                "--no-hashes",
                "--no-annotate",
                "--no-header",
                "--no-emit-project",
                *only,
            ],
            cwd=src,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"},
        )
        return _clean(result.stdout.splitlines())

    return read


def requirements_file(name: str) -> Callable[[Path], list[str]]:
    """A pip requirements file of the sdist (``dev-requirements.txt``)."""

    def read(src: Path) -> list[str]:
        return _clean((src / name).read_text().splitlines())

    return read


def pyproject_group(group: str) -> Callable[[Path], list[str]]:
    """A PEP 735 dependency group of the sdist's ``pyproject.toml`` (no lock file).

    A reference to the project itself (``requests[socks]``) becomes the
    dependencies of those extras: the project comes from the sdist.
    """

    def read(src: Path) -> list[str]:
        data = tomllib.loads((src / "pyproject.toml").read_text())
        project = data["project"]
        groups = data.get("dependency-groups", {})
        own = _normalise(project["name"])

        def expand(name: str) -> list[str]:
            out: list[str] = []
            for item in groups[name]:
                if isinstance(item, dict):
                    out += expand(item["include-group"])
                    continue
                match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(\[([^\]]*)\])?", item)
                if match and _normalise(match.group(1)) == own:
                    for extra in (match.group(3) or "").split(","):
                        out += project.get("optional-dependencies", {}).get(extra.strip(), [])
                    continue
                out.append(item)
            return out

        return _clean(expand(group))

    return read


def pinned(*requirements: str) -> Callable[[Path], list[str]]:
    """A fixed list, for an sdist that names no test dependencies of its own (httpx's;
    psycopg2's suite is plain unittest and needs none but a runner: ``pinned()``)."""

    def read(src: Path) -> list[str]:
        return list(requirements)

    return read


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


SUITES = [
    Suite(
        "urllib3-2",
        "urllib3",
        "2.8.0",
        ("urllib3",),
        ("test",),
        # `dev` is `test` plus what the TLS tests need (trustme, cryptography, pyOpenSSL).
        uv_lock_group("dev"),
        metric="requests.count",
        # In the loopback-only namespace a connect to the tarpit address fails at once
        # instead of timing out, so which pool thread connects next is up to the
        # scheduler: the test's "one thread after another" assertion fails plain too,
        # now and then, and more often beside any other thread (the agent's).
        pytest_args=("-k", "not test_http2_probe_blocked_per_thread"),
    ),
    Suite(
        "urllib3-1.26",
        "urllib3",
        "1.26.20",
        ("urllib3",),
        ("test",),
        requirements_file("dev-requirements.txt"),
        metric="requests.count",
    ),
    Suite(
        "requests",
        "requests",
        "2.34.2",
        ("requests", "urllib3"),
        ("tests",),
        pyproject_group("test"),
        metric="requests.count",
    ),
    Suite(
        "psycopg2",
        "psycopg2",
        "2.9.13",
        ("psycopg2",),
        ("tests",),
        pinned(),
        netns=False,  # needs the PostgreSQL server of the host's network
        metric="sql.queries",
    ),
    Suite(
        "flask",
        "flask",
        "3.1.3",
        ("flask",),
        ("tests",),
        uv_lock_group("tests"),
        metric="wsgi.requests",
    ),
    Suite(
        "httpx",
        "httpx",
        "0.28.1",
        ("httpx",),
        ("tests",),
        # httpx's sdist has its tests but not its requirements.txt: the test part of
        # that file at the 0.28.1 tag, with the extras it installs httpx with
        # (brotli, cli, http2, socks, zstd).
        pinned(
            "chardet==5.2.0",
            "cryptography==44.0.0",
            "pytest==8.3.4",
            "trio==0.27.0",
            "trustme==1.2.0",
            "uvicorn==0.32.1",
            "brotli",
            "click==8.*",
            "pygments==2.*",
            "rich>=10,<14",
            "h2>=3,<5",
            "socksio==1.*",
            "zstandard>=0.18.0",
        ),
        metric="requests.count",
    ),
    Suite(
        "starlette",
        "starlette",
        "1.10.0",
        ("starlette",),
        ("tests",),
        # Its uv.lock pins a certifi release the index does not hold (only its .post1):
        # the dependency group itself, resolved.
        pyproject_group("dev"),
        metric="asgi.requests",
    ),
    Suite(
        "aiohttp",
        "aiohttp",
        "3.14.5",
        ("aiohttp",),
        ("tests",),
        requirements_file("requirements/test.txt"),
        metric="requests.count",
        # Its pytest.ini's addopts run pytest-xdist workers and coverage: replaced by
        # its marker selection alone, so the suite runs in the one process the
        # plugin watches, as every other suite does.
        pytest_args=("-o", "addopts=", "-m", "not dev_mode and not autobahn and not internal"),
        run_timeout=3600,  # about 4,700 tests in one process: 25 minutes beside two other runs
    ),
]
ALIASES = {"urllib3": ["urllib3-2", "urllib3-1.26"]}


# -- preparing: sdist, sources, venv ------------------------------------------------------


def log(message: str) -> None:
    sys.stderr.write(f"[upstream {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise SystemExit("upstream: `uv` is needed to read uv.lock files (pip install uv)")
    return found


def _pip(python: Path, *args: str) -> None:
    """pip, quiet: its output is shown only when it fails."""
    result = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"upstream: pip {' '.join(args)} failed")


def fetch_sdist(suite: Suite) -> Path:
    target = CACHE / "sdists" / suite.sdist
    if not target.exists():
        log(f"downloading {suite.project}=={suite.version} (sdist)")
        target.parent.mkdir(parents=True, exist_ok=True)
        _pip(
            Path(sys.executable),
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(target.parent),
            f"{suite.project}=={suite.version}",
        )
    if not target.exists():
        raise SystemExit(f"upstream: pip download gave no {target.name}")
    return target


def extract(sdist: Path, dest: Path) -> Path:
    """A fresh copy of the sdist's tree at ``dest`` (each run gets its own)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (root,) = dest.iterdir()
    if not _has_pytest_config(root):
        # Without one, pytest would look further up and find this repository's own.
        (root / "pytest.ini").write_text("[pytest]\n# written by upstream/harness.py\n")
    return root


def _has_pytest_config(root: Path) -> bool:
    if (root / "pytest.ini").exists():
        return True
    pyproject = root / "pyproject.toml"
    if pyproject.exists():
        data = tomllib.loads(pyproject.read_text())
        if "ini_options" in data.get("tool", {}).get("pytest", {}):
            return True
    for name, section in (("tox.ini", "[pytest]"), ("setup.cfg", "[tool:pytest]")):
        path = root / name
        if path.exists() and section in path.read_text():
            return True
    return False


def prepare_venv(suite: Suite, sdist: Path, src: Path) -> Path:
    """The suite's venv: its test dependencies, the library from the sdist, the agent ``-e``."""
    requirements = suite.requirements(src)
    names = {_normalise(re.split(r"[\s<>=!~;\[@]", r, maxsplit=1)[0]) for r in requirements}
    # What the harness itself needs in the suite's process.
    requirements += [r for r in ("pytest", "pytest-timeout") if r not in names]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    venv = CACHE / "venvs" / f"{suite.name}-{suite.version}-py{py}"
    python = venv / "bin" / "python"
    stamp_text = json.dumps(
        {
            "python": sys.version,
            "requirements": requirements,
            "sdist": sdist.name,
            "agent": tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
                "dependencies"
            ],
            "agent_path": str(REPO),
        },
        sort_keys=True,
    )
    stamp = venv / "upstream-stamp.json"
    if stamp.exists() and stamp.read_text() == stamp_text and python.exists():
        return venv
    log(f"{suite.name}: creating {venv.relative_to(REPO)}")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    reqs = venv / "test-requirements.txt"
    reqs.write_text("\n".join(requirements) + "\n")
    _pip(python, "install", "-r", str(reqs), str(sdist), "-e", str(REPO))
    if not _installed_from(python, suite.project, sdist):
        _pip(python, "install", "--force-reinstall", "--no-deps", str(sdist))
        if not _installed_from(python, suite.project, sdist):
            raise SystemExit(f"upstream: {suite.project} in {venv} is not the sdist's")
    check = subprocess.run(
        [str(python), "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    if check.returncode:
        log(f"{suite.name}: pip check: {check.stdout.strip()}")
    stamp.write_text(stamp_text)
    return venv


def _installed_from(python: Path, project: str, sdist: Path) -> bool:
    code = (
        "import sys, importlib.metadata as m\n"
        "d = m.distribution(sys.argv[1])\n"
        "print(d.version, d.read_text('direct_url.json') or '')\n"
    )
    out = subprocess.run(
        [str(python), "-c", code, project], capture_output=True, text=True, check=False
    ).stdout
    return sdist.name in out


# -- PostgreSQL ---------------------------------------------------------------------------


def postgres_params() -> dict[str, str]:
    """host, port, user of the test server (``TALISKER_TEST_POSTGRES_DSN``), and its db."""
    dsn = os.environ.get("TALISKER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    url = urllib.parse.urlsplit(dsn)
    return {
        "host": url.hostname or "127.0.0.1",
        "port": str(url.port or 5432),
        "user": url.username or "postgres",
        "dbname": url.path.lstrip("/") or "test",
        "password": url.password or "",
    }


def recreate_databases(python: Path, names: list[str]) -> None:
    """A database of its own per run: the runs go in parallel, beside other users of ``test``."""
    code = (
        "import sys, psycopg2\n"
        "conn = psycopg2.connect(host=sys.argv[1], port=sys.argv[2], user=sys.argv[3],"
        " dbname=sys.argv[4], password=sys.argv[5] or None)\n"
        "conn.autocommit = True\n"
        "cur = conn.cursor()\n"
        "for name in sys.argv[6:]:\n"
        "    cur.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')\n"
        "    cur.execute(f'CREATE DATABASE {name}')\n"
    )
    p = postgres_params()
    subprocess.run(
        [
            str(python),
            "-c",
            code,
            p["host"],
            p["port"],
            p["user"],
            p["dbname"],
            p["password"],
            *names,
        ],
        check=True,
    )


# -- running ------------------------------------------------------------------------------


@dataclass
class Run:
    """One pytest process: a suite in one mode (all of it, or some files again)."""

    suite: Suite
    mode: str
    venv: Path
    src: Path
    out: Path  # results (.jsonl); the log and sink summary sit beside it
    extra: list[str] = field(default_factory=list)  # pytest arguments from the command line
    rerun: bool = False
    deselect: list[str] = field(default_factory=list)  # node ids left out (of a rerun)
    returncode: int | None = None
    seconds: float = 0.0
    hung: str = ""  # "at exit" or "timeout" when it had to be killed

    @property
    def label(self) -> str:
        return f"{self.suite.name}/{self.mode}" + (" (rerun)" if self.rerun else "")


def _clean_environment() -> dict[str, str]:
    """The caller's environment without anything that configures an agent."""
    prefixes = ("TALISKER_", "DD_", "DATADOG_", "STATSD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("PYTHONPATH", None)
    return env


def run_suite(run: Run) -> Run:
    suite, mode = run.suite, run.mode
    bindir = run.venv / "bin"
    pytest = [str(bindir / "python"), "-m", "pytest", "-p", "agentplug"]
    pytest += ["-q", "--color=no", f"--rootdir={run.src}", f"--timeout={TEST_TIMEOUT}"]
    pytest += suite.pytest_args
    pytest += [] if _selects(run.src, run.extra) else list(suite.tests)
    pytest += run.extra
    if mode != "plain":
        pytest = [str(bindir / "talisker-run"), *pytest]
    env = _clean_environment()
    env.update(
        PYTHONPATH=str(PLUGIN_DIR),
        UPSTREAM_MODE=mode,
        UPSTREAM_TARGETS=",".join(suite.targets),
        UPSTREAM_RESULTS=str(run.out),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(run.venv),
    )
    if suite.project == "psycopg2":
        p = postgres_params()
        env.update(
            PSYCOPG2_TESTDB=_database(mode),
            PSYCOPG2_TESTDB_HOST=p["host"],
            PSYCOPG2_TESTDB_PORT=p["port"],
            PSYCOPG2_TESTDB_USER=p["user"],
        )
        if p["password"]:
            env["PSYCOPG2_TESTDB_PASSWORD"] = p["password"]
    if run.deselect:
        deselect = run.out.with_suffix(".deselect.txt")
        deselect.write_text("\n".join(run.deselect) + "\n")
        env["UPSTREAM_DESELECT"] = str(deselect)
    sink = run.out.with_suffix(".sink.json")
    command = [sys.executable, str(Path(__file__).resolve()), "_supervise", str(sink), "--"]
    command += pytest
    if suite.netns:
        namespace = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
        command = [*namespace, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    run.out.unlink(missing_ok=True)
    logfile = run.out.with_suffix(".log")
    started = time.monotonic()
    with open(logfile, "w") as output:
        child = subprocess.Popen(
            command,
            cwd=run.src,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        run.returncode = _wait(run, child, output)
    run.seconds = time.monotonic() - started
    return run


def _wait(run: Run, child: subprocess.Popen[bytes], output: TextIO) -> int:
    """The run's exit status; a run that does not exit after its session ended is killed.

    Its stacks (faulthandler, on SIGUSR1) go to the log first, and the threads
    it had left are in its results' ``exit`` event.
    """
    started = time.monotonic()
    ended: float | None = None
    while True:
        try:
            return child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if ended is None and _has_event(run.out, "exit"):
            ended = now
        late = ended is not None and now - ended > EXIT_GRACE
        if not late and now - started < run.suite.run_timeout:
            continue
        since = "its session ended" if late else "it started"
        output.write(
            f"\n[upstream] still running {now - (ended or started):.0f} s after {since}:"
            " stacks below, then killed\n"
        )
        output.flush()
        pid = _event(run.out, "start").get("pid")
        if isinstance(pid, int):
            try:
                os.kill(pid, signal.SIGUSR1)
                time.sleep(2)
            except OSError:
                pass
        run.hung = "at exit" if late else "timeout"
        os.killpg(child.pid, signal.SIGKILL)
        return child.wait()


def _event(path: Path, name: str) -> dict[str, object]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        if line.startswith('{"event": "' + name + '"'):
            result: dict[str, object] = json.loads(line)
            return result
    return {}


def _has_event(path: Path, name: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            tail = f.read()
    except OSError:
        return False
    return f'{{"event": "{name}"'.encode() in tail


def _selects(src: Path, args: list[str]) -> bool:
    """Whether pytest arguments from the command line name tests (then they replace the suite's)."""
    return any(not a.startswith("-") and (src / a.split("::", 1)[0]).exists() for a in args)


def _database(mode: str) -> str:
    return f"upstream_psycopg2_{mode}"


def supervise(sink_out: str, command: list[str]) -> int:
    """Inside the run's network namespace: a DogStatsD sink, then the suite.

    The agent's metrics go to this sink (never off the machine); its summary
    shows that the agent did instrument the suite's calls.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    names: dict[str, int] = {}
    datagrams = [0]

    def drain() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            datagrams[0] += 1
            for line in data.decode("utf-8", "replace").splitlines():
                name = line.split(":", 1)[0]
                names[name] = names.get(name, 0) + 1

    threading.Thread(target=drain, daemon=True).start()
    env = dict(os.environ, DD_DOGSTATSD_URL=f"udp://127.0.0.1:{port}")
    child = subprocess.Popen(command, env=env)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, f: child.send_signal(s))
    status = child.wait()
    time.sleep(0.5)  # datagrams sent at the child's exit
    Path(sink_out).write_text(
        json.dumps({"datagrams": datagrams[0], "names": dict(sorted(names.items()))})
    )
    return status


# -- results ------------------------------------------------------------------------------


@dataclass
class Results:
    tests: dict[str, dict[str, object]]
    events: dict[str, dict[str, object]]
    sink: dict[str, object]


def load(run: Run) -> Results:
    tests: dict[str, dict[str, object]] = {}
    events: dict[str, dict[str, object]] = {}
    if run.out.exists():
        for line in run.out.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "nodeid" in record:
                tests[record["nodeid"]] = record
            else:
                events[record["event"]] = record
    sink_path = run.out.with_suffix(".sink.json")
    sink = json.loads(sink_path.read_text()) if sink_path.exists() else {}
    return Results(tests, events, sink)


def run_problems(run: Run, results: Results, allowed_ids: set[str]) -> list[str]:
    """Why a run cannot be trusted (empty when it can).

    A process that does not exit after its session ended is one, unless every
    thread that kept it alive runs code of a test whose difference is allowed
    (urllib3's framing tests: the server thread waits for the request to end
    with the header the test sent last, and the agent's comes after it).
    """
    problems = []
    if run.hung == "timeout":
        problems.append(f"killed after {run.suite.run_timeout:.0f} s (stacks in the log)")
    elif run.hung:
        culprits = _blocking_tests(run, results)
        unexplained = [c for c in culprits if not c or not _is_allowed(c, allowed_ids)]
        if unexplained or not culprits:
            problems.append(
                f"did not exit {EXIT_GRACE} s after its session ended; threads left: "
                + (", ".join(c or "(not a test's)" for c in culprits) or "none")
                + " (stacks in the log)"
            )
    if "check-failed" in results.events:
        problems += [str(p) for p in results.events["check-failed"].get("problems", [])]  # type: ignore[attr-defined]
    if "start" not in results.events:
        problems.append("the plugin never started (see the log)")
    if "finish" not in results.events:
        problems.append(f"the session did not finish (exit status {run.returncode})")
    status = results.events.get("finish", {}).get("exitstatus", run.returncode)
    if run.returncode not in (0, 1) or status not in (0, 1):
        problems.append(f"pytest exit status {run.returncode} (session status {status})")
    if not run.rerun and not run.extra:
        if not results.tests:
            problems.append("no test ran")
        count = int(results.sink.get("datagrams", 0))  # type: ignore[call-overload]
        names = results.sink.get("names", {})
        if run.mode == "plain" and count:
            problems.append(f"{count} metric datagrams were sent in plain mode")
        metric = f"talisker.{run.suite.metric}"
        if run.mode != "plain" and run.suite.metric and metric not in names:  # type: ignore[operator]
            problems.append(f"the agent sent no {metric} metric")
    return problems


def _blocking_tests(run: Run, results: Results) -> list[str]:
    """For each non-daemon thread left at exit, the test whose code it runs ("" if none)."""
    out = []
    for thread in results.events.get("exit", {}).get("threads", []):  # type: ignore[attr-defined]
        if thread["daemon"]:
            continue
        test = ""
        for filename, _, qualname in thread["stack"]:
            try:
                rel = Path(filename).resolve().relative_to(run.src.resolve())
            except ValueError:
                continue
            scope = qualname.split(".<locals>", 1)[0].split(".")
            if scope[-1].startswith("test"):
                test = "::".join([str(rel), *scope])
                break
        out.append(test)
    return out


def _is_allowed(test: str, allowed_ids: set[str]) -> bool:
    return any(n == test or n.startswith(test + "[") for n in allowed_ids)


@dataclass
class Difference:
    nodeid: str
    mode: str
    kind: str  # failed, error, skipped, missing, slow
    plain: dict[str, object]
    other: dict[str, object]
    allowed: str = ""  # the allow-list reason
    allowed_line: int = 0
    verdict: str = ""  # after a rerun: confirmed, flaky: ..., cleared: ...
    rerun: tuple[dict[str, object], dict[str, object]] | None = None

    @property
    def counts(self) -> bool:
        """Whether this is an unexpected difference (not allowed, not cleared by a rerun)."""
        return not self.allowed and self.verdict in ("", "confirmed")


def differences(plain: Results, other: Results, mode: str) -> list[Difference]:
    found = []
    for nodeid, before in plain.tests.items():
        if before["outcome"] != GOOD:
            continue
        after = other.tests.get(nodeid)
        if after is None:
            found.append(Difference(nodeid, mode, "missing", before, {}))
        elif after["outcome"] != GOOD:
            found.append(Difference(nodeid, mode, str(after["outcome"]), before, after))
        elif _slow(before, after):
            found.append(Difference(nodeid, mode, "slow", before, after))
    return found


def _slow(before: dict[str, object], after: dict[str, object]) -> bool:
    b, a = float(before["duration"]), float(after["duration"])  # type: ignore[arg-type]
    return a > SLOW_SECONDS and a > SLOW_FACTOR * b


def _verdict(
    diff: Difference, plain: dict[str, object] | None, other: dict[str, object] | None
) -> str:
    """``confirmed`` if the rerun shows the difference again, else why it does not."""
    if plain is None or other is None:
        return "confirmed"  # it could not be cleared: it counts
    if plain["outcome"] != GOOD:
        return f"flaky: {plain['outcome']} plain on the rerun"
    if diff.kind == "slow":
        if _slow(plain, other):
            return "confirmed"
        if float(plain["duration"]) > SLOW_SECONDS:  # type: ignore[arg-type]
            return f"flaky: {_seconds(plain)} s plain on the rerun"
        return f"cleared: {_seconds(other)} s vs {_seconds(plain)} s plain on the rerun"
    if other["outcome"] == GOOD:
        return f"cleared: passed in {diff.mode} mode on the rerun"
    return "confirmed"


def _seconds(record: dict[str, object]) -> str:
    return f"{float(record['duration']):.2f}"  # type: ignore[arg-type]


# -- allow-list ---------------------------------------------------------------------------


@dataclass
class Allowed:
    suites: str
    modes: tuple[str, ...]
    pattern: str
    reason: str
    line: int

    def matches(self, suite: str, mode: str, nodeid: str) -> bool:
        """A node id, exactly; without ``[...]``, every parametrization of it; or a glob."""
        if not fnmatch.fnmatchcase(suite, self.suites) or mode not in self.modes:
            return False
        return (
            nodeid == self.pattern
            or nodeid.split("[", 1)[0] == self.pattern
            or fnmatch.fnmatchcase(nodeid, self.pattern)
        )


def read_allowlist(path: Path = ALLOWLIST) -> list[Allowed]:
    """``SUITE MODES NODEID-OR-GLOB CATEGORY: reason``, one a line; ``#`` starts a comment."""
    entries = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) < 4:
            raise SystemExit(f"{path}:{number}: want SUITE MODES PATTERN CATEGORY: reason")
        suites, modes_text, pattern, reason = parts
        category, _, why = reason.partition(":")
        if category not in CATEGORIES or not why.strip():
            raise SystemExit(
                f"{path}:{number}: the reason must start with one of "
                f"{', '.join(sorted(CATEGORIES))} and a colon, then say why"
            )
        modes = CATEGORIES[category] if modes_text == "*" else tuple(modes_text.split(","))
        for mode in modes:
            if mode not in CATEGORIES[category]:
                raise SystemExit(f"{path}:{number}: {category} is not a difference in {mode} mode")
        entries.append(Allowed(suites, modes, pattern, reason, number))
    return entries


def allowed(entries: list[Allowed], suite: str, diff: Difference) -> str:
    """The reason of the first entry that allows ``diff`` ("" if none does)."""
    if diff.kind in ("slow", "missing"):
        return ""  # never by design
    for entry in entries:
        if entry.matches(suite, diff.mode, diff.nodeid):
            diff.allowed_line = entry.line
            return entry.reason
    return ""


# -- the whole check ----------------------------------------------------------------------


Key = tuple[str, str]  # (suite name, mode)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_supervise"]:
        return supervise(argv[1], argv[3:])
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    if args.list:
        for s in SUITES:
            where = "loopback-only netns" if s.netns else "host network"
            print(f"{s.name:14} {s.project + '==' + s.version:20} {where}")
        return 0
    chosen = _choose(args.suites)
    modes = ["plain", *(["agent", "deadline"] if args.mode == "all" else [args.mode])]
    entries = read_allowlist()
    started = time.monotonic()
    rundir = _new_rundir()

    prepared: dict[str, tuple[Path, Path]] = {}
    for suite in chosen:
        sdist = fetch_sdist(suite)
        probe = extract(sdist, CACHE / "work" / suite.name / "probe")
        prepared[suite.name] = (sdist, prepare_venv(suite, sdist, probe))
        if suite.project == "psycopg2":
            recreate_databases(_python(prepared[suite.name][1]), [_database(m) for m in modes])
    prep_seconds = time.monotonic() - started

    runs: dict[Key, Run] = {}
    for suite in chosen:
        sdist, venv = prepared[suite.name]
        for mode in modes:
            src = extract(sdist, CACHE / "work" / suite.name / mode)
            out = rundir / f"{suite.name}-{mode}.jsonl"
            runs[(suite.name, mode)] = Run(suite, mode, venv, src, out, extra=extra)
    _run_all(list(runs.values()), args.jobs)
    results = {key: load(run) for key, run in runs.items()}

    diffs: dict[Key, list[Difference]] = {}
    for suite in chosen:
        for mode in modes[1:]:
            found = differences(results[(suite.name, "plain")], results[(suite.name, mode)], mode)
            for diff in found:
                diff.allowed = allowed(entries, suite.name, diff)
            diffs[(suite.name, mode)] = found
    problems: dict[Key, list[str]] = {}
    for key, run in runs.items():
        allowed_ids = {d.nodeid for d in diffs.get(key, []) if d.allowed}
        problems[key] = run_problems(run, results[key], allowed_ids)

    reran: list[str] = []
    if not args.no_rerun:
        reran = _rerun(chosen, modes, prepared, diffs, rundir, extra, args.jobs)

    details, summary = _report(chosen, modes, results, problems, diffs, entries, extra)
    total = time.monotonic() - started
    summary.append(
        f"wall time {total / 60:.1f} min (preparing {prep_seconds:.0f} s"
        + (f"; reran {', '.join(reran)}" if reran else "")
        + f"); results in {rundir.relative_to(REPO)}"
    )
    print("\n".join([*details, "", *summary]))
    (rundir / "summary.txt").write_text("\n".join([*details, "", *summary]) + "\n")
    _write_json(rundir / "report.json", chosen, modes, results, problems, diffs)
    unexpected = any(d.counts for found in diffs.values() for d in found)
    return 1 if unexpected or any(problems.values()) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nox -s upstream --",
        description="The instrumented libraries' own test suites, plain and with the agent.",
        epilog="Arguments after a second `--` go to every pytest run; a test path among "
        "them replaces the suite's own.",
    )
    parser.add_argument(
        "suites",
        nargs="*",
        help=f"suites to run (default: all): {', '.join(s.name for s in SUITES)}; "
        "urllib3 means both of its",
    )
    parser.add_argument(
        "--mode",
        choices=["agent", "deadline", "all"],
        default="all",
        help="the mode(s) to compare with plain (default: all)",
    )
    parser.add_argument("--jobs", type=int, default=3, help="suite runs at a time (default 3)")
    parser.add_argument(
        "--no-rerun", action="store_true", help="report differences without running them again"
    )
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    return parser


def _new_rundir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rundir = CACHE / "runs" / stamp
    rundir.mkdir(parents=True)
    latest = CACHE / "runs" / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(stamp)
    return rundir


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _choose(names: list[str]) -> list[Suite]:
    if not names:
        return list(SUITES)
    by_name = {s.name: s for s in SUITES}
    wanted: list[str] = []
    for name in names:
        for real in ALIASES.get(name, [name]):
            if real not in by_name:
                raise SystemExit(f"upstream: no suite {name!r} (try --list)")
            if real not in wanted:
                wanted.append(real)
    return [by_name[n] for n in wanted]


#: The longest suites start first, so that the short ones fill the gaps at the end.
_LENGTH_ORDER = ("urllib3-1.26", "requests", "urllib3-2", "psycopg2", "flask")


def _run_all(runs: list[Run], jobs: int) -> None:
    def key(run: Run) -> tuple[int, int]:
        name = run.suite.name
        return (_LENGTH_ORDER.index(name) if name in _LENGTH_ORDER else 9, MODES.index(run.mode))

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for run in pool.map(_run_logged, sorted(runs, key=key)):
            log(f"{run.label}: exit {run.returncode} in {run.seconds:.0f} s")


def _run_logged(run: Run) -> Run:
    log(f"{run.label}: running")
    return run_suite(run)


def _rerun(
    chosen: list[Suite],
    modes: list[str],
    prepared: dict[str, tuple[Path, Path]],
    diffs: dict[Key, list[Difference]],
    rundir: Path,
    extra: list[str],
    jobs: int,
) -> list[str]:
    """Run again, once, each suite with differences not allowed: plain and in their modes.

    The whole suite runs again, so that each test runs after the same tests as
    the first time, but without the tests whose differences are allowed: their
    failures must not make others differ (a failed urllib3 test keeps its pool
    and sockets alive in its traceback, and the test server's teardown then
    waits its 3 s grace period for them). Returns the suites run again.
    """
    runs: dict[Key, Run] = {}
    todo: dict[Key, list[Difference]] = {}
    for suite in chosen:
        for mode in modes[1:]:
            pending = [d for d in diffs[(suite.name, mode)] if not d.allowed]
            if len(pending) > RERUN_LIMIT:
                log(f"{suite.name}/{mode}: {len(pending)} differences, too many to run again")
                for d in pending:
                    d.verdict = "confirmed"
            elif pending:
                todo[(suite.name, mode)] = pending
        rerun_modes = [m for m in modes[1:] if (suite.name, m) in todo]
        if not rerun_modes:
            continue
        candidates = {d.nodeid for m in rerun_modes for d in todo[(suite.name, m)]}
        allowed_ids = {d.nodeid for m in modes[1:] for d in diffs[(suite.name, m)] if d.allowed}
        sdist, venv = prepared[suite.name]
        for mode in ["plain", *rerun_modes]:
            src = extract(sdist, CACHE / "work" / suite.name / f"rerun-{mode}")
            out = rundir / f"{suite.name}-{mode}-rerun.jsonl"
            deselect = sorted(allowed_ids - candidates)
            runs[(suite.name, mode)] = Run(
                suite, mode, venv, src, out, extra=extra, rerun=True, deselect=deselect
            )
        if suite.project == "psycopg2":
            recreate_databases(_python(venv), [_database(m) for m in modes])
    _run_all(list(runs.values()), jobs)
    for (name, mode), pending in todo.items():
        plain, other = load(runs[(name, "plain")]), load(runs[(name, mode)])
        for diff in pending:
            before, after = plain.tests.get(diff.nodeid), other.tests.get(diff.nodeid)
            diff.rerun = (before or {}, after or {})
            diff.verdict = _verdict(diff, before, after)
    return sorted({name for name, _ in todo})


def _report(
    chosen: list[Suite],
    modes: list[str],
    results: dict[Key, Results],
    problems: dict[Key, list[str]],
    diffs: dict[Key, list[Difference]],
    entries: list[Allowed],
    extra: list[str],
) -> tuple[list[str], list[str]]:
    """The details (every difference not allowed, stale entries) and one line per suite."""
    details: list[str] = []
    summary: list[str] = []
    for suite in chosen:
        parts = [f"plain {_passed(results[(suite.name, 'plain')])} passed"]
        for mode in modes[1:]:
            found = diffs[(suite.name, mode)]
            n_allowed = sum(1 for d in found if d.allowed)
            n_unexpected = sum(1 for d in found if d.counts)
            part = f"{mode} {_passed(results[(suite.name, mode)])} passed, "
            part += f"{n_allowed} allowed, {n_unexpected} unexpected"
            flaky = sum(1 for d in found if d.verdict.startswith("flaky"))
            cleared = sum(1 for d in found if d.verdict.startswith("cleared"))
            notes = [f"{flaky} flaky"] if flaky else []
            notes += [f"{cleared} cleared"] if cleared else []
            if notes:
                part += f" ({', '.join(notes)} by the rerun)"
            parts.append(part)
            details += [_describe(suite, d) for d in found if not d.allowed]
        for mode in modes:
            parts += [f"PROBLEM in {mode}: {p}" for p in problems[(suite.name, mode)]]
        summary.append(f"{suite.name} {suite.version}: " + " | ".join(parts))
    used: dict[int, int] = {}
    for found in diffs.values():
        for d in found:
            if d.allowed:
                used[d.allowed_line] = used.get(d.allowed_line, 0) + 1
    details += [
        f"allowed by line {e.line} ({used[e.line]} in this run): {e.suites} {e.pattern}"
        for e in entries
        if e.line in used
    ]
    if not extra:
        details += [
            f"STALE allow-list line {e.line} matched nothing: {e.suites} {e.pattern}"
            for e in entries
            if e.line not in used and _in_scope(e, chosen, modes)
        ]
    return details, summary


def _passed(results: Results) -> int:
    return sum(1 for t in results.tests.values() if t["outcome"] == GOOD)


def _in_scope(entry: Allowed, chosen: list[Suite], modes: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(s.name, entry.suites) for s in chosen) and any(
        m in modes for m in entry.modes
    )


def _describe(suite: Suite, d: Difference) -> str:
    status = "UNEXPECTED" if d.counts else d.verdict.split(":")[0].upper()
    lines = [f"{status} {suite.name} {d.mode}: {d.nodeid} ({d.kind})"]
    if d.kind == "slow":
        lines.append(f"    {_seconds(d.other)} s vs {_seconds(d.plain)} s plain")
    else:
        crash = str(d.other.get("crash", "")) or "(no message)"
        lines.append(f"    {d.other.get('failed_in', 'outcome')}: {crash}")
    if d.rerun is not None:
        before, after = d.rerun
        rerun = (
            f"plain {before.get('outcome', 'absent')}, {d.mode} {after.get('outcome', 'absent')}"
        )
        if d.kind == "slow" and before and after:
            rerun += f" ({_seconds(after)} s vs {_seconds(before)} s)"
        lines.append(f"    rerun: {rerun}: {d.verdict}")
    return "\n".join(lines)


def _write_json(
    path: Path,
    chosen: list[Suite],
    modes: list[str],
    results: dict[Key, Results],
    problems: dict[Key, list[str]],
    diffs: dict[Key, list[Difference]],
) -> None:
    out: dict[str, object] = {}
    for suite in chosen:
        entry: dict[str, object] = {"version": suite.version}
        for mode in modes:
            r = results[(suite.name, mode)]
            entry[mode] = {
                "outcomes": _count(str(t["outcome"]) for t in r.tests.values()),
                "problems": problems[(suite.name, mode)],
                "sink": r.sink,
            }
        entry["differences"] = [
            {
                "mode": d.mode,
                "nodeid": d.nodeid,
                "kind": d.kind,
                "allowed": d.allowed,
                "verdict": d.verdict,
                "unexpected": d.counts,
                "message": d.other.get("message", ""),
                "duration": d.other.get("duration"),
                "plain_duration": d.plain.get("duration"),
                "rerun": list(d.rerun) if d.rerun else None,
            }
            for mode in modes[1:]
            for d in diffs[(suite.name, mode)]
        ]
        out[suite.name] = entry
    path.write_text(json.dumps(out, indent=1) + "\n")


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
