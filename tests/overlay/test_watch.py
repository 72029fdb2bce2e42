"""Watching the COW fill: what each reading says given what was said (pure),
the loop around it against a fake reading source (the kernel's answer is
what the fake stands for), and how a line reaches the journal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay import watch as w
from dmoverlay.overlay.state import Step, StepKind
from dmoverlay.overlay.status import Status
from dmoverlay.overlay.watch import Event, Levels, Priority, Reading, WatchState
from tests.overlay.statefiles import make_state

LEVELS = Levels((80.0, 90.0, 95.0), rearm=5.0)


def _fill(percent: float) -> Reading:
    return Reading(percent, used=int(percent * MiB), free=int((100 - percent) * MiB))


def _run(*readings: Reading, levels: Levels = LEVELS) -> list[list[Event]]:
    """The events of each reading in turn, from a fresh watch."""
    state, said = WatchState(), []
    for reading in readings:
        events, state = w.step(levels, state, reading, name="live")
        said.append(events)
    return said


def _kinds(said: list[list[Event]]) -> list[list[tuple[Priority, float | None]]]:
    return [[(e.priority, e.threshold) for e in events] for events in said]


def test_one_line_per_threshold_passed_upward() -> None:
    said = _run(*map(_fill, [10, 79.9, 80, 85, 89, 90.5, 94, 95, 99, 100]))
    assert _kinds(said) == [[], [], [(Priority.WARNING, 80)], [], [], [(Priority.WARNING, 90)],
                            [], [(Priority.CRIT, 95)], [], []]
    assert said[2][0].text == "live: COW 80.0% full, past 80% (80.0 MiB used, 20.0 MiB left)"
    assert said[7][0].text.endswith(": writes fail once it is full")


def test_a_jump_past_several_thresholds_is_one_line_naming_the_highest() -> None:
    assert _kinds(_run(_fill(50), _fill(96))) == [[], [(Priority.CRIT, 95)]]
    assert _kinds(_run(_fill(91))) == [[(Priority.WARNING, 90)]]


def test_a_threshold_warns_again_only_after_the_fill_fell_below_it_by_rearm() -> None:
    said = _run(*map(_fill, [81, 78, 81, 75.5, 81, 74.9, 76, 81]))
    assert _kinds(said) == [[(Priority.WARNING, 80)], [], [], [], [],
                            [(Priority.NOTICE, 80)], [], [(Priority.WARNING, 80)]]
    assert said[5][0].text == "live: COW back to 74.9% full, below 80% again"


def test_a_fall_rearms_only_the_thresholds_left_far_enough_behind() -> None:
    said = _run(*map(_fill, [96, 89, 84, 91, 96]))
    assert _kinds(said) == [[(Priority.CRIT, 95)], [(Priority.NOTICE, 95)],
                            [(Priority.NOTICE, 90)], [(Priority.WARNING, 90)],
                            [(Priority.CRIT, 95)]]


def test_a_failed_snapshot_is_said_once_at_the_highest_priority() -> None:
    invalid = Reading(state="invalid")
    said = _run(_fill(85), invalid, invalid, Reading(state="overflow"))
    assert _kinds(said) == [[(Priority.WARNING, 80)], [(Priority.EMERG, None)], [], []]
    assert said[1][0].text == "live: the COW is invalid: every read and write on it fails"
    pool = _run(Reading(state="full"), _fill(50))  # a thin pool given room again
    assert [[e.text for e in events] for events in pool] == [
        ["live: the COW is full: writes on it fail"], ["live: the COW is active again"]]


def test_gone_ends_the_watch_and_a_failed_look_is_said_when_it_fails_again() -> None:
    events, state = w.step(LEVELS, WatchState(), Reading(gone=True), name="live")
    assert state.done and [e.priority for e in events] == [Priority.NOTICE]
    bad = Reading(error="dmsetup failed")
    said = _run(_fill(10), bad, bad, bad, _fill(10), bad)
    assert _kinds(said) == [[], [], [(Priority.WARNING, None)], [], [], []]
    assert said[2][0].text == "live: cannot read the COW's fill: dmsetup failed"
    # no look has worked yet: no teardown under way explains it, said at once
    assert _kinds(_run(bad, bad, _fill(10))) == [[(Priority.WARNING, None)], [], []]


@given(st.lists(st.floats(0, 100), max_size=40),
       st.lists(st.integers(1, 100), min_size=1, max_size=5, unique=True).map(sorted),
       st.floats(0.5, 20))
def test_no_threshold_warns_twice_without_being_rearmed(
        fills: list[float], thresholds: list[int], rearm: float) -> None:
    """Whatever the fills: an upward line only for a threshold reached and
    armed (never passed, or re-armed by a note since); at most one line per
    look; between notes, the thresholds named go up."""
    levels = Levels(tuple(map(float, thresholds)), rearm=rearm)
    armed = set(levels.thresholds)
    last_up = 0.0
    for fill, events in zip(fills, _run(*map(_fill, fills), levels=levels), strict=True):
        assert len(events) <= 1
        for event in events:
            assert event.threshold is not None
            if event.priority is Priority.NOTICE:
                assert fill < event.threshold - rearm
                armed |= {t for t in levels.thresholds if t >= event.threshold}
                last_up = 0.0
                continue
            assert event.threshold in armed and fill >= event.threshold > last_up
            assert (event.priority is Priority.CRIT) == (event.threshold == thresholds[-1])
            armed -= {t for t in levels.thresholds if t <= event.threshold}
            last_up = event.threshold
        if not events:  # nothing said: nothing armed was reached
            assert not any(fill >= t for t in armed)


@pytest.mark.parametrize(("text", "words"), [
    ("90,80", "80 after 90: the thresholds must increase"),
    ("80,80", "80 after 80"),
    ("0,50", "0 is out of 1..100"),
    ("80,101", "101 is out of 1..100"),
    ("80,x", "'x' is not a percentage"),
    ("80,,90", "'' is not a percentage"),
    ("nan", "'nan' is not a percentage"),
    ("\u0668\u0660", "is not a percentage"),  # Arabic-Indic 80: float() takes it
])
def test_bad_thresholds(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        w.parse_thresholds(text)


def test_thresholds() -> None:
    assert w.parse_thresholds("80, 90,95") == (80.0, 90.0, 95.0)
    assert w.parse_thresholds("1,97.5,100") == (1.0, 97.5, 100.0)


def test_the_loop_says_each_event_and_ends_when_the_overlay_is_gone() -> None:
    """The reading source stands for the kernel: it fills, fails once, the
    snapshot overflows, the overlay is torn down."""
    readings = iter([_fill(70), _fill(85), Reading(error="x"), _fill(96),
                     Reading(state="overflow"), Reading(state="overflow"), Reading(gone=True)])
    said: list[Event] = []
    slept: list[float] = []
    w.watch(lambda: next(readings), said.append, name="live", levels=LEVELS, interval=0,
            sleep=slept.append)
    assert [(e.priority, e.threshold) for e in said] == [
        (Priority.WARNING, 80), (Priority.CRIT, 95), (Priority.EMERG, None),
        (Priority.NOTICE, None)]
    assert said[-1].text == "live: no overlay (torn down, or never set up): the watch ends"
    assert slept == [0] * 6  # between looks, not after the last
    assert next(readings, None) is None


def test_reading_a_real_state_dir(tmp_path: Path) -> None:
    """No state: gone.  A state recorded, but no device behind it (this host
    has no device-mapper, as after a teardown cut short): a failed look."""
    assert w.read_fill(tmp_path / "none", "live") == Reading(gone=True)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    make_state(tmp_path, Step(StepKind.DM, "live-rw")).save(state_dir / "live.json")
    reading = w.read_fill(state_dir, "live")
    assert reading.error and not reading.gone


def test_the_fill_counts_the_ram_left_under_the_cow() -> None:
    roomy = Status("live", "/", "active", used=GiB, total=4 * GiB, ram_free=8 * GiB)
    assert roomy.fill == roomy.percent == 25.0
    tight = Status("live", "/", "active", used=GiB, total=4 * GiB, ram_free=GiB)
    assert tight.fill == 50.0  # writes fail after one more GiB, not three
    assert Status("live", "/", "invalid", used=0, total=0, ram_free=None).fill == 100.0


def test_journal_lines_only_when_stderr_is_the_journals_stream(tmp_path: Path) -> None:
    f = tmp_path / "stream"
    f.write_text("")
    here = os.stat(f)
    ours = f"{here.st_dev}:{here.st_ino}"
    assert w.to_journal({"JOURNAL_STREAM": ours}, here)
    assert not w.to_journal({"JOURNAL_STREAM": f"{here.st_dev}:{here.st_ino + 1}"}, here)
    assert not w.to_journal({}, here)
    assert not w.to_journal({"JOURNAL_STREAM": "junk"}, here)
    assert not w.to_journal({"JOURNAL_STREAM": ours}, None)
    event = Event(Priority.WARNING, "live: COW 81.0% full")
    assert w.line(event, journal=True) == "<4>live: COW 81.0% full"
    assert w.line(event, journal=False) == "warning: live: COW 81.0% full"
    assert w.line(Event(Priority.EMERG, "x"), journal=True) == "<0>x"
    assert w.line(Event(Priority.WARNING, "a\nb"), journal=True) == "<4>a b"


def test_a_status_line_no_parser_expects_is_a_failed_look(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel answers is input: a pool's status line of a form the
    parser does not know fails the look, it does not end the watch."""
    def odd(state_dir: Path, name: str) -> Status:
        raise ValueError("not a thin-pool status line: 'x'")

    monkeypatch.setattr(w, "status", odd)
    assert w.read_fill(Path("/none"), "live") == Reading(error="not a thin-pool status line: 'x'")
