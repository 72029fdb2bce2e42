"""Updates behind an http(s) URL: downloaded, checked, and removed;
every failure one error line."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.core import log
from dmoverlay.core.errors import SourceError
from tests.apply.readers.readkit import (
    compress,
    make_cpio,
    read_all,
    read_spec,
    shape,
)

# ------------------------------------------------------------------ downloads


class _Server(http.server.ThreadingHTTPServer):
    routes: dict[str, Callable[[_Handler], None]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
        else:
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


def send(body: bytes, *, length: int | None = None) -> Callable[[_Handler], None]:
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
    return route


def send_unsized(body: bytes) -> Callable[[_Handler], None]:
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body)
    return route


def redirect(to: str) -> Callable[[_Handler], None]:
    def route(handler: _Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, _Server]]:
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class _Progress:
    shown: list[int]

    def __init__(self, label: str) -> None:
        _Progress.shown.append(-1)

    def __call__(self, percent: int) -> None:
        _Progress.shown.append(percent)


def test_download(server: tuple[str, _Server], tree: Path, tmp_path: Path, staging: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, httpd = server
    archive = compress(make_cpio(tree, tmp_path / "u.cpio"), "gzip")
    body = archive.read_bytes()
    good = hashlib.sha256(body).hexdigest()
    httpd.routes = {"/updates.img": send(body), "/moved": redirect("/updates.img"),
                    "/unsized": send_unsized(body)}
    _Progress.shown = []
    monkeypatch.setattr(log, "Percent", _Progress)
    with open_update(f"{url}/updates.img", staging=staging, sha256=good) as reader:
        assert [p.name.startswith("download-") for p in staging.iterdir()] == [True]
        assert reader.description == f"gzip-compressed cpio archive {url}/updates.img"
        assert shape(read_all(reader)) == shape(read_spec(tree, staging))
    assert _Progress.shown[0] == -1 and _Progress.shown[-1] == 100
    assert list(staging.iterdir()) == []
    for path in ("/moved", "/unsized"):
        # the file downloaded is checked against the SHA-256 before it is read
        got = read_spec(f"{url}{path}", staging, sha256=good)
        assert shape(got) == shape(read_spec(tree, staging))
    assert list(staging.iterdir()) == []


def download_fails(spec: str, staging: Path, words: str, **kw: object) -> None:
    with pytest.raises(SourceError, match=words) as info, \
            open_update(spec, staging=staging, **kw):  # type: ignore[arg-type]
        pass
    assert "\n" not in info.value.message
    assert list(staging.iterdir()) == []


def test_download_failures(server: tuple[str, _Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/short": send(b"x" * 10, length=1000),
                    "/good": send(b"070701"),
                    "/to-ftp": redirect("ftp://127.0.0.1/x")}
    download_fails(f"{url}/missing", staging, r"cannot download .*/missing: HTTP 404 Not Found")
    download_fails(f"{url}/short", staging, "got 10 of 1000 bytes|connection broken")
    download_fails(f"{url}/to-ftp", staging, "redirected to ftp://127.0.0.1/x")
    download_fails(f"{url}/good", staging, f"SHA-256 is .*, not {'1' * 64}", sha256="1" * 64)


def test_connection_refused(staging: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    download_fails(f"http://127.0.0.1:{port}/u", staging, "Connection refused")


def test_no_answer_times_out(staging: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # accepted by the kernel, never answered
        port = s.getsockname()[1]
        download_fails(f"http://127.0.0.1:{port}/u", staging, "no answer for 0.3 s",
                       timeout=0.3)


def drip(every: float) -> Callable[[_Handler], None]:
    """A byte now and then: each read sees progress, the download never ends."""
    def route(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        with suppress(OSError):  # the client gave up
            for _ in range(100000):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(every)
    return route


def test_a_trickle_meets_the_deadline(server: tuple[str, _Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/slow": drip(0.05)}
    # each read brings a byte well within the stall timeout: only the deadline ends it
    download_fails(f"{url}/slow", staging, r"not done after 0.5 s \(\d+ B received\)",
                   timeout=5, deadline=0.5)


def test_sigterm_during_a_download_leaves_nothing(server: tuple[str, _Server],
                                                  tmp_path: Path) -> None:
    url, httpd = server
    httpd.routes = {"/slow": drip(0.05)}
    root, run = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    run.mkdir()
    apply = subprocess.Popen(
        [sys.executable, "-m", "dmoverlay", "apply", f"{url}/slow", "--root", str(root),
         "--run-dir", str(run)], stderr=subprocess.PIPE, text=True)
    try:
        while not any((run / "dmoverlay").glob("staging-*/download-*")):
            assert apply.poll() is None, apply.communicate()
            time.sleep(0.02)
        apply.terminate()
        _, stderr = apply.communicate(timeout=60)
    finally:
        apply.kill()
    assert apply.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: terminated (SIGTERM); what was under way was undone"], stderr
    assert "Traceback" not in stderr
    assert list(run.iterdir()) == [] and list(root.iterdir()) == []


@pytest.mark.parametrize("spec", ["ftp://127.0.0.1/u.img", "file:///etc/passwd",
                                  "HTTPX://x/y"])
def test_other_url_schemes_are_refused(spec: str, staging: Path) -> None:
    download_fails(spec, staging, "URLs are not supported")
