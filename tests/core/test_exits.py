"""How an expected failure is said: one error line, one hint line."""

from __future__ import annotations

import re

from dmoverlay.core.errors import SourceError
from dmoverlay.core.exits import LINE_MOST, report


def _said(exc: BaseException) -> tuple[int, list[str]]:
    lines: list[str] = []
    return report(exc, lines.append), lines


def test_an_error_is_its_line_and_its_hint() -> None:
    assert _said(SourceError("cannot read x: gone", hint="look")) == (
        1, ["error: cannot read x: gone", "hint: look"])


def test_a_line_up_to_the_most_is_kept_whole() -> None:
    message = "m" * (LINE_MOST - len("error: "))
    assert _said(SourceError(message))[1] == [f"error: {message}"]


def test_a_longer_line_keeps_its_ends_and_says_how_much_was_left_out() -> None:
    """A path 8,000 bytes long, as a tree 200 levels deep names one."""
    whole = "error: cannot read /top/" + "/".join(["d" * 40] * 200) + ": File name too long"
    code, [line] = _said(SourceError(whole.removeprefix("error: ")))
    assert code == 1 and len(line) <= LINE_MOST
    found = re.fullmatch(r"(.+)\.\.\.\(([0-9]+) characters\)\.\.\.(.+)", line)
    assert found is not None, line
    head, left_out, tail = found[1], int(found[2]), found[3]
    assert whole.startswith(head) and whole.endswith(tail)
    assert len(head) + left_out + len(tail) == len(whole)
    assert head.startswith("error: cannot read /top/") and tail.endswith(": File name too long")
    assert _said(SourceError("m" * (LINE_MOST - len("error: ") + 1)))[1][0] != "error: " + "m" * (
        LINE_MOST - len("error: ") + 1)
