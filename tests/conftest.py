"""Fixtures shared by every test: the DogStatsD receivers, the HTTP server, PostgreSQL,
and an in-process agent installed against the receiver."""

from __future__ import annotations

import os

# The test process itself starts with the agent off; tests install it explicitly
# with a configuration pointing at their receiver. Subprocess tests build their
# own environment (tests/support/proc.py).
os.environ["TALISKER_ENABLED"] = "false"
for _name in list(os.environ):
    if _name.startswith(("DD_", "STATSD_DSN")) or (
        _name.startswith("TALISKER_")
        and _name
        not in ("TALISKER_ENABLED", "TALISKER_REQUIRE_POSTGRES", "TALISKER_TEST_POSTGRES_DSN")
    ):
        del os.environ[_name]

from collections.abc import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402

import agent  # noqa: E402
from agent import config  # noqa: E402
from tests.support import postgres  # noqa: E402
from tests.support.http import RecordingServer  # noqa: E402
from tests.support.statsd import Receiver  # noqa: E402


def _receiver(kind: str) -> Iterator[Receiver]:
    receiver = Receiver(kind)
    try:
        yield receiver
    finally:
        receiver.close()
    assert not receiver.errors, "malformed DogStatsD lines:\n" + "\n".join(receiver.errors)


@pytest.fixture
def statsd() -> Iterator[Receiver]:
    """A DogStatsD receiver on a UDP port; a malformed line fails the test."""
    yield from _receiver("udp")


@pytest.fixture
def statsd_unix() -> Iterator[Receiver]:
    """A DogStatsD receiver on a unix datagram socket; a malformed line fails the test."""
    yield from _receiver("unix")


@pytest.fixture
def http_server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn() -> str:
    return postgres.require_server()


Installer = Callable[..., config.Config]


@pytest.fixture
def install_agent(statsd: Receiver) -> Iterator[Installer]:
    """``install_agent(**env)`` installs the agent in this process, sending to ``statsd``."""

    def install(**env: str) -> config.Config:
        environ = {
            "TALISKER_ENABLED": "true",
            "TALISKER_METRICS_FLUSH_INTERVAL": "0.2",
            **statsd.env,
            **env,
        }
        cfg = config.load(environ)
        assert agent.install(cfg)
        return cfg

    try:
        yield install
    finally:
        agent.uninstall()
