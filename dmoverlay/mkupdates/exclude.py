"""`mkupdates --exclude PATTERN`: names an update leaves as the target has
them (a live system's own churn: /var/log, /var/cache, /etc/machine-id).
Pure: patterns and two sides in, the sides without them out, and the
refusal of an exclusion the update could not keep.

A pattern is matched name by name (fnmatch's `*`, `?` and `[...]`, within
one name): with a `/` in it, from the top of the tree (`var/log`,
`/var/cache/*`); without, at any depth (`*.pyc`).  What a pattern matches
is left out with all it holds.  An exclusion is a promise that the target
keeps what it has there, so it is refused where the update would break it
all the same: a directory above it made again or removed (apply removes
what such a directory holds).  A hard link between an excluded name and a
file the update writes is split: the one keeps what it held, the other
takes NEW's (one inode cannot hold both)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from dmoverlay.core.errors import UsageError
from dmoverlay.mkupdates.diff import Change, Op
from dmoverlay.mkupdates.listing import Entry


@dataclass(frozen=True)
class Pattern:
    text: str  # as given
    names: tuple[str, ...]  # one pattern a name
    anchored: bool  # from the top (it had a "/"), else at any depth

    def matches(self, parts: Sequence[str]) -> bool:
        """Whether this pattern names the path `parts` itself (not an
        ancestor of it)."""
        n = len(self.names)
        if self.anchored and len(parts) != n:
            return False
        if len(parts) < n:
            return False
        tail = parts[len(parts) - n:]
        return all(fnmatchcase(p, q) for p, q in zip(tail, self.names, strict=True))


def parse(text: str) -> Pattern:
    """A pattern as --exclude gives it; UsageError for one that names
    nothing or could never match a name apply takes."""
    body = text.strip("/")
    names = tuple(body.split("/")) if body else ()
    if not names or "" in names or any(n in (".", "..") for n in names):
        raise UsageError(f"--exclude {text!r}: not a path in the tree",
                         hint="give names within the tree, such as var/log or *.pyc")
    if "**" in text:
        raise UsageError(f"--exclude {text!r}: ** is not a pattern here",
                         hint="* matches within one name; what a pattern matches is "
                              "left out with all it holds")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise UsageError(f"--exclude {text!r}: a control character")
    return Pattern(text, names, "/" in text)


class Excluded:
    """The names the patterns leave out, with the pattern that does."""

    def __init__(self, patterns: Iterable[Pattern]) -> None:
        self.patterns = tuple(patterns)
        self._seen: dict[str, Pattern | None] = {}

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def by(self, name: str) -> Pattern | None:
        """The pattern that leaves `name` out (it, or a directory above it),
        or None."""
        chain = []  # `name` and its ancestors not yet judged, deepest first
        while name and name not in self._seen:
            chain.append(name)
            name = name.rpartition("/")[0]
        found = self._seen.get(name) if name else None
        for each in reversed(chain):  # from the top down: no recursion, however deep
            if found is None:
                parts = each.split("/")
                found = next((p for p in self.patterns if p.matches(parts)), None)
            self._seen[each] = found
        return found

    def without(self, side: Mapping[str, Entry]) -> dict[str, Entry]:
        return {name: e for name, e in side.items() if self.by(name) is None}


def check_kept(excluded: Excluded, changes: Sequence[Change], old: Mapping[str, Entry],
               new: Mapping[str, Entry]) -> None:
    """UsageError if the update (`changes`, made from the sides without
    what is excluded) would remove an excluded name of the target all the
    same.  `old` and `new`: the whole sides."""
    whiteouts = {c.name for c in changes if c.op is Op.WHITEOUT}
    for name in sorted(old):
        pattern = excluded.by(name)
        if pattern is None:
            continue
        parent = name.rpartition("/")[0]
        while parent and parent not in whiteouts:
            parent = parent.rpartition("/")[0]
        if parent:
            made = parent in new
            raise UsageError(
                f"--exclude {pattern.text}: {name} would be removed all the same: the "
                f"update {'makes ' + parent + ' again' if made else 'removes ' + parent}"
                f"{' (its type, mode, owner or xattrs changed)' if made else ''}",
                hint=f"exclude {parent} too, or do not exclude {pattern.text}")
