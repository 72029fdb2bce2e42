"""A real HTTP server on 127.0.0.1, in a thread, for the download tests:
routes that serve a file as a good server does (Range, If-Range, ETag) or
as a bad one does (connections cut mid-body, lengths that lie, Range
ignored, redirects in a loop or off http, stalls)."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import pytest

Route = Callable[["Handler"], None]


class Server(http.server.ThreadingHTTPServer):
    routes: dict[str, Route]
    released: threading.Event  # set at the end: stalled routes give up


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


def without_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy taken from the environment: the tests' server is on 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


@contextmanager
def serving() -> Iterator[tuple[str, Server]]:
    """(its base URL, the server) while the block runs."""
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.routes = {}
    httpd.released = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.released.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def free_port() -> int:
    """A port nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def send(body: bytes, *, length: int | None = None, status: int = 200) -> Route:
    def route(handler: Handler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        with suppress(OSError):  # a lying length: the client may have gone
            handler.wfile.write(body)
    return route


def send_unsized(body: bytes) -> Route:
    def route(handler: Handler) -> None:
        handler.send_response(200)
        handler.end_headers()
        with suppress(OSError):
            handler.wfile.write(body)
    return route


def redirect(to: str) -> Route:
    def route(handler: Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def cut(handler: Handler) -> None:
    """End the connection now, whatever the client still waits for."""
    handler.wfile.flush()
    handler.close_connection = True
    with suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


@dataclass
class Served:
    """A file served as servers do: Range answered with a 206 unless
    `ranges` is off, If-Range honoured unless `if_range` is off.  Each
    request takes the next of `cuts` (None: the whole body): the body is
    cut there (an offset in the file); with `stall`, the server then waits
    (for the test's end) instead of ending the connection."""

    body: bytes
    etag: str = '"v1"'
    ranges: bool = True
    if_range: bool = True
    cuts: list[int | None] = field(default_factory=list)
    stall: bool = False
    asked: list[tuple[str | None, str | None]] = field(default_factory=list)
    # called after each request is answered (to change the file between tries)
    then: Callable[[Served], None] = lambda served: None

    def __call__(self, handler: Handler) -> None:
        asked = (handler.headers.get("Range"), handler.headers.get("If-Range"))
        self.asked.append(asked)
        start = self._start(*asked)
        size = len(self.body)
        handler.send_response(200 if start is None else 206)
        handler.send_header("ETag", self.etag)
        handler.send_header("Content-Length", str(size - (start or 0)))
        if start is not None:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        end = self.cuts.pop(0) if self.cuts else None
        with suppress(OSError):
            handler.wfile.write(self.body[start or 0:end])
            if self.stall:
                handler.wfile.flush()
                handler.server.released.wait(30)
            if end is not None:
                cut(handler)
        self.then(self)

    def _start(self, ranged: str | None, if_range: str | None) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", ranged or "")
        if not self.ranges or match is None:
            return None
        if self.if_range and if_range is not None and if_range != self.etag:
            return None
        return int(match[1])
