"""The download's decisions, without a network: what to ask for, which
answers continue the bytes held, where and when to try again."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.apply.readers.fetchplan import (
    Answer,
    Failures,
    Held,
    Next,
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

V1 = '"v1"'


def test_what_is_asked() -> None:
    assert request_headers(Held()) == {}
    assert request_headers(Held(10, 100, V1)) == {"Range": "bytes=10-", "If-Range": V1}
    assert request_headers(Held(10, None, V1)) == {"Range": "bytes=10-", "If-Range": V1}
    # nothing to tell the version by: the rest could be of another file
    assert request_headers(Held(10, 100, None)) == {}
    assert request_headers(Held(100, 100, V1)) == {}


def test_validators() -> None:
    assert validator(V1, "Tue, 01 Dec 2026 10:00:00 GMT") == V1
    assert validator('W/"v1"', "Tue, 01 Dec 2026 10:00:00 GMT") == \
        "Tue, 01 Dec 2026 10:00:00 GMT"  # a weak ETag may not go in If-Range
    assert validator("v1", None) is None  # not quoted: not an ETag
    assert validator(None, "a\nb") is None
    assert validator(None, None) is None


def test_a_change_is_told_by_the_kind_of_validator_held() -> None:
    assert changed(Held(5, None, V1), '"v2"', None)
    assert not changed(Held(5, None, V1), V1, "whenever")
    assert not changed(Held(5, None, V1), None, "whenever")  # nothing to compare
    assert changed(Held(5, None, "Mon"), '"v2"', "Tue")
    assert not changed(Held(5, None, None), '"v2"', "Tue")


def test_a_200_is_the_whole_file_whatever_was_asked() -> None:
    for held in (Held(), Held(10, 100, V1)):
        assert judge(held, 200, content_range=None, content_length=100) == \
            Answer(Take.RESTART, 100, 100)
    assert judge(Held(), 200, content_range=None, content_length=None) == \
        Answer(Take.RESTART, None, None)


def test_a_206_that_continues_the_bytes_held() -> None:
    held = Held(10, 100, V1)
    assert judge(held, 206, content_range="bytes 10-99/100", content_length=90) == \
        Answer(Take.APPEND, 90, 100)
    assert judge(Held(10, None, V1), 206, content_range="bytes 10-99/*",
                 content_length=None) == Answer(Take.APPEND, 90, None)


@pytest.mark.parametrize(("held", "content_range", "length"), [
    (Held(10, 100, V1), "bytes 0-99/100", 100),  # from the start
    (Held(10, 100, V1), "bytes 11-99/100", 89),  # a gap
    (Held(10, 100, V1), "bytes 10-99/200", 90),  # another size: another file
    (Held(10, 100, V1), "bytes 10-100/100", 91),  # past the end
    (Held(10, 100, V1), "bytes 10-99/100", 50),  # a length that disagrees
    (Held(10, 100, V1), "bytes 10-5/100", None),
    (Held(10, 100, V1), None, 90),
    (Held(10, 100, V1), "items 10-99/100", 90),
    (Held(), "bytes 0-99/100", 100),  # not asked for
])
def test_a_206_that_does_not_continue_them(held: Held, content_range: str | None,
                                           length: int | None) -> None:
    with pytest.raises(Unusable) as info:
        judge(held, 206, content_range=content_range, content_length=length)
    assert info.value.transient


@pytest.mark.parametrize(("status", "transient"), [
    (404, False), (403, False), (410, False), (503, True), (500, True), (429, True),
    (408, True), (301, False)])
def test_errors(status: int, transient: bool) -> None:
    with pytest.raises(Unusable, match=f"HTTP {status}") as info:
        judge(Held(), status, content_range=None, content_length=None)
    assert info.value.transient is transient


def test_416_on_a_resume_asks_again_from_the_start() -> None:
    with pytest.raises(Unusable, match="416") as info:
        judge(Held(10, 100, V1), 416, content_range=None, content_length=None)
    assert info.value.transient


RETRY = Retry(tries=4, first_delay=1.0, max_delay=4.0)


def run_of_failures(mirrors: int, *, transient: bool = True,
                    jitter: float = 1.0) -> list[Next]:
    """The tries after each failure, none gaining a byte, until it gives up."""
    failures, mirror, steps = Failures(), 0, list[Next]()
    while True:
        failures = after_failure(failures, mirror=mirror, progressed=False, transient=transient)
        step = next_try(failures, mirror=mirror, mirrors=mirrors, retry=RETRY, jitter=jitter)
        if step is None:
            return steps
        steps.append(step)
        mirror = step.mirror


def test_one_url_backs_off_doubling_to_the_cap() -> None:
    assert run_of_failures(1) == [Next(0, 1.0), Next(0, 2.0), Next(0, 4.0)]
    assert [s.delay for s in run_of_failures(1, jitter=0.0)] == [0.5, 1.0, 2.0]


def test_mirrors_are_tried_at_once_then_with_delays() -> None:
    assert run_of_failures(3) == [Next(1, 0.0), Next(2, 0.0), Next(0, 1.0), Next(1, 2.0),
                                  Next(2, 4.0)]


def test_a_mirror_that_answered_for_good_is_struck_off() -> None:
    assert run_of_failures(1, transient=False) == []
    assert run_of_failures(3, transient=False) == [Next(1, 0.0), Next(2, 0.0)]


def test_a_failure_that_gained_bytes_stays_on_its_mirror() -> None:
    failures = after_failure(Failures(streak=3), mirror=1, progressed=True, transient=True)
    assert failures.streak == 0
    assert next_try(failures, mirror=1, mirrors=3, retry=RETRY, jitter=0.0) == Next(1, 0.5)


@given(st.integers(1, 6), st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60),
       st.floats(0, 0.999))
def test_the_tries_are_bounded(mirrors: int, outcomes: list[tuple[bool, bool]],
                               jitter: float) -> None:
    """Whatever fails how: no delay past the cap, no struck mirror tried
    again, and at most tries + mirrors - 1 tries in a row without a byte."""
    failures, mirror, without = Failures(), 0, 0
    for progressed, transient in outcomes:
        failures = after_failure(failures, mirror=mirror, progressed=progressed,
                                 transient=transient)
        without = 0 if progressed else without + 1
        step = next_try(failures, mirror=mirror, mirrors=mirrors, retry=RETRY, jitter=jitter)
        if step is None:
            return
        assert without < RETRY.tries + mirrors - 1
        assert 0 <= step.delay <= RETRY.max_delay
        assert step.mirror not in failures.struck and 0 <= step.mirror < mirrors
        mirror = step.mirror
