"""talisker-run end to end: real subprocesses, real servers, a real gunicorn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from tests.support.proc import ROOT, clean_env, free_port

BIN = Path(sys.executable).parent
TALISKER_RUN = str(BIN / "talisker-run")


@pytest.fixture(autouse=True)
def _launcher_installed():
    if not Path(TALISKER_RUN).exists():
        pytest.fail(f"{TALISKER_RUN} is missing: install the project (pip install -e .)")


def talisker_run(*args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd=None):
    return subprocess.run(
        [TALISKER_RUN, *args],
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        check=False,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_python_app_is_instrumented_with_its_children_and_the_users_sitecustomize(
    tmp_path, statsd, http_server
):
    user_site = tmp_path / "site"
    user_site.mkdir()
    marker = tmp_path / "user-sitecustomize-ran"
    write(user_site / "sitecustomize.py", f"open({str(marker)!r}, 'w').write('yes')\n")
    app = write(
        tmp_path / "app.py",
        f"""
        import subprocess, sys
        import requests
        requests.get({http_server.url + "/parent"!r})
        child = "import requests; requests.get({http_server.url + "/child"!r})"
        subprocess.run([sys.executable, "-c", child], check=True)
        """,
    )
    proc = talisker_run(sys.executable, str(app), env={**statsd.env, "PYTHONPATH": str(user_site)})
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "yes"
    paths = {r.path: r for r in http_server.requests}
    assert set(paths) == {"/parent", "/child"}
    assert all(len(r.header("X-Request-Id") or "") == 32 for r in paths.values())
    assert statsd.wait_total("talisker.requests.count", 2) == 2
    assert len({m.sender for m in statsd.find("talisker.requests.count")}) == 2  # two processes


def test_python_dash_m_runs_instrumented(tmp_path, statsd, http_server):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write(package / "__main__.py", f"import requests\nrequests.get({http_server.url!r})\n")
    proc = talisker_run(
        sys.executable, "-m", "pkg", env={**statsd.env, "PYTHONPATH": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr
    assert http_server.requests[0].header("X-Request-Id")


def test_an_invalid_configuration_exits_2_naming_the_variable(tmp_path):
    marker = tmp_path / "ran"
    proc = talisker_run(
        sys.executable,
        "-c",
        f"open({str(marker)!r}, 'w')",
        env={"TALISKER_REQUEST_TIMEOUT": "abc"},
    )
    assert proc.returncode == 2
    assert "TALISKER_REQUEST_TIMEOUT" in proc.stderr and "'abc'" in proc.stderr
    assert not marker.exists()


def test_an_invalid_configuration_exits_2_naming_every_bad_variable_and_item():
    proc = talisker_run(
        sys.executable,
        "-c",
        "pass",
        env={
            "TALISKER_REQUEST_TIMEOUT": "abc",
            "DD_DOGSTATSD_PORT": "99999",
            "TALISKER_DISABLED_INSTRUMENTATIONS": "requests,nonsense",
        },
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert all(line.startswith("talisker-run: ") for line in lines)
    assert "TALISKER_REQUEST_TIMEOUT='abc'" in proc.stderr
    assert "DD_DOGSTATSD_PORT='99999'" in proc.stderr
    assert "'nonsense'" in proc.stderr


def test_a_tag_without_a_value_does_not_stop_talisker_run():
    proc = talisker_run(sys.executable, "-c", "print('ran')", env={"DD_TAGS": "team:core,canary"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ran\n"


def test_check_shows_each_instrumentations_library_version_and_supported_range():
    proc = talisker_run("--check")
    assert proc.returncode == 0, proc.stderr
    import urllib3

    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("urllib3 "))
    assert f"urllib3 {urllib3.__version__}, supported >=1.26,<3" in line


SECRETS = ("bob42", "s3", "cr3t")


def test_check_never_shows_a_configured_secret():
    proc = talisker_run(
        "--check",
        env={
            "DD_DOGSTATSD_URL": "udp://bob42:s3/cr3t@127.0.0.1:8125",
            "STATSD_DSN": "udp://bob42:s3@cr3t@127.0.0.1:8126/app",
            "TALISKER_ENDPOINT_NAMES": "bob42:s3cr3t@api:80=users",
            "DD_TAGS": "url:http://bob42:s3cr3t@api",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "udp://127.0.0.1:8125" in proc.stdout and "udp://127.0.0.1:8126" in proc.stdout
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("DD_DOGSTATSD_URL", "udp://bob42:s3/cr3t@127.0.0.1:80000"),
        ("STATSD_DSN", "tcp://bob42:s3/cr3t@statsd:8125/app"),
        ("DD_AGENT_HOST", "bob42:s3cr3t@statsd"),
    ],
)
def test_the_exit_2_message_never_shows_a_configured_secret(env, value):
    for args in (("--check",), (sys.executable, "-c", "pass")):
        proc = talisker_run(*args, env={env: value})
        assert proc.returncode == 2
        assert env in proc.stderr and "***@" in proc.stderr
        for secret in SECRETS:
            assert secret not in proc.stdout + proc.stderr


def test_check_shows_durations_in_the_unit_they_are_set_in():
    proc = talisker_run("--check", env={"TALISKER_REQUEST_TIMEOUT": "1000"})
    assert proc.returncode == 0, proc.stderr
    settings = {
        line.split()[0]: line.split(None, 1)[1]
        for line in proc.stdout.splitlines()
        if "  (" in line
    }
    assert settings["TALISKER_REQUEST_TIMEOUT"] == "1000 ms  (set)"
    assert settings["TALISKER_SOFT_REQUEST_TIMEOUT"] == "none  (default)"
    assert settings["TALISKER_METRICS_FLUSH_INTERVAL"] == "1 s  (default)"
    assert settings["TALISKER_RUNTIME_METRICS_INTERVAL"] == "10 s  (default)"


def test_check_into_a_closed_pipe_prints_no_traceback():
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `talisker-run --check | head -1` once head has exited
    try:
        proc = subprocess.run(
            [TALISKER_RUN, "--check"],
            env=clean_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141  # what a shell reports for a command ended by SIGPIPE


def _imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules a process run with PYTHONPROFILEIMPORTTIME=1 imported (its stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rpartition("|")[2].strip() for line in lines[1:]}  # the first is the header


def test_the_launcher_imports_nothing_heavy_before_it_runs_the_command():
    # A console-script entry point's wrapper imports re (27M instructions, half an
    # interpreter's start): talisker-run is a script of its own (scripts/talisker-run).
    trace = {"PYTHONPROFILEIMPORTTIME": "1"}
    plain = subprocess.run(
        [sys.executable, "-c", "pass"],
        env=clean_env(**trace),
        capture_output=True,
        text=True,
        check=True,
    )
    launcher = talisker_run("--version", env=trace)
    assert launcher.returncode == 0
    added = _imported(launcher) - _imported(plain)
    assert "agent.cli" in added  # the trace is read
    assert not added & {"re", "typing", "logging", "functools", "collections", "types"}


def test_help_version_and_usage_errors():
    help_ = talisker_run("--help")
    assert help_.returncode == 0 and "usage: talisker-run" in help_.stdout
    version = talisker_run("--version")
    assert version.returncode == 0 and version.stdout.startswith("talisker-run (talisker-agent) ")
    assert talisker_run("--bogus", "python").returncode == 2
    assert talisker_run().returncode == 2
    missing = talisker_run("no-such-command-here")
    assert missing.returncode == 127 and "command not found" in missing.stderr


def test_the_exit_status_of_the_command_is_kept():
    assert talisker_run(sys.executable, "-c", "raise SystemExit(7)").returncode == 7


def test_check_prints_configuration_instrumentations_and_destination():
    proc = talisker_run(
        "--check",
        env={
            "DD_AGENT_HOST": "does-not-resolve.invalid",
            "TALISKER_DISABLED_INSTRUMENTATIONS": "psycopg2",
            "TALISKER_REQUEST_TIMEOUT": "1500",
        },
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "TALISKER_REQUEST_TIMEOUT" in out and "1500 ms" in out
    assert "requests  active when imported" in out
    assert "psycopg2  off (TALISKER_DISABLED_INSTRUMENTATIONS)" in out
    assert "udp://does-not-resolve.invalid:8125" in out and "does NOT resolve" in out
    ok = talisker_run("--check", env={"DD_AGENT_HOST": "127.0.0.1"})
    assert "resolves to 127.0.0.1" in ok.stdout


def test_print_metrics_shows_what_the_program_sent(tmp_path, http_server):
    app = write(
        tmp_path / "app.py",
        f"""
        import requests, agent
        requests.get({http_server.url + "/status/503"!r})
        with agent.timed("work"):
            pass
        raise SystemExit(3)
        """,
    )
    proc = talisker_run("--print-metrics", sys.executable, str(app))
    assert proc.returncode == 3
    table = proc.stderr
    assert "samples" in table and "p95" in table
    assert "talisker.requests.count" in table and "status:503" in table
    assert "talisker.requests.errors" in table and "code:503" in table
    assert "talisker.work.latency" in table


def print_metrics_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of the table ``--print-metrics`` writes after the command's output."""
    marker = "talisker-run: metrics sent by "
    assert marker in proc.stderr, proc.stderr
    return proc.stderr[proc.stderr.index(marker) :].splitlines()


def test_print_metrics_fits_in_100_columns_with_constant_tags_shown_once(tmp_path, http_server):
    app = write(
        tmp_path / "app.py",
        f"""
        import requests, agent
        from agent import metrics
        agent.register_endpoint_name({http_server.netloc!r}, "a-rather-long-endpoint-name")
        for status in (200, 503):
            requests.get({http_server.url!r} + f"/status/{{status}}")
        with agent.timed("work", tags={{"step": "s" * 60, "phase": "p" * 40}}):
            pass
        metrics.gauge("queue.depth", 3)
        metrics.gauge("queue.depth", 5)
        """,
    )
    env = {
        "DD_SERVICE": "billing",
        "DD_ENV": "prod",
        "DD_VERSION": "1.2.3",
        "DD_TAGS": "team:core,canary",
    }
    proc = talisker_run("--print-metrics", sys.executable, str(app), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = print_metrics_lines(proc)
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)
    (constant,) = [line for line in lines if "service:billing" in line]
    assert constant.startswith("constant tags")
    assert constant.split(": ", 1)[1].split() == [
        "service:billing",
        "env:prod",
        "version:1.2.3",
        "team:core",
        "canary",
    ]
    assert not [line for line in lines if "team:core" in line and line is not constant]
    # Each metric heads its rows and says what their figures are.
    headings = {line.split()[0]: i for i, line in enumerate(lines) if line.startswith("talisker.")}
    count = lines[headings["talisker.requests.count"]]
    assert count.split()[-1] == "total"
    depth = headings["talisker.queue.depth"]
    assert lines[depth].split()[-1] == "last" and lines[depth + 1].split()[-1] == "5"
    latency = lines[headings["talisker.work.latency"]]
    assert latency.split()[-4:] == ["samples", "p50", "p95", "max"]
    text = "\n".join(lines)
    assert "s" * 60 in text and "p" * 40 in text  # long tags wrap, they are not cut


def test_print_metrics_of_the_demo_fits_in_100_columns():
    proc = talisker_run(
        "--print-metrics",
        sys.executable,
        "-m",
        "agent.demo",
        env={"DD_SERVICE": "demo"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = print_metrics_lines(proc)
    assert len(lines) > 20
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)


def test_a_process_using_nothing_instrumented_starts_no_thread():
    proc = talisker_run(sys.executable, "-c", "import sys; print('threading' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- gunicorn ------------------------------------------------------------------------

FLASK_APP = """
import flask
import agent

app = flask.Flask(__name__)
UPSTREAM = {upstream!r}

@app.route("/hello")
def hello():
    session = flask.request.environ["requests"]
    assert session is agent.get_session()
    return session.get(UPSTREAM + "/upstream").text
"""


def test_gunicorn_with_two_workers_serving_flask(tmp_path, statsd, http_server):
    write(tmp_path / "webapp.py", FLASK_APP.format(upstream=http_server.url))
    port = free_port()
    env = clean_env(
        **statsd.env,
        PYTHONPATH=str(tmp_path),
        TALISKER_RUNTIME_METRICS_INTERVAL="0.3",
        TALISKER_METRICS_FLUSH_INTERVAL="0.2",
        PATH=f"{BIN}:{clean_env()['PATH']}",
    )
    server = subprocess.Popen(
        [TALISKER_RUN, "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "webapp:app"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/hello"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/nothing", timeout=5)
                break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or a busy host
                assert time.monotonic() < deadline, "gunicorn did not start"
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                time.sleep(0.2)
        http_server.requests.clear()
        incoming = (datetime.now(timezone.utc) + timedelta(seconds=60)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f"
        )[:-3] + "Z"
        headers = {"X-Request-Id": "abc-123", "X-Request-Deadline": incoming}
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: requests.get(url, headers=headers), range(40)))

        def cpu_senders() -> set:
            return {m.sender for m in statsd.find("talisker.process.cpu.user")}

        # Each worker reports process CPU from its start, whether or not it served.
        statsd.wait_for(lambda: len(cpu_senders()) >= 2, 30)
        statsd.wait_for(lambda: statsd.total("talisker.wsgi.requests", view="hello") >= 40, 30)
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert all(r.status_code == 200 for r in responses), output
    assert all(r.headers["X-Request-Id"] == "abc-123" for r in responses)
    assert all(r.headers["X-View-Name"] == "hello" for r in responses)
    upstream = http_server.requests
    assert len(upstream) == 40
    assert all(r.header("X-Request-Id") == "abc-123" for r in upstream)
    assert all(r.header("X-Request-Deadline") <= incoming for r in upstream)
    assert statsd.wait_total("talisker.wsgi.requests", 40, view="hello") == 40
    assert len(statsd.samples("talisker.wsgi.cpu", view="hello")) == 40
    assert statsd.total("talisker.requests.count", view="unknown") == 40
    # The kernel does not promise that both workers accept a request: only that
    # each reports its own CPU, and that whichever served sends from its own socket.
    assert len(cpu_senders()) == 2, "each worker sends process.cpu.*"
    wsgi_senders = {m.sender for m in statsd.find("talisker.wsgi.requests")}
    assert wsgi_senders <= cpu_senders()
    assert statsd.find("talisker.process.cpu.system") and statsd.find(
        "talisker.process.cpu.percent"
    )
