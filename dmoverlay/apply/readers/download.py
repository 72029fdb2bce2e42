"""An update behind an http(s) URL, downloaded into the staging directory:
redirects followed to http(s) only, a stall timeout and a deadline for the
whole, the length the server announced checked.

urllib and http.client are imported by a download only: they take about as
long as the rest of an apply's imports."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from dmoverlay.core import log
from dmoverlay.core.errors import SourceError
from dmoverlay.core.sizes import KiB, format_size

if TYPE_CHECKING:
    import urllib.request
    from http.client import HTTPMessage, HTTPResponse

CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap
DOWNLOAD_TIMEOUT = 30.0  # seconds without progress, per connect and per read
# seconds for a whole download: a server that drips a byte now and then
# never trips the stall timeout
DOWNLOAD_DEADLINE = 600.0


def url_scheme(spec: str) -> str | None:
    """The scheme of a URL ("http"), or None for a path."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return None if match is None else match[1].lower()


def _http_redirects() -> urllib.request.BaseHandler:
    """A handler that follows redirects to http(s) only (urllib would also
    follow ftp)."""
    import urllib.parse
    import urllib.request

    class HttpRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                             msg: str, headers: HTTPMessage,
                             newurl: str) -> urllib.request.Request | None:
            if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
                raise SourceError(f"{req.full_url}: redirected to {newurl}",
                                  hint="only http(s) URLs are followed")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return HttpRedirects()


@contextmanager
def download(url: str, *, staging: Path, timeout: float = DOWNLOAD_TIMEOUT,
             deadline: float = DOWNLOAD_DEADLINE) -> Iterator[Path]:
    """Download `url` into staging/download-XXXX, removed on exit.  No
    progress for `timeout` seconds, or no end after `deadline` seconds (give
    or take one read), is an error."""
    fd, name = tempfile.mkstemp(prefix="download-", dir=staging)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, timeout, deadline)
        yield path
    finally:
        path.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO, timeout: float, deadline: float) -> None:
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    opener = urllib.request.build_opener(_http_redirects())
    request = urllib.request.Request(url, headers={"User-Agent": "dmoverlay"})
    give_up = time.monotonic() + deadline
    try:
        with opener.open(request, timeout=min(timeout, deadline)) as response:
            total = _content_length(response.headers.get("Content-Length"))
            got = _copy_response(response, out, total, url, (give_up, deadline))
    except urllib.error.HTTPError as exc:
        raise SourceError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise _timed_out(url, timeout) from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise SourceError(f"cannot download {url}: {text}",
                          hint="check the URL and the network") from None
    except TimeoutError:
        raise _timed_out(url, timeout) from None
    except (HTTPException, ConnectionError) as exc:
        raise SourceError(f"cannot download {url}: connection broken ({exc!r})",
                          hint="try again") from None
    except OSError as exc:
        raise SourceError(f"cannot download {url}: {exc.strerror or exc}",
                          hint="check the URL and the network") from None
    if total is not None and got != total:
        raise SourceError(f"cannot download {url}: got {got} of {total} bytes",
                          hint="the connection broke: try again")


def _store(out: BinaryIO, chunk: bytes, url: str) -> None:
    """Write a chunk; an empty one flushes what is buffered."""
    try:
        if chunk:
            out.write(chunk)
        else:
            out.flush()
    except OSError as exc:
        raise SourceError(f"cannot store the download of {url}: {exc.strerror}",
                          hint="free space in the staging directory under /run") from None


def _timed_out(url: str, timeout: float) -> SourceError:
    return SourceError(f"cannot download {url}: no answer for {timeout:g} s",
                       hint="check the URL and the network")


def _content_length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _copy_response(response: HTTPResponse, out: BinaryIO, total: int | None, url: str,
                   deadline: tuple[float, float]) -> int:
    """Copy the body to `out`; `deadline`: the monotonic time to give up at,
    and the seconds that it stands for."""
    progress = log.Percent(f"downloading {url}") if total else None
    got = 0
    # read1: what one read of the socket brings, so a trickle meets the check
    while chunk := response.read1(CHUNK):  # errors here are the network's
        _store(out, chunk, url)
        got += len(chunk)
        if time.monotonic() > deadline[0]:
            raise SourceError(f"cannot download {url}: not done after {deadline[1]:g} s "
                              f"({format_size(got)} received)",
                              hint="the server or the network is too slow; give more time "
                                   "with --timeout")
        if progress is not None and total:
            progress(min(100, got * 100 // total))
    _store(out, b"", url)
    if progress is None:
        log.info(f"downloaded {url} ({format_size(got)})")
    return got
