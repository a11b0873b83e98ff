"""The by-hand row: what the agent does on each benchmarked path, written inline, no agent code.

The floor the agent is measured against (``docs/benchmarks.md``): the same
feature an expert would write into the application by hand, as cheaply as it
can be written, with nothing the agent adds beyond it. Per incoming request
(:class:`Request`): an id from the same generator as the agent's (made once),
the deadline and its ``X-Request-Deadline`` text (made once). Per call:

- HTTP (urllib3, requests, httpx, aiohttp): one monotonic read for the time left, the three
  headers the agent sends (``X-Request-Id``, ``X-Request-Deadline``,
  ``X-Request-Timeout`` to the millisecond, rounded down), the time left as the
  call's connect and read timeout, and one metric record;
- PostgreSQL: ``SET LOCAL statement_timeout = <ms left>;`` before the statement
  (one round trip, as the agent's prefix) and one metric record;
- a WSGI server (Flask): the incoming ``X-Request-Id`` or a new one, kept in a
  context variable for the calls the view makes, ``X-Request-Id`` and
  ``X-View-Name`` added to the response, and one record with the wall time
  and the thread's CPU time of the request.

One metric record is two clock reads and one append of a small tuple to a
list: what the cheapest metrics library one could write costs on the caller's
side. Nothing aggregates or sends the records (the agent's metrics thread
does, and its cost is counted in the agent's row).
"""

from __future__ import annotations

import math
import os
import time
from _random import Random
from contextvars import ContextVar
from typing import Any

_monotonic = time.monotonic
_perf_counter = time.perf_counter
_thread_time = time.thread_time
_generator = Random(int.from_bytes(os.urandom(32), "big"))

#: Every record made by hand, as the agent's queue holds its own.
RECORDS: list[tuple[Any, ...]] = []
#: The incoming request's id, for the calls made while serving it.
REQUEST_ID: ContextVar[str | None] = ContextVar("by_hand_request_id", default=None)


def new_id() -> str:
    """32 hex digits, from the same generator the agent uses (``agent.context.new_request_id``)."""
    bits: int = _generator.getrandbits(128)
    return bits.to_bytes(16, "big").hex()


class Request:
    """What is kept for the incoming request being served: its id and its deadline."""

    __slots__ = ("deadline_header", "expires", "request_id")

    def __init__(self, seconds: float) -> None:
        self.request_id = new_id()
        self.expires = _monotonic() + seconds
        wall_ms = int((time.time() + seconds) * 1000)
        whole, ms = divmod(wall_ms, 1000)
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        self.deadline_header = f"{when}.{ms:03d}Z"


def urllib3_get(pool: Any, request: Request, url: str = "/") -> bytes:
    left = request.expires - _monotonic()
    ms = int(left * 1000)
    headers = {
        "X-Request-Id": request.request_id,
        "X-Request-Deadline": request.deadline_header,
        "X-Request-Timeout": f"{ms // 1000}.{ms % 1000:03d}",
    }
    start = _perf_counter()
    response = pool.urlopen("GET", url, headers=headers, timeout=left)
    data: bytes = response.data
    RECORDS.append(("urllib3", response.status, _perf_counter() - start))
    return data


def requests_get(session: Any, request: Request, url: str, library: str = "requests") -> bytes:
    """A GET through a ``requests.Session``, or an ``httpx.Client`` (the same ``get``)."""
    left = request.expires - _monotonic()
    ms = int(left * 1000)
    headers = {
        "X-Request-Id": request.request_id,
        "X-Request-Deadline": request.deadline_header,
        "X-Request-Timeout": f"{ms // 1000}.{ms % 1000:03d}",
    }
    start = _perf_counter()
    response = session.get(url, headers=headers, timeout=left)
    content: bytes = response.content
    RECORDS.append((library, response.status_code, _perf_counter() - start))
    return content


async def aiohttp_get(session: Any, request: Request, url: str, timeout_type: Any) -> bytes:
    """A GET through an ``aiohttp.ClientSession``; ``timeout_type`` is ``aiohttp.ClientTimeout``.

    The time left is the call's ``total`` timeout, with ``ceil_threshold`` above it:
    aiohttp rounds a timeout of five seconds or more up to a whole second.
    """
    left = request.expires - _monotonic()
    ms = int(left * 1000)
    headers = {
        "X-Request-Id": request.request_id,
        "X-Request-Deadline": request.deadline_header,
        "X-Request-Timeout": f"{ms // 1000}.{ms % 1000:03d}",
    }
    timeout = timeout_type(total=left, ceil_threshold=left + 1)
    start = _perf_counter()
    async with session.get(url, headers=headers, timeout=timeout) as response:
        content: bytes = await response.read()
    RECORDS.append(("aiohttp", response.status, _perf_counter() - start))
    return content


def pg_execute(cursor: Any, request: Request, query: str = "SELECT 1") -> None:
    ms = math.ceil((request.expires - _monotonic()) * 1000)
    start = _perf_counter()
    cursor.execute(f"SET LOCAL statement_timeout = {ms}; {query}")
    RECORDS.append(("select", _perf_counter() - start))


def wsgi_middleware(app: Any) -> Any:
    """Wrap a Flask application's ``wsgi_app``: ids, the two response headers, one record."""
    wsgi_app = app.wsgi_app

    def middleware(environ: dict[str, Any], start_response: Any) -> Any:
        start = _perf_counter()
        cpu = _thread_time()
        request_id = environ.get("HTTP_X_REQUEST_ID") or new_id()
        token = REQUEST_ID.set(request_id)
        seen: list[str] = []

        def add_headers(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
            view = rule.endpoint if rule is not None else "unknown"
            headers.append(("X-Request-Id", request_id))
            headers.append(("X-View-Name", view))
            seen.append(view)
            seen.append(status)
            return start_response(status, headers, *exc_info)

        try:
            return wsgi_app(environ, add_headers)
        finally:
            REQUEST_ID.reset(token)
            RECORDS.append((*seen, _perf_counter() - start, _thread_time() - cpu))

    app.wsgi_app = middleware
    return app
