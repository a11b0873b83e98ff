"""``talisker-run``: run a command with the agent active in it and in its Python children."""

# On the start-up path: annotations are strings, not `from __future__ import annotations`
# (importing __future__ costs 0.6M instructions).

import os
import sys

from agent import __version__, config

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~10 ms
if TYPE_CHECKING:
    from typing import TextIO

    from agent.config import Destination

USAGE = """\
usage: talisker-run [--check] [--print-metrics] CMD [ARGS...]

Run CMD with talisker-agent active: request ids, deadlines and DogStatsD
metrics for every Python process it starts, with no code changes.

  talisker-run python app.py
  talisker-run gunicorn -w 4 app:app
  talisker-run --print-metrics python app.py

options:
  --check          print the effective configuration, the instrumentations that
                   will be active and whether the metrics destination resolves
  --print-metrics  collect the metrics CMD sends and print them when it exits,
                   instead of sending them to a Datadog agent
  -h, --help       show this help and exit
  --version        show the version and exit

Configuration is read from the environment (TALISKER_*, DD_*); invalid values
stop talisker-run with status 2 before CMD starts, each one named.
"""

BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


#: What a shell reports for a command ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: "list[str] | None" = None) -> "int":
    """Entry point of the ``talisker-run`` console script."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `talisker-run --check | head`: the reader is gone
        _silence_output()
        return EXIT_BROKEN_PIPE


def _silence_output() -> "None":
    """Point stdout and stderr at /dev/null, so the flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # pragma: no cover - a closed or unusual stream
            pass


def _main(args: "list[str]") -> "int":
    check = print_metrics = False
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option == "--":
            break
        if option in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if option == "--version":
            sys.stdout.write(f"talisker-run (talisker-agent) {__version__}\n")
            return 0
        if option == "--check":
            check = True
        elif option == "--print-metrics":
            print_metrics = True
        else:
            sys.stderr.write(f"talisker-run: unknown option {option}\n\n{USAGE}")
            return 2
    try:
        cfg = config.load(strict=True)
    except config.ConfigError as exc:
        for _, message in exc.problems:
            sys.stderr.write(f"talisker-run: {message}\n")
        return 2
    if check:
        print_check(cfg, sys.stdout)
        return 0
    if not args:
        sys.stderr.write(f"talisker-run: no command given\n\n{USAGE}")
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = _with_bootstrap(env.get("PYTHONPATH", ""))
    if print_metrics:
        return _run_printing_metrics(args, env, cfg)
    try:
        os.execvpe(args[0], args, env)
    except FileNotFoundError:
        sys.stderr.write(f"talisker-run: {args[0]}: command not found\n")
        return 127
    except PermissionError:
        sys.stderr.write(f"talisker-run: {args[0]}: permission denied\n")
        return 126
    return 0  # pragma: no cover - exec does not return


def _with_bootstrap(pythonpath: "str") -> "str":
    """``PYTHONPATH`` with the bootstrap directory first, keeping the user's entries."""
    entries = [p for p in pythonpath.split(os.pathsep) if p and p != BOOTSTRAP]
    return os.pathsep.join([BOOTSTRAP, *entries])


def _run_printing_metrics(args: "list[str]", env: "dict[str, str]", cfg: "config.Config") -> "int":
    import signal
    import subprocess

    from agent._receiver import WIDTH, Collector
    from agent.metrics.tags import constant_tags

    collector = Collector()
    env["DD_DOGSTATSD_URL"] = collector.url
    env["TALISKER_METRICS_ENABLED"] = "true"
    try:
        child = subprocess.Popen(args, env=env)
    except FileNotFoundError:
        sys.stderr.write(f"talisker-run: {args[0]}: command not found\n")
        return 127

    def forward(signum: "int", frame: "object") -> "None":
        child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    status = child.wait()
    collector.settle()
    command = " ".join(args)
    title = f"talisker-run: metrics sent by {command}:"
    if len(title) > WIDTH:
        title = title[: WIDTH - 4] + "...:"
    try:
        sys.stderr.write(f"\n{title}\n")
        collector.render(sys.stderr, constant_tags(cfg))
    except BrokenPipeError:  # the report is lost, the command's status is not
        _silence_output()
    collector.close()
    return status if status >= 0 else 128 - status


def print_check(cfg: "config.Config", out: "TextIO") -> "None":
    """What ``--check`` prints: configuration, instrumentations, destination."""
    out.write(
        f"talisker-agent {__version__} in {sys.executable} (Python {sys.version.split()[0]})\n"
    )
    out.write("\nconfiguration:\n")
    width = max(len(s.env) for s in config.SETTINGS)
    for s in config.SETTINGS:
        # Any setting may hold a URL with user info (DD_TAGS, DD_SERVICE...): never show it.
        value = config.redact(s.show(getattr(cfg, s.attr))) or '""'
        source = "set" if cfg.sources[s.attr] == "env" else "default"
        out.write(f"  {s.env:<{width}}  {value}  ({source})\n")
    out.write("\ninstrumentations:\n")
    for name in config.INSTRUMENTATIONS:
        out.write(f"  {name:<9} {_instrumentation_state(cfg, name)}\n")
    out.write("\nmetrics:\n")
    if not cfg.enabled or not cfg.metrics_enabled:
        out.write("  off\n")
        return
    out.write(f"  destination {cfg.destination} (prefix {cfg.prefix or 'none'!r})\n")
    out.write(f"  {_destination_state(cfg.destination)}\n")


def _instrumentation_state(cfg: "config.Config", name: "str") -> "str":
    import importlib.util

    if not cfg.enabled:
        return "off (TALISKER_ENABLED=false)"
    if name in cfg.disabled_instrumentations:
        return "off (TALISKER_DISABLED_INSTRUMENTATIONS)"
    if importlib.util.find_spec(name) is None:
        return "not installed"
    from agent.instrumentation import describe_supported, supports
    from agent.registry import target_version

    try:
        import importlib

        instrumentation = importlib.import_module(f"agent.instrumentation.{name}")
        supported = instrumentation.SUPPORTED
        version = instrumentation.installed_version()  # what the agent checks at install
    except Exception as exc:  # a broken installation of the library
        return f"NOT loadable ({name} {target_version(name)}: {type(exc).__name__})"
    shown = describe_supported(supported)
    if not supports(supported, version):
        return f"NOT supported: {name} {version}, supported {shown}; left uninstrumented"
    return f"active when imported ({name} {version}, supported {shown})"


def _destination_state(dest: "Destination") -> "str":
    import socket

    if dest.scheme == "udp":
        try:
            infos = socket.getaddrinfo(dest.host, dest.port, 0, socket.SOCK_DGRAM)
        except OSError as exc:
            return f"does NOT resolve: {exc}"
        return "resolves to " + ", ".join(sorted({str(i[4][0]) for i in infos}))
    import stat

    try:
        mode = os.stat(dest.path or "").st_mode
    except OSError as exc:
        return f"socket NOT found: {exc.strerror}"
    return "socket exists" if stat.S_ISSOCK(mode) else "path exists but is NOT a socket"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
