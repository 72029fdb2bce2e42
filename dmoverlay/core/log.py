"""Progress for people: nested, timed step lines on stderr, and a percentage
line for long steps when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
quiet = False


def info(message: str) -> None:
    if not quiet:
        print(f"{'  ' * _depth}{message}", file=sys.stderr)


def warning(message: str) -> None:
    """Something the user must know of (shown even with --quiet)."""
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def step(title: str) -> Iterator[None]:
    """`==> title` ... `    title: 1.2 s`, indented by nesting."""
    global _depth
    info(f"==> {title}")
    start = time.monotonic()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    info(f"    done in {time.monotonic() - start:.1f} s")


class Percent:
    """Redraws `    label  42%` in place; silent when stderr is not a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown = not quiet and sys.stderr.isatty()

    def __call__(self, percent: int) -> None:
        if self.shown:
            print(f"\r{'  ' * (_depth + 1)}{self.label} {percent:3d}%", end="", file=sys.stderr)
            if percent >= 100:
                print(file=sys.stderr)
