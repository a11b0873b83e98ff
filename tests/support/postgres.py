"""The PostgreSQL test server: skip where it is unreachable, unless CI requires it."""

from __future__ import annotations

import os

import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def dsn() -> str:
    return os.environ.get("TALISKER_TEST_POSTGRES_DSN", DEFAULT_DSN)


def require_server() -> str:
    """The DSN of a reachable server; otherwise skip (or fail under TALISKER_REQUIRE_POSTGRES=1)."""
    url = dsn()
    try:
        import psycopg2

        conn = psycopg2.connect(url, connect_timeout=3)
        conn.close()
    except Exception as exc:
        reason = f"PostgreSQL at {url} is unreachable: {type(exc).__name__}: {str(exc).strip()}"
        if os.environ.get("TALISKER_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (TALISKER_REQUIRE_POSTGRES=1 makes this a failure)")
        pytest.skip(reason)
    return url
