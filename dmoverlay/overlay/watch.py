"""Watching an overlay's COW fill in the booted system, for the journal: one
warning each time the fill passes a threshold upward (critical at the last),
a note when it falls back, the snapshot's failure once at the highest
priority, and an end when the overlay is gone.

What to say is one pure step, (state, reading) -> (events, state), tested
without a kernel; `watch` is the thin loop that reads the fill and writes
the lines.  A COW only fills (a thin pool gives RAM back on fstrim), so a
passed threshold is re-armed only once the fill is REARM_POINTS below it:
a fill hovering at a threshold warns once, not at every look."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

from dmoverlay.core.errors import DmoverlayError, NoOverlay, UsageError
from dmoverlay.core.sizes import format_size
from dmoverlay.overlay.status import status

DEFAULT_THRESHOLDS = (80.0, 90.0, 95.0)
REARM_POINTS = 5.0
# a reading fails once while a teardown is under way (devices gone, the
# state not yet): said only when it fails again at the next look (at once
# when no look has worked yet: no teardown explains that)
FAILURES_SAID = 2
# the states in which writes fail: a snapshot's (core.cow.State) or a thin pool's
BROKEN = {"invalid": "every read and write on it fails", "overflow": "writes on it fail",
          "full": "writes on it fail", "failed": "writes on it fail",
          "read-only": "writes on it fail"}


class Priority(IntEnum):
    """syslog's levels, as sd-daemon(3)'s "<N>" prefixes name them."""

    EMERG = 0  # the root under the overlay is unusable: journald tells every terminal
    CRIT = 2
    WARNING = 4
    NOTICE = 5


WORDS = {Priority.EMERG: "emergency", Priority.CRIT: "critical",
         Priority.WARNING: "warning", Priority.NOTICE: "note"}


@dataclass(frozen=True)
class Reading:
    """One look at the overlay: its fill, or why there is none."""

    percent: float = 0.0
    state: str = "active"
    used: int = 0  # bytes
    free: int = 0  # bytes writes can still take: the COW's room, or the RAM left under it
    gone: bool = False  # no overlay of that name: never set up, or torn down
    error: str = ""  # this look failed


@dataclass(frozen=True)
class Event:
    priority: Priority
    text: str
    threshold: float | None = None  # passed upward, or (a note) re-armed


@dataclass(frozen=True)
class WatchState:
    passed: int = 0  # thresholds the fill is past and that are not re-armed
    broken: bool = False  # the failure was said
    failures: int = 0  # looks that failed in a row
    seen: bool = False  # a look has worked
    done: bool = False  # the overlay is gone: the watch ends


@dataclass(frozen=True)
class Levels:
    """The thresholds (%, increasing) and how far below one the fill must
    fall before it warns again."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    rearm: float = REARM_POINTS


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_thresholds(text: str) -> tuple[float, ...]:
    """`80,90,95`: percentages in 1..100, each above the one before."""
    values: list[float] = []
    for item in text.split(","):
        item = item.strip()
        if not _NUMBER.fullmatch(item):
            raise UsageError(f"{item!r} is not a percentage (a number such as 90 or 97.5)")
        value = float(item)
        if not 1 <= value <= 100:
            raise UsageError(f"{item} is out of 1..100")
        if values and value <= values[-1]:
            raise UsageError(f"{item} after {values[-1]:g}: the thresholds must increase")
        values.append(value)
    return tuple(values)


def step(levels: Levels, state: WatchState, reading: Reading, *,
         name: str) -> tuple[list[Event], WatchState]:
    """What one reading says, given what was said before."""
    if reading.gone:
        return [Event(Priority.NOTICE, f"{name}: no overlay (torn down, or never set up): "
                                       "the watch ends")], replace(state, done=True)
    if reading.error:
        return _failed_look(state, reading.error, name)
    state = replace(state, failures=0, seen=True)
    if reading.state in BROKEN:
        if state.broken:
            return [], state
        return [Event(Priority.EMERG, f"{name}: the COW is {reading.state}: "
                                      f"{BROKEN[reading.state]}")], replace(state, broken=True)
    if reading.state != "active":  # merging: no fill to judge
        return [], state
    events = [Event(Priority.NOTICE, f"{name}: the COW is active again")] if state.broken else []
    return [*events, *_fill_events(levels, state.passed, reading, name)], \
        replace(state, broken=False, passed=_passed(levels, state.passed, reading.percent))


def _failed_look(state: WatchState, error: str, name: str) -> tuple[list[Event], WatchState]:
    failures = state.failures + 1
    say = failures == (FAILURES_SAID if state.seen else 1)
    said = [Event(Priority.WARNING, f"{name}: cannot read the COW's fill: {error}")]
    return said if say else [], replace(state, failures=failures)


def _fill_events(levels: Levels, before: int, reading: Reading, name: str) -> list[Event]:
    """A threshold passed upward, or a note that the fill fell back."""
    passed = _passed(levels, before, reading.percent)
    if passed > before:
        return [_passing(levels, passed, reading, name)]
    if passed < before:
        rearmed = levels.thresholds[passed]
        return [Event(Priority.NOTICE, f"{name}: COW back to {reading.percent:.1f}% full, "
                                       f"below {rearmed:g}% again", rearmed)]
    return []


def _passed(levels: Levels, before: int, percent: float) -> int:
    """How many thresholds the fill is past now: those it reaches, and those
    passed before that it has not fallen far enough below to re-arm."""
    reached = sum(1 for t in levels.thresholds if percent >= t)
    if reached >= before:
        return reached
    kept = before
    while kept > reached and percent < levels.thresholds[kept - 1] - levels.rearm:
        kept -= 1
    return kept


def _passing(levels: Levels, passed: int, reading: Reading, name: str) -> Event:
    threshold = levels.thresholds[passed - 1]
    sizes = f"{format_size(reading.used)} used, {format_size(reading.free)} left"
    text = f"{name}: COW {reading.percent:.1f}% full, past {threshold:g}% ({sizes})"
    if passed == len(levels.thresholds):
        return Event(Priority.CRIT, f"{text}: writes fail once it is full", threshold)
    return Event(Priority.WARNING, text, threshold)


def to_journal(env: Mapping[str, str], stderr: os.stat_result | None) -> bool:
    """Is stderr the journal?  systemd names the stream it connected in
    JOURNAL_STREAM (<device>:<inode>); a child whose stderr went elsewhere
    inherits the variable, so the stream is compared, as sd-daemon(3) says."""
    match = re.fullmatch(r"([0-9]+):([0-9]+)", env.get("JOURNAL_STREAM", ""))
    return match is not None and stderr is not None and \
        (stderr.st_dev, stderr.st_ino) == (int(match[1]), int(match[2]))


def line(event: Event, *, journal: bool) -> str:
    """`<4>text` for the journal, which takes the prefix for the priority;
    `warning: text` for people."""
    text = " ".join(event.text.splitlines())  # a second line would lose the priority
    if journal:
        return f"<{int(event.priority)}>{text}"
    return f"{WORDS[event.priority]}: {text}"


def read_fill(state_dir: Path, name: str) -> Reading:
    """One look at the overlay, whatever the kernel answers."""
    try:
        st = status(state_dir, name)
    except NoOverlay:
        return Reading(gone=True)
    except DmoverlayError as exc:
        return Reading(error=exc.message)
    except ValueError as exc:  # a status line of a form no parser expects
        return Reading(error=str(exc))
    except OSError as exc:  # the tmpfs holding the COW file, gone under us
        return Reading(error=f"{exc.filename or ''}: {exc.strerror}")
    return Reading(st.fill, st.state, st.used, st.free)


def watch(read: Callable[[], Reading], emit: Callable[[Event], None], *, name: str,
          levels: Levels = Levels(), interval: float = 10.0,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Look every `interval` seconds until the overlay is gone."""
    state = WatchState()
    while True:
        events, state = step(levels, state, read(), name=name)
        for event in events:
            emit(event)
        if state.done:
            return
        sleep(interval)
