"""What a download asks next: pure decisions, apart from the I/O in
download.py, so each rule has its own tests.

A dropped connection is resumed with a Range request, guarded by If-Range
and the validator (a strong ETag, else Last-Modified) of the bytes already
held, so that a file changed on the server is fetched again from its start
instead of spliced.  An answer is judged by what it says it holds (206
with the Content-Range asked for, or 200: the whole file, from the start),
never by what was asked.  Failures are retried a bounded number of times,
on the next mirror first, then after a jittered, doubling delay, so that
many machines dropped by one server do not come back at the same instant."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# answers that a later try may not repeat: the server was busy or timed out
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Retry:
    """How hard a download tries.  `tries`: failures in a row that gained
    no byte, past one per mirror, before it gives up; the delays in seconds
    (before a retry on a mirror already tried in this run of failures)
    double from `first_delay` up to `max_delay`, each drawn between its half
    and its whole."""

    tries: int = 5
    first_delay: float = 0.5
    max_delay: float = 8.0


RETRY = Retry()


@dataclass(frozen=True)
class Held:
    """The bytes a partial download holds: `size` of them, of a file of
    `total` bytes (None: not known), whose version is `validator` (an ETag
    or Last-Modified value, for If-Range; None: none that can be trusted)."""

    size: int = 0
    total: int | None = None
    validator: str | None = None


def request_headers(held: Held) -> dict[str, str]:
    """The headers that ask for what is still missing: the rest, if the
    bytes held can be continued safely, else the whole file."""
    if not can_resume(held):
        return {}
    return {"Range": f"bytes={held.size}-", "If-Range": str(held.validator)}


def can_resume(held: Held) -> bool:
    """Without a validator, a server could send the rest of another
    version of the file: better to start again."""
    return held.size > 0 and held.validator is not None and \
        (held.total is None or held.size < held.total)


def validator(etag: str | None, last_modified: str | None) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (a weak
    ETag, W/"...", is not allowed there)."""
    if etag and not etag.startswith("W/") and etag.startswith('"') and etag.endswith('"'):
        return etag
    if last_modified and last_modified.isprintable():
        return last_modified
    return None


def changed(held: Held, etag: str | None, last_modified: str | None) -> bool:
    """Whether a part sent to continue `held` says it is of another version
    of the file (a server may ignore If-Range and honour Range): judged by
    the kind of validator held, when the part carries one."""
    if held.validator is None:
        return False
    theirs = etag if held.validator.startswith('"') else last_modified
    return theirs is not None and theirs != held.validator


class Take(Enum):
    """What to do with a body: add it to the bytes held, or replace them."""

    APPEND = "append"
    RESTART = "restart"


@dataclass(frozen=True)
class Answer:
    """An answer judged usable: where its body goes, how long it is (None:
    until the connection ends), the file's whole size (None: not known)."""

    take: Take
    length: int | None
    total: int | None


class Unusable(Exception):
    """An answer that cannot be used: `why`, in a few words; `transient`
    when the same request may succeed later (or on another mirror)."""

    def __init__(self, why: str, *, transient: bool) -> None:
        super().__init__(why)
        self.why = why
        self.transient = transient


def judge(held: Held, status: int, *, content_range: str | None,
          content_length: int | None) -> Answer:
    """The answer to request_headers(held), or Unusable.  A 200 holds the
    whole file, whatever was asked (a server that ignores Range, or a file
    that changed since: If-Range); a 206 must continue exactly the bytes
    held, in the same file."""
    if status == 200:
        return Answer(Take.RESTART, content_length, content_length)
    if status == 206:
        if not can_resume(held):
            raise Unusable("a part of the file (206) sent for the whole", transient=True)
        return _judge_part(held, content_range, content_length)
    if status == 416 and can_resume(held):  # the file shrank: from the start
        raise Unusable("the range asked for is past the file's end (416)", transient=True)
    raise Unusable(f"HTTP {status}", transient=status in _TRANSIENT_STATUS)


def _judge_part(held: Held, content_range: str | None, content_length: int | None) -> Answer:
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is None:
        raise Unusable(f"a 206 whose Content-Range {content_range!r} is not bytes N-M/SIZE",
                       transient=True)
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    length = last - first + 1
    if first != held.size or last < first or (total is not None and last >= total) \
            or (held.total is not None and total != held.total) \
            or (content_length is not None and content_length != length):
        raise Unusable(f"a 206 with bytes {first}-{last}/{match[3]} for bytes={held.size}- of "
                       f"{held.total if held.total is not None else '*'}", transient=True)
    return Answer(Take.APPEND, length, total if total is not None else held.total)


@dataclass(frozen=True)
class Failures:
    """The run of failures so far: how many in a row gained no byte, and
    the mirrors struck off for good (they answered what will not change)."""

    streak: int = 0
    struck: frozenset[int] = frozenset()


def after_failure(failures: Failures, *, mirror: int, progressed: bool,
                  transient: bool) -> Failures:
    """The run of failures once `mirror` failed (having gained bytes, or
    not; for a reason that may pass, or not)."""
    struck = failures.struck if transient else failures.struck | {mirror}
    return Failures(0 if progressed else failures.streak + 1, struck)


@dataclass(frozen=True)
class Next:
    """The next try: on which mirror, after how many seconds."""

    mirror: int
    delay: float


def next_try(failures: Failures, *, mirror: int, mirrors: int, retry: Retry,
             jitter: float) -> Next | None:
    """Where and when to try again after a failure on `mirror`, or None to
    give up.  `jitter` in [0, 1) spreads the delays.  A failure that gained
    bytes retries the same mirror (it was serving); one that gained none
    moves on to the next mirror not struck off, at once while the run of
    failures has not been round them all, then after a delay."""
    live = [m for m in range(mirrors) if m not in failures.struck]
    if not live or failures.streak >= retry.tries + mirrors - 1:
        return None
    if failures.streak == 0 and mirror in live:
        return Next(mirror, _spread(retry.first_delay, jitter))
    later = [m for m in live if m > mirror] or live
    if failures.streak < mirrors and later[0] != mirror:  # the first round
        return Next(later[0], 0.0)
    doubling = max(0, failures.streak - mirrors)
    return Next(later[0], _spread(min(retry.max_delay, retry.first_delay * 2 ** doubling),
                                  jitter))


def _spread(delay: float, jitter: float) -> float:
    return delay / 2 + delay / 2 * jitter
