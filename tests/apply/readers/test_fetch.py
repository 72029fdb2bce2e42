"""Downloads as a fleet needs them, against a real server on 127.0.0.1
that misbehaves: resumed after a cut, never spliced across versions,
retried on mirrors, bounded in time and in space; every failure one line,
and nothing left in the staging directory."""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.apply.readers.download import Limits, download
from dmoverlay.apply.readers.fetchplan import Retry
from dmoverlay.core.errors import SourceError
from dmoverlay.core.sizes import KiB, MiB
from tests.apply.readers.httpkit import (
    Handler,
    Served,
    Server,
    free_port,
    redirect,
    send,
    send_unsized,
    serving,
    without_proxies,
)

FAST = Limits(timeout=2.0, deadline=10.0,
              retry=Retry(tries=3, first_delay=0.01, max_delay=0.05))
BODY = random.Random(11).randbytes(3 * MiB + 123)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Server]]:
    without_proxies(monkeypatch)
    with serving() as served:
        yield served


def fetched(url: str, staging: Path, *, mirrors: tuple[str, ...] = (),
            sha256: str | None = None, limits: Limits = FAST) -> bytes:
    with download(url, staging=staging, mirrors=mirrors, sha256=sha256,
                  limits=limits) as path:
        data = path.read_bytes()
    assert list(staging.iterdir()) == []
    return data


def fails(url: str, staging: Path, words: str, *, mirrors: tuple[str, ...] = (),
          sha256: str | None = None, limits: Limits = FAST) -> SourceError:
    with pytest.raises(SourceError, match=words) as info, \
            download(url, staging=staging, mirrors=mirrors, sha256=sha256, limits=limits):
        pass
    assert "\n" not in info.value.message and info.value.hint
    assert list(staging.iterdir()) == []  # the partial file too
    return info.value


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ resume


def test_a_cut_download_resumes_where_it_broke(server: tuple[str, Server],
                                               staging: Path) -> None:
    url, httpd = server
    served = Served(BODY, cuts=[MiB, 2 * MiB + 7])
    httpd.routes = {"/u.img": served}
    assert fetched(f"{url}/u.img", staging, sha256=sha(BODY)) == BODY
    assert served.asked == [(None, None), (f"bytes={MiB}-", '"v1"'),
                            (f"bytes={2 * MiB + 7}-", '"v1"')]


def test_a_server_that_ignores_range_is_read_from_the_start(server: tuple[str, Server],
                                                            staging: Path) -> None:
    url, httpd = server
    served = Served(BODY, ranges=False, cuts=[MiB])
    httpd.routes = {"/u.img": served}
    # the 200 replaced the bytes held, in the file and in the checksum
    assert fetched(f"{url}/u.img", staging, sha256=sha(BODY)) == BODY
    assert served.asked[1] == (f"bytes={MiB}-", '"v1"')


@pytest.mark.parametrize("if_range", [True, False], ids=["if-range", "if-range-ignored"])
def test_a_file_changed_between_tries_is_not_spliced(server: tuple[str, Server],
                                                     staging: Path, if_range: bool) -> None:
    url, httpd = server
    new = BODY[::-1]

    def change(served: Served) -> None:
        served.body, served.etag = new, '"v2"'

    served = Served(BODY, cuts=[MiB], if_range=if_range, then=change)
    httpd.routes = {"/u.img": served}
    assert fetched(f"{url}/u.img", staging, sha256=sha(new)) == new
    # honoured, If-Range gives the new file whole; ignored, the part's
    # ETag gives the change away and the next try asks for all of it
    assert [r for r, _ in served.asked] == \
        [None, f"bytes={MiB}-"] + ([] if if_range else [None])


def test_a_part_that_does_not_continue_is_not_used(server: tuple[str, Server],
                                                   staging: Path) -> None:
    url, httpd = server
    served = Served(BODY, cuts=[MiB])
    calls = []

    def route(handler: Handler) -> None:
        calls.append(1)
        if len(calls) != 2:
            served(handler)
            return
        handler.send_response(206)  # bytes from elsewhere in the file
        handler.send_header("ETag", '"v1"')
        handler.send_header("Content-Range", f"bytes 0-9/{len(BODY)}")
        handler.send_header("Content-Length", "10")
        handler.end_headers()
        handler.wfile.write(BODY[:10])

    httpd.routes = {"/u.img": route}
    assert fetched(f"{url}/u.img", staging, sha256=sha(BODY)) == BODY
    assert [r for r, _ in served.asked] == [None, None]  # the third asked for all


# ------------------------------------------------------------------ lengths


def test_a_length_longer_than_the_body_fails(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/long": send(b"x" * 10, length=1000)}
    fails(f"{url}/long", staging, r"cannot download .*/long: got 10 of 1000 bytes "
                                  r"\(last of 4 tries\)$")  # the first one gained bytes


def test_a_length_shorter_than_the_body_fails_the_checksum(server: tuple[str, Server],
                                                           staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/short": send(BODY, length=1000)}
    error = fails(f"{url}/short", staging, f"SHA-256 is {sha(BODY[:1000])}, not {sha(BODY)}",
                  sha256=sha(BODY))
    assert "damaged" in str(error.hint)


def test_a_chunked_body_is_not_judged_by_a_content_length(server: tuple[str, Server],
                                                         staging: Path) -> None:
    """Both headers: Transfer-Encoding wins (RFC 9112 6.3), as it does in http.client."""
    url, httpd = server

    def route(handler: Handler) -> None:
        handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Content-Length", str(len(BODY) * 2))
        handler.send_header("Connection", "close")
        handler.end_headers()
        for at in range(0, len(BODY), MiB):
            piece = BODY[at:at + MiB]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")

    httpd.routes = {"/u.img": route}
    assert fetched(f"{url}/u.img", staging) == BODY


# ------------------------------------------------------------------ redirects


@pytest.mark.parametrize("to", ["ftp://127.0.0.1/u.img", "file:///etc/passwd"])
def test_a_redirect_off_http_is_refused(server: tuple[str, Server], staging: Path,
                                        to: str) -> None:
    url, httpd = server
    httpd.routes = {"/u.img": redirect(to)}
    fails(f"{url}/u.img", staging, f"redirected to {to} \\(only http\\(s\\) URLs are followed\\)$")


@pytest.mark.parametrize("mirror", ["file:///etc/passwd", "ftp://127.0.0.1/u.img", "/etc"])
def test_download_takes_only_http_urls(staging: Path, mirror: str) -> None:
    """open_update and the boot line check their URLs; the library's
    download checks them again (urllib would read a file: URL)."""
    fails("http://127.0.0.1:1/u.img", staging, f"cannot download {mirror}: not an http",
          mirrors=(mirror,))


@pytest.mark.parametrize("bad", ["http://127.0.0.1:1/u\nimg", "http://127.0.0.1:1/u\x1b[31mimg",
                                 "http://127.0.0.1:1/u img", "http://127.0.0.1:1/\u00fc.img"])
def test_a_url_http_client_cannot_send_is_refused_at_once(staging: Path, bad: str) -> None:
    """http.client refuses such a URL on every try (outside ASCII, with a
    traceback): not a failure to retry, and said escaped, on one line (a
    newline in it split the error in two)."""
    started = time.monotonic()
    error = fails(bad, staging, "a URL may hold no space, control character or character "
                                "outside ASCII$")
    assert error.message.isprintable()
    assert time.monotonic() - started < 1.0  # no retry, no delay


@pytest.mark.parametrize(("bad", "words"), [
    ("http://[::1/u.img", r"not a valid URL \(Invalid IPv6 URL\)$"),
    ("http://127.0.0.1:99999/u.img", r"not a valid URL \(Port out of range 0-65535\)$"),
    ("http:///u.img", "no host in the URL$"),
])
def test_a_malformed_url_is_refused_at_once(staging: Path, bad: str, words: str) -> None:
    """urllib raised ValueError for the first (a traceback); the others
    were retried, though no try could fetch them."""
    started = time.monotonic()
    fails("http://127.0.0.1:1/u.img", staging, f"cannot download {re.escape(bad)}: {words}",
          mirrors=(bad,))
    assert time.monotonic() - started < 1.0


def test_a_redirect_to_a_malformed_url_is_one_line(server: tuple[str, Server],
                                                   staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/u.img": redirect("http://[::1/elsewhere")}
    fails(f"{url}/u.img", staging, r"redirected to http://\[::1/elsewhere, not a valid URL$")


def test_a_redirect_loop_is_one_line(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/a": redirect("/b"), "/b": redirect("/a")}
    fails(f"{url}/a", staging, r"redirected in a loop \(at http://.*/[ab]\)$")


# ------------------------------------------------------------------ time


def test_a_stall_mid_body_is_bounded_by_the_timeout(server: tuple[str, Server],
                                                    staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/u.img": Served(BODY, cuts=[MiB] * 10, stall=True)}
    limits = Limits(timeout=0.3, deadline=10, retry=Retry(tries=2, first_delay=0.01))
    began = time.monotonic()
    fails(f"{url}/u.img", staging, r"no answer for 0.3 s \(last of 3 tries\)$", limits=limits)
    assert time.monotonic() - began < 3


def test_a_stall_then_a_good_try_completes(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    served = Served(BODY, cuts=[MiB], stall=True)  # the second try gets the rest
    httpd.routes = {"/u.img": served}
    limits = Limits(timeout=0.3, deadline=10, retry=Retry(tries=2, first_delay=0.01))
    assert fetched(f"{url}/u.img", staging, limits=limits) == BODY
    assert served.asked[1] == (f"bytes={MiB}-", '"v1"')


def test_a_stall_cut_short_by_the_deadline_says_so(server: tuple[str, Server],
                                                   staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/u.img": Served(BODY, cuts=[MiB], stall=True)}
    began = time.monotonic()
    fails(f"{url}/u.img", staging, r"not done after 0.5 s \(1.0 MiB received\)$",
          limits=Limits(timeout=5, deadline=0.5))
    assert time.monotonic() - began < 3


def test_retries_stop_at_the_deadline(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/busy": send(b"", status=503)}
    limits = Limits(deadline=0.5, retry=Retry(tries=100, first_delay=0.2, max_delay=0.2))
    began = time.monotonic()
    fails(f"{url}/busy", staging, r"HTTP 503 Service Unavailable \(last of \d+ tries\)$",
          limits=limits)
    assert time.monotonic() - began < 3  # 100 tries would take 15 s


# ------------------------------------------------------------------ mirrors


def test_mirrors_are_tried_in_turn(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    good = Served(BODY)
    httpd.routes = {"/busy": send(b"", status=503), "/gone": send(b"nope", status=404),
                    "/u.img": good}
    down = f"http://127.0.0.1:{free_port()}/u.img"
    data = fetched(down, staging, mirrors=(f"{url}/busy", f"{url}/gone", f"{url}/u.img"),
                   sha256=sha(BODY))
    assert data == BODY and good.asked == [(None, None)]


def test_a_mirror_with_the_wrong_file_is_passed_over(server: tuple[str, Server],
                                                     staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/old": Served(b"old update"), "/u.img": Served(BODY)}
    assert fetched(f"{url}/old", staging, mirrors=(f"{url}/u.img",), sha256=sha(BODY)) == BODY


def test_a_cut_resumes_on_the_next_mirror(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    first, second = Served(BODY, cuts=[MiB] * 10), Served(BODY)
    httpd.routes = {"/a": first, "/b": second}
    # the first always cuts: it gains no byte past the first try, and the
    # second mirror continues the bytes held (same ETag: the same file)
    assert fetched(f"{url}/a", staging, mirrors=(f"{url}/b",)) == BODY
    assert (f"bytes={MiB}-", '"v1"') in second.asked


def test_every_mirror_down_is_one_line(staging: Path) -> None:
    urls = [f"http://127.0.0.1:{free_port()}/u.img" for _ in range(3)]
    fails(urls[0], staging, r"Connection refused \(last of 5 tries on 3 URLs\)$",
          mirrors=tuple(urls[1:]))


def test_the_failure_that_tells_most_is_the_one_said(server: tuple[str, Server],
                                                     staging: Path) -> None:
    """A mirror down may come back; one with another file will not: that
    is the line to read, not the last refused connection."""
    url, httpd = server
    httpd.routes = {"/old": Served(b"old update")}
    down = f"http://127.0.0.1:{free_port()}/u.img"
    fails(down, staging, f"cannot download {url}/old: SHA-256 is {sha(b'old update')}, "
                         f"not {sha(BODY)} \\(last of 4 tries on 2 URLs\\)$",
          mirrors=(f"{url}/old",), sha256=sha(BODY))


# ------------------------------------------------------------------ space


def _room(staging: Path, room: int) -> int:
    """The reserve that leaves `room` bytes for a download in staging."""
    st = os.statvfs(staging)
    return st.f_bavail * st.f_frsize - room


def test_a_download_too_large_is_refused_before_it_starts(server: tuple[str, Server],
                                                          staging: Path) -> None:
    url, httpd = server
    served = Served(BODY)
    httpd.routes = {"/u.img": served}
    limits = Limits(reserve=_room(staging, 256 * KiB), retry=FAST.retry)
    fails(f"{url}/u.img", staging, r"3.0 MiB will not fit in the \d+.\d KiB free for it in ",
          limits=limits)
    assert len(served.asked) == 1  # not retried: no mirror has more room


def test_a_download_of_unknown_length_stops_where_it_overflows(server: tuple[str, Server],
                                                               staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/u.img": send_unsized(BODY)}
    limits = Limits(reserve=_room(staging, 256 * KiB), retry=FAST.retry)
    fails(f"{url}/u.img", staging, "stopped where it would overflow the room left in .* "
                                   r"\(the server gave no length\)$", limits=limits)


def test_a_download_of_unknown_length_that_fits(server: tuple[str, Server],
                                                staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/u.img": send_unsized(BODY)}
    limits = Limits(reserve=_room(staging, 64 * MiB), retry=FAST.retry)
    assert fetched(f"{url}/u.img", staging, limits=limits) == BODY


# ------------------------------------------------------------------ at most


def test_a_file_said_larger_than_the_most_is_not_read(server: tuple[str, Server],
                                                      staging: Path) -> None:
    url, httpd = server
    served = Served(BODY)
    httpd.routes = {"/u.img": served}
    limits = Limits(most=64 * KiB, retry=FAST.retry)
    fails(f"{url}/u.img", staging, r"larger than the 64.0 KiB expected$", limits=limits)
    assert len(served.asked) == 1  # not retried: the file will not shrink


def test_a_body_of_unknown_length_stops_past_the_most(server: tuple[str, Server],
                                                      staging: Path) -> None:
    """A server that gives no length is stopped where the body passes
    `most`, not where the staging filesystem runs out of room."""
    url, httpd = server
    httpd.routes = {"/u.img": send_unsized(BODY)}
    limits = Limits(most=64 * KiB, reserve=_room(staging, 1 * MiB), retry=FAST.retry)
    fails(f"{url}/u.img", staging, r"larger than the 64.0 KiB expected$", limits=limits)


def test_a_file_of_the_most_is_taken(server: tuple[str, Server], staging: Path) -> None:
    url, httpd = server
    httpd.routes = {"/sized": Served(BODY[:64 * KiB]), "/unsized": send_unsized(BODY[:64 * KiB])}
    limits = Limits(most=64 * KiB, retry=FAST.retry)
    assert fetched(f"{url}/sized", staging, limits=limits) == BODY[:64 * KiB]
    assert fetched(f"{url}/unsized", staging, limits=limits) == BODY[:64 * KiB]
