"""Updates behind an http(s) URL: downloaded, checked, and removed;
every failure one error line."""

from __future__ import annotations

import hashlib
import importlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.apply.readers.fetchplan import Retry
from dmoverlay.core import log
from dmoverlay.core.errors import SourceError
from tests.apply.readers.httpkit import (
    Handler,
    Route,
    Server,
    free_port,
    redirect,
    send,
    send_unsized,
    serving,
    without_proxies,
)
from tests.apply.readers.readkit import (
    compress,
    make_cpio,
    read_all,
    read_spec,
    shape,
)

# ------------------------------------------------------------------ downloads

FAST = Retry(tries=3, first_delay=0.01, max_delay=0.05)  # failures end in well under 1 s


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Server]]:
    without_proxies(monkeypatch)
    with serving() as served:
        yield served


class _Progress:
    shown: list[int]

    def __init__(self, label: str) -> None:
        _Progress.shown.append(-1)

    def __call__(self, percent: int) -> None:
        _Progress.shown.append(percent)


def test_download(server: tuple[str, Server], tree: Path, tmp_path: Path, staging: Path,
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


def test_download_failures(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/short": send(b"x" * 10, length=1000),
                    "/good": send(b"070701"),
                    "/to-ftp": redirect("ftp://127.0.0.1/x")}
    download_fails(f"{url}/missing", staging, r"cannot download .*/missing: HTTP 404 Not Found$")
    download_fails(f"{url}/short", staging, r"got 10 of 1000 bytes \(last of 4 tries\)",
                   retry=FAST)
    download_fails(f"{url}/to-ftp", staging, "redirected to ftp://127.0.0.1/x")
    download_fails(f"{url}/good", staging, f"SHA-256 is .*, not {'1' * 64}", sha256="1" * 64)


def test_without_tls_https_is_one_line_and_nothing_is_fetched(
        server: tuple[str, Server], staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An initramfs made with dmoverlay_https=no has no ssl module (as
    injected here): an https URL, or a redirect to one, says so."""
    url, httpd = server
    httpd.routes = {"/to-tls": redirect("https://127.0.0.1:9/u.img")}
    # the module, not the package's function of the same name
    monkeypatch.setattr(importlib.import_module("dmoverlay.apply.readers.download"),
                        "has_https", lambda: False)
    download_fails("https://127.0.0.1:9/u.img", staging,
                   r"https://127.0.0.1:9/u.img: this Python has no TLS \(an initramfs made "
                   r"with dmoverlay_https=no\)$")
    download_fails(f"{url}/to-tls", staging, "redirected to https://127.0.0.1:9/u.img, but "
                   "this Python has no TLS")


def test_connection_refused(staging: Path) -> None:
    download_fails(f"http://127.0.0.1:{free_port()}/u", staging, "Connection refused",
                   retry=FAST)


def test_no_answer_times_out(staging: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # accepted by the kernel, never answered
        port = s.getsockname()[1]
        download_fails(f"http://127.0.0.1:{port}/u", staging, "no answer for 0.3 s",
                       timeout=0.3, retry=FAST)


def drip(every: float) -> Route:
    """A byte now and then: each read sees progress, the download never ends."""
    def route(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        with suppress(OSError):  # the client gave up
            for _ in range(100000):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(every)
    return route


def test_a_trickle_meets_the_deadline(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/slow": drip(0.05)}
    # each read brings a byte well within the stall timeout: only the deadline ends it
    download_fails(f"{url}/slow", staging, r"not done after 0.5 s \(\d+ B received\)",
                   timeout=5, deadline=0.5)


def test_sigterm_during_a_download_leaves_nothing(server: tuple[str, Server],
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


def test_a_download_is_what_brings_in_urllib() -> None:
    """The network modules take about as long to import as the rest of an
    apply: an apply of a file, or a boot with no URL, does without them."""
    probe = ("import sys\n"
             "import dmoverlay.apply.update, dmoverlay.boot.updates, dmoverlay.cli.apply\n"
             "print(sorted(m for m in ('urllib.request', 'http.client', 'ssl') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout == "[]\n"
