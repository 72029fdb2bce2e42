"""An update behind an http(s) URL, downloaded into the staging directory,
as many machines fetching the same update need it: a dropped connection
resumed where it broke (fetchplan.py decides what to ask), failures retried
a bounded number of times with jittered delays, on the mirrors given in
turn, the file checked against its SHA-256 before anyone reads it, and
nothing stored past the room the staging filesystem (RAM, at boot) has.
Redirects are followed to http(s) only; a stall timeout and a deadline for
the whole, retries and their delays included.

urllib and http.client are imported by a download only: they take about as
long as the rest of an apply's imports."""

from __future__ import annotations

import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dmoverlay.apply.readers.fetchplan import (
    RETRY,
    Answer,
    Failures,
    Held,
    Retry,
    Take,
    Unusable,
    after_failure,
    changed,
    judge,
    next_try,
    request_headers,
    validator,
)
from dmoverlay.core import log
from dmoverlay.core.errors import SourceError
from dmoverlay.core.sizes import KiB, MiB, format_size

if TYPE_CHECKING:
    import hashlib
    import urllib.request
    from http.client import HTTPMessage, HTTPResponse

__all__ = ["DOWNLOAD_DEADLINE", "DOWNLOAD_RESERVE", "DOWNLOAD_TIMEOUT", "LIMITS", "RETRY",
           "Limits", "Retry", "check_url", "download", "url_scheme"]

CHUNK = 256 * KiB  # read at most at once, into one buffer
DOWNLOAD_TIMEOUT = 30.0  # seconds without progress, per connect and per read
# seconds for a whole download: a server that drips a byte now and then
# never trips the stall timeout
DOWNLOAD_DEADLINE = 600.0
# of the staging filesystem left free by a download: apply's spool needs
# room after it (and keeps 16 MiB of its own free)
DOWNLOAD_RESERVE = 32 * MiB
_RESTAT_EVERY = 8 * MiB  # written between looks at the free space (others use it too)
# what http.client will not send in a URL (outside ASCII: a traceback from
# its encoding), and what would break a message's line
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]|[^\x00-\x7f]")
_SPACE_HINT = "free space under the run directory (RAM at boot), or use a smaller update"


def url_scheme(spec: str) -> str | None:
    """The scheme of a URL ("http"), or None for a path."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return None if match is None else match[1].lower()


@dataclass(frozen=True)
class Limits:
    """`timeout`: seconds without progress, per connect and per read;
    `deadline`: seconds for the whole, retries included; `reserve`: bytes
    of the staging filesystem a download leaves free; `most`: bytes the
    file may have at most (None: as many as fit), for what is small by
    nature (a signature): a server is not let fill RAM with it."""

    timeout: float = DOWNLOAD_TIMEOUT
    deadline: float = DOWNLOAD_DEADLINE
    reserve: int = DOWNLOAD_RESERVE
    retry: Retry = RETRY
    most: int | None = None


LIMITS = Limits()


@contextmanager
def download(url: str, *, staging: Path, mirrors: tuple[str, ...] = (),
             sha256: str | None = None, limits: Limits = LIMITS) -> Iterator[Path]:
    """Download `url` (or the same file from one of `mirrors`) into
    staging/download-XXXX, removed on exit, and on any failure.  `sha256`
    (hexadecimal, lower case): the file must have it, or the next mirror is
    tried.  One SourceError when no URL gave the file within the limits."""
    for each in (url, *mirrors):
        check_url(each)
    fd, name = tempfile.mkstemp(prefix="download-", dir=staging)
    path = Path(name)
    try:
        try:
            _Download((url, *mirrors), fd, sha256=sha256, limits=limits, where=staging).run()
        finally:
            os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)


def check_url(url: str) -> None:
    """SourceError for a URL no try could fetch (urllib alone would open
    file: and ftp: URLs too, and raise ValueError for a malformed one)."""
    if url_scheme(url) not in ("http", "https"):
        raise SourceError(f"cannot download {_printable(url)}: not an http(s) URL",
                          hint="give an http(s) URL")
    if _UNSENDABLE.search(url):  # http.client refuses them, on every try
        raise SourceError(f"cannot download {_printable(url)}: a URL may hold no space, "
                          "control character or character outside ASCII",
                          hint="give the URL percent-encoded (a space as %20)")
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError as exc:
        raise SourceError(f"cannot download {url}: not a valid URL ({exc})",
                          hint="give an http(s) URL") from None
    if not host:
        raise SourceError(f"cannot download {url}: no host in the URL",
                          hint="give an http(s) URL")
    if parts.scheme.lower() == "https" and not has_https():
        raise SourceError(f"cannot download {url}: this Python has no TLS (an initramfs "
                          "made with dmoverlay_https=no)", hint=_NO_HTTPS_HINT)


_NO_HTTPS_HINT = ("name it by http:// (with a signature or #sha256=, which check it as "
                  "well), or make the initramfs with TLS")


def has_https() -> bool:
    """Whether https can be spoken: the ssl module is there (an initramfs
    may leave it out, with OpenSSL's 5 MiB)."""
    import importlib.util

    return importlib.util.find_spec("ssl") is not None


class _Failed(Exception):
    """One try that failed: `why`, and whether trying again may help."""

    def __init__(self, why: str, *, transient: bool, hint: str = "",
                 timed_out: bool = False) -> None:
        super().__init__(why)
        self.why, self.transient, self.hint, self.timed_out = why, transient, hint, timed_out


class _Download:
    """The tries of one download, on one file: the bytes it holds are kept
    from one try to the next when they can be continued."""

    def __init__(self, urls: tuple[str, ...], fd: int, *, sha256: str | None,
                 limits: Limits, where: Path) -> None:
        self.urls, self.fd, self.sha256, self.limits = urls, fd, sha256, limits
        self.held = Held()
        self.room = _Room(fd, limits.reserve, where)
        # one buffer for every read: a new one for each costs page faults
        self.view = memoryview(bytearray(CHUNK))
        # of the bytes held, hashed as they arrive: the file is not read again
        self.digest = _sha256() if sha256 is not None else None
        self.progress: Callable[[int], None] | None = None
        self.give_up = time.monotonic() + limits.deadline
        self.opener = _opener()

    def run(self) -> None:
        failures, mirror, tries = Failures(), 0, 0
        telling: tuple[str, _Failed] | None = None  # the last failure that will not pass
        while True:
            before = self.held.size
            tries += 1
            try:
                self._try(self.urls[mirror])
                return
            except _Failed as exc:
                failure = exc
            if not failure.transient:
                telling = (self.urls[mirror], failure)
            if failure.timed_out and time.monotonic() >= self.give_up:
                raise self._late()  # a wait cut short by the deadline, not the stall timeout
            failures = after_failure(failures, mirror=mirror, transient=failure.transient,
                                     progressed=self.held.size > before)
            step = next_try(failures, mirror=mirror, mirrors=len(self.urls),
                            retry=self.limits.retry, jitter=random.random())
            if step is None or time.monotonic() + step.delay >= self.give_up:
                raise self._given_up(*(telling or (self.urls[mirror], failure)), tries)
            log.warning(f"download of {self.urls[mirror]}: {failure.why}; trying "
                        f"{self.urls[step.mirror]} {_after(step.delay)}")
            time.sleep(step.delay)
            mirror = step.mirror

    def _given_up(self, url: str, failure: _Failed, tries: int) -> SourceError:
        urls = len(set(self.urls))
        more = "" if tries == 1 else \
            f" (last of {tries} tries{f' on {urls} URLs' if urls > 1 else ''})"
        return SourceError(f"cannot download {url}: {failure.why}{more}",
                           hint=failure.hint or "check the URL and the network")

    def _try(self, url: str) -> None:
        """Fetch what is missing from `url`, then check the whole."""
        import urllib.error
        import urllib.request
        from http.client import HTTPException

        headers = {"User-Agent": "dmoverlay", **request_headers(self.held)}
        request = urllib.request.Request(url, headers=headers)
        try:
            with self.opener.open(request, timeout=self._timeout()) as response:
                self._receive(url, response)
        except Unusable as exc:
            raise _Failed(exc.why, transient=exc.transient) from None
        except urllib.error.HTTPError as exc:
            raise self._unusable(exc.code, exc.reason) from None
        except urllib.error.URLError as exc:
            raise _Failed(_network(exc.reason, self.limits.timeout), transient=True,
                          timed_out=isinstance(exc.reason, TimeoutError)) from None
        except (TimeoutError, HTTPException, OSError) as exc:
            raise _Failed(_network(exc, self.limits.timeout), transient=True,
                          timed_out=isinstance(exc, TimeoutError)) from None
        self._check_whole()

    def _unusable(self, status: int, reason: object) -> _Failed:
        try:
            judge(self.held, status, content_range=None, content_length=None)
        except Unusable as exc:
            if status == 416:  # from the start next time
                self._restart()
            reason_text = str(reason) if str(reason).isprintable() else ""
            return _Failed(f"{exc.why} {reason_text}".rstrip(), transient=exc.transient)
        return _Failed(f"HTTP {status}", transient=True)  # not reached: errors are >= 400

    def _timeout(self) -> float:
        left = self.give_up - time.monotonic()
        if left <= 0:
            raise self._late()
        return min(self.limits.timeout, left)

    def _late(self) -> SourceError:
        return SourceError(f"cannot download {self.urls[0]}: not done after "
                           f"{self.limits.deadline:g} s ({format_size(self.held.size)} "
                           "received)",
                           hint="the server or the network is too slow; give more time "
                                "with --timeout")

    def _receive(self, url: str, response: HTTPResponse) -> None:
        headers = response.headers
        try:
            answer = judge(self.held, response.status,
                           content_range=headers.get("Content-Range"),
                           # a chunked body's Content-Length is not its length
                           content_length=None if response.chunked else
                           _content_length(headers.get("Content-Length")))
        except Unusable:
            if response.status == 206:  # a range that does not fit: all of it next time
                self._restart()
            raise
        etag, modified = headers.get("ETag"), headers.get("Last-Modified")
        if answer.take is Take.APPEND and changed(self.held, etag, modified):
            self._restart()  # If-Range ignored, and the file changed: no splice
            raise Unusable("the file changed on the server since the download began",
                           transient=True)
        if answer.take is Take.RESTART:
            self._restart()
        self.held = Held(self.held.size, answer.total,
                         validator(etag, modified) if answer.take is Take.RESTART
                         else self.held.validator)
        if answer.total is not None:
            self._refuse_over_most(answer.total)
        if answer.length is not None:
            self.room.refuse_over(answer.length, url, answer.total)
        self._copy(url, response, answer)

    def _refuse_over_most(self, size: int) -> None:
        """Before a file said to be, or a body grown to, `size` bytes is
        stored: Unusable past `limits.most` (not retried on this URL)."""
        most = self.limits.most
        if most is not None and size > most:
            self._restart()
            raise Unusable(f"larger than the {format_size(most)} expected", transient=False)

    def _restart(self) -> None:
        # only a file that holds something: on ext4, truncating even an
        # empty file to 0 makes its close write the whole file out (the
        # auto_da_alloc heuristic), which took longer than the download
        if os.lseek(self.fd, 0, os.SEEK_CUR):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
        self.held = Held()
        if self.digest is not None:
            self.digest = _sha256()

    def _copy(self, url: str, response: HTTPResponse, answer: Answer) -> None:
        """Copy the body to the file; a short one is a failure to retry
        (the bytes received are kept)."""
        total = answer.total
        if self.progress is None and total:
            self.progress = log.Percent(f"downloading {url}")
        want = answer.length
        got = 0
        read = _reader(response, self.view)
        while want is None or got < want:
            n = read(CHUNK if want is None else min(CHUNK, want - got))
            if not n:
                break
            self._refuse_over_most(self.held.size + n)
            self.room.take(n, url)
            self._store(self.view[:n], url)
            got += n
            self.held = Held(self.held.size + n, self.held.total, self.held.validator)
            if time.monotonic() > self.give_up:
                raise self._late()
            if self.progress is not None and total:
                self.progress(min(100, self.held.size * 100 // total))
        if want is not None and got < want:
            raise Unusable(f"got {self.held.size} of {total} bytes", transient=True)

    def _store(self, data: memoryview, url: str) -> None:
        """Write `data` at the end of the file, and into the digest."""
        if self.digest is not None:
            self.digest.update(data)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            raise SourceError(f"cannot store the download of {url}: {exc.strerror}",
                              hint="free space in the staging directory under /run") from None

    def _check_whole(self) -> None:
        """The file is whole: the size announced, the checksum given."""
        size, total = self.held.size, self.held.total
        if total is not None and size != total:
            raise _Failed(f"got {size} of {total} bytes", transient=True)
        if self.digest is not None:
            got = self.digest.hexdigest()
            if got != self.sha256:
                self._restart()
                raise _Failed(f"SHA-256 is {got}, not {self.sha256}", transient=False,
                              hint="the file is damaged or not the one meant; "
                                   "nothing was changed")
        if self.progress is None:
            log.info(f"downloaded {self.urls[0]} ({format_size(size)})")


class _Room:
    """The room left for the download on the staging filesystem, looked
    at again every _RESTAT_EVERY bytes and when it seems to run out."""

    def __init__(self, fd: int, reserve: int, where: Path) -> None:
        self.fd, self.reserve, self.where = fd, reserve, where
        self.left = self._look()
        self.since = 0

    def _look(self) -> int:
        st = os.fstatvfs(self.fd)
        return st.f_bavail * st.f_frsize - self.reserve

    def refuse_over(self, length: int, url: str, total: int | None) -> None:
        """Before a body of `length` bytes is read: SourceError if it cannot fit."""
        self.left, self.since = self._look(), 0
        if length > self.left:
            size = format_size(total if total is not None else length)
            raise SourceError(f"cannot download {url}: {size} will not fit in the "
                              f"{format_size(max(0, self.left))} free for it in {self.where}",
                              hint=_SPACE_HINT)

    def take(self, n: int, url: str) -> None:
        """Before `n` more bytes are written: SourceError if they would
        overflow the room."""
        self.left -= n
        self.since += n
        if self.left < 0 or self.since >= _RESTAT_EVERY:
            self.left, self.since = self._look() - n, 0
            if self.left < 0:
                raise SourceError(f"cannot download {url}: stopped where it would overflow "
                                  f"the room left in {self.where} (the server gave no length)",
                                  hint=_SPACE_HINT)


def _after(delay: float) -> str:
    return "now" if delay == 0 else f"in {delay:.2f} s"


def _network(reason: object, timeout: float) -> str:
    """A network failure in a few words."""
    if isinstance(reason, TimeoutError):
        return f"no answer for {timeout:g} s"
    if isinstance(reason, ConnectionError) and not isinstance(reason, ConnectionRefusedError):
        return f"connection broken ({reason.strerror or type(reason).__name__})"
    if isinstance(reason, OSError):
        return str(reason.strerror or reason)
    text = str(reason)
    return text if text and text.isprintable() else f"connection broken ({reason!r})"


def _opener() -> urllib.request.OpenerDirector:
    import urllib.request

    return urllib.request.build_opener(_http_redirects())


def _http_redirects() -> urllib.request.BaseHandler:
    """A handler that follows redirects to http(s) only (urllib would also
    follow ftp), and says a loop is one."""
    import urllib.parse
    import urllib.request

    class HttpRedirects(urllib.request.HTTPRedirectHandler):
        def http_error_302(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                           msg: str, headers: HTTPMessage) -> IO[bytes] | None:
            # before urllib's own check, which has a message of its own
            where = headers.get("Location") or headers.get("URI") or ""
            try:
                newurl = urllib.parse.urljoin(req.full_url, where)
                scheme = urllib.parse.urlsplit(newurl).scheme.lower()
            except ValueError:
                raise Unusable(f"redirected to {_printable(where)}, not a valid URL",
                               transient=False) from None
            if scheme not in ("http", "https"):
                raise Unusable(f"redirected to {_printable(newurl)} (only http(s) URLs are "
                               "followed)", transient=False)
            if scheme == "https" and not has_https():
                raise Unusable(f"redirected to {_printable(newurl)}, but this Python has no "
                               "TLS (an initramfs made with dmoverlay_https=no)",
                               transient=False)
            visited: dict[str, int] = getattr(req, "redirect_dict", {})
            if visited.get(newurl, 0) >= self.max_repeats \
                    or len(visited) >= self.max_redirections:
                raise Unusable(f"redirected in a loop (at {_printable(newurl)})",
                               transient=False)
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    return HttpRedirects()


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


def _reader(response: HTTPResponse, view: memoryview) -> Callable[[int], int]:
    """`read(n)`: up to n bytes of the body into view[:n], their count (0
    at the end): what one read of the socket brings, so that a trickle
    still meets the deadline check.  A plain body is read into the view
    from the response's buffered socket; a chunked one through read1."""
    fp = getattr(response, "fp", None)
    readinto1 = getattr(fp, "readinto1", None)
    if not response.chunked and readinto1 is not None:
        def read_plain(n: int) -> int:
            return int(readinto1(view[:n]))
        return read_plain

    def read_chunked(n: int) -> int:
        chunk = response.read1(n)
        view[:len(chunk)] = chunk
        return len(chunk)
    return read_chunked


def _sha256() -> hashlib._Hash:
    import hashlib  # here: only a download with a checksum needs it

    return hashlib.sha256()


def _content_length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)
