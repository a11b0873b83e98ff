"""A loopback HTTP/1.1 keep-alive server that records what it receives.

Paths choose behaviour, so one server serves every scenario:

- ``/status/<code>``: answer with that status;
- ``/delay/<seconds>``: sleep, then 200;
- ``/view/<name>``: 200 with ``X-View-Name: <name>``;
- ``/flaky/<key>/<n>``: 503 for the first ``n`` requests of ``key``, then 200;
- ``/busy/<key>/<n>/<seconds>``: 429 with ``Retry-After: <seconds>`` for the first
  ``n`` requests of ``key``, then 200;
- ``/slow-first/<key>/<seconds>``: the first request of ``key`` sleeps, the others do not;
- ``/redirect/<n>``: redirect ``n`` times, then 200;
- ``/reset``: close the connection without answering;
- ``/reset-once/<key>``: that for the first request of ``key``, then 200;
- anything else: 200 ``ok``.

``server.routes[path] = Route(...)`` overrides a path with a fixed answer.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class Route:
    def __init__(
        self,
        status: int = 200,
        body: bytes = b"ok",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.delay = delay


class RecordedRequest:
    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers  # names lower-cased

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK waits
    server: RecordingServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.record(RecordedRequest(self.command, self.path, headers))
        path = urlsplit(self.path).path
        route = self.server.routes.get(path) or self._route(path)
        if route is None:  # reset
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if route.delay:
            time.sleep(route.delay)
        self.send_response(route.status)
        for k, v in route.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(route.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    def _route(self, path: str) -> Route | None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        kind = parts[0]
        if kind == "status":
            return Route(status=int(parts[1]), body=b"status")
        if kind == "delay":
            return Route(delay=float(parts[1]))
        if kind == "view":
            return Route(headers={"X-View-Name": parts[1]})
        if kind == "flaky":
            if self.server.hit(parts[1]) <= int(parts[2]):
                return Route(status=503, body=b"try again")
            return Route()
        if kind == "slow-first":
            return Route(delay=float(parts[2])) if self.server.hit(parts[1]) == 1 else Route()
        if kind == "busy":
            if self.server.hit(parts[1]) <= int(parts[2]):
                return Route(status=429, body=b"busy", headers={"Retry-After": parts[3]})
            return Route()
        if kind == "redirect":
            left = int(parts[1])
            if left > 0:
                return Route(status=302, headers={"Location": f"/redirect/{left - 1}"})
            return Route()
        if kind == "reset":
            return None
        if kind == "reset-once":  # reset the first request of a key, answer the others
            return None if self.server.hit(parts[1]) == 1 else Route()
        return Route()


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[RecordedRequest] = []
        self.routes: dict[str, Route] = {}
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def hit(self, key: str) -> int:
        with self._lock:
            self._hits[key] = self._hits.get(key, 0) + 1
            return self._hits[key]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnacceptingServer:
    """A listening port whose accept queue is full: connecting to it times out."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self._fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fillers.append(s)
        time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self.listener.close()
