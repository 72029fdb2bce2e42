"""What an update must hold to turn one tree into another: pure, two
listings in, a list of changes out, so that every case is tested without a
disk.

apply's rules shape it.  Existing directories keep their metadata under
apply, so a directory whose mode, owner or xattrs changed is removed and
made again, with all it holds; a directory never replaces anything but a
directory, and is replaced by nothing without a whiteout, so a type change
to or from a directory whites the old entry out first.  A file written by
an update is a new inode: a hardlink group is written whole, or not at
all.  Times are not compared (every directory's mtime moves as its entries
do); what is written carries NEW's times."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from dmoverlay.core.entries import Kind, Member
from dmoverlay.mkupdates.listing import Entry

WHITEOUT = ".wh."


class Op(StrEnum):
    PUT = "put"  # write NEW's entry at the name
    WHITEOUT = "whiteout"  # remove what OLD has at the name (before a PUT there)


@dataclass(frozen=True, order=True)
class Change:
    name: str
    op: Op


def sort_key(name: str) -> tuple[str, ...]:
    """Parents before children, siblings by name: a directory walk's order."""
    return tuple(name.split("/"))


def _order(change: Change) -> tuple[tuple[str, ...], int]:
    return sort_key(change.name), 0 if change.op is Op.WHITEOUT else 1


def normalized(side: Mapping[str, Entry], *, all_root: bool,
               no_xattrs: bool) -> dict[str, Entry]:
    """A side as it is to be compared and written: owners made root's, xattrs
    left out, when asked."""
    if not all_root and not no_xattrs:
        return dict(side)
    out = {}
    for name, e in side.items():
        m = e.member
        if all_root:
            m = replace(m, uid=0, gid=0)
        if no_xattrs:
            m = replace(m, xattrs=())
        out[name] = replace(e, member=m)
    return out


def with_parents(side: Mapping[str, Entry]) -> dict[str, Entry]:
    """A side with the directories its names imply (an archive may leave
    them out), as apply makes them: 0755, root's."""
    out = dict(side)
    for name in side:
        parent = name.rpartition("/")[0]
        while parent and parent not in out:
            out[parent] = Entry(Member(parent, Kind.DIR, 0o755))
            parent = parent.rpartition("/")[0]
    return out


def groups(side: Mapping[str, Entry]) -> dict[str, frozenset[str]]:
    """Each file's hardlink group, by name: the names sharing its inode."""
    by_first: dict[str, set[str]] = {}
    for name, e in side.items():
        if e.kind is Kind.FILE:
            by_first.setdefault(e.group, set()).add(name)
    frozen = {first: frozenset(names) for first, names in by_first.items()}
    return {name: frozen[e.group] for name, e in side.items() if e.kind is Kind.FILE}


def _same_metadata(a: Member, b: Member) -> bool:
    if (a.uid, a.gid, a.xattrs) != (b.uid, b.gid, b.xattrs):
        return False
    if a.kind is Kind.SYMLINK:  # a link's mode is always 0777
        return a.target == b.target
    return a.mode == b.mode and a.rdev == b.rdev


class _Difference:
    def __init__(self, old: Mapping[str, Entry], new: Mapping[str, Entry]) -> None:
        self.old, self.new = old, new
        self.old_groups, self.new_groups = groups(old), groups(new)
        self.changes: list[Change] = []
        self.put: set[str] = set()
        self.fresh: set[str] = set()  # directories the update makes empty

    def same(self, name: str, o: Entry, n: Entry) -> bool:
        if o.kind is not n.kind or not _same_metadata(o.member, n.member):
            return False
        if n.kind is not Kind.FILE:
            return True
        kept = self.old_groups[name] & self.new.keys()  # names NEW removes leave the group
        return o.digest == n.digest and kept == self.new_groups[name]

    def visit(self, name: str) -> None:
        n, o = self.new[name], self.old.get(name)
        parent = name.rpartition("/")[0]
        if o is not None and parent not in self.fresh:
            if self.same(name, o, n):
                return
            if Kind.DIR not in (o.kind, n.kind):
                self._put(name)  # a file or link replaces a file or link
                return
            self.changes.append(Change(name, Op.WHITEOUT))
        self._put(name)
        if n.kind is Kind.DIR:
            self.fresh.add(name)

    def _put(self, name: str) -> None:
        if name not in self.put:
            self.put.add(name)
            self.changes.append(Change(name, Op.PUT))

    def whole_groups(self) -> None:
        """A group written in part would be split: write the rest too (each
        was the same in OLD, a file, so it is replaced in place)."""
        for name in list(self.put):
            for other in self.new_groups.get(name, ()):
                self._put(other)

    def removed(self) -> None:
        for name in self.old.keys() - self.new.keys():
            parent = name.rpartition("/")[0]
            kept = self.new.get(parent)
            if not parent or (kept is not None and kept.kind is Kind.DIR
                              and parent not in self.fresh):
                self.changes.append(Change(name, Op.WHITEOUT))
            # else a directory above it goes, or is made again empty


def difference(old: Mapping[str, Entry], new: Mapping[str, Entry]) -> list[Change]:
    """The changes that make OLD into NEW, in the order an update holds them:
    parents before children, a whiteout just before what replaces it.  A
    tree on its own is the difference from nothing."""
    d = _Difference(with_parents(old), with_parents(new))
    for name in sorted(d.new, key=sort_key):
        d.visit(name)
    d.whole_groups()
    d.removed()
    return sorted(d.changes, key=_order)


def whiteout_name(name: str) -> str:
    parent, _, base = name.rpartition("/")
    return f"{parent}/{WHITEOUT}{base}" if parent else f"{WHITEOUT}{base}"


def clamp(mtime_ns: int, epoch: int | None) -> int:
    """SOURCE_DATE_EPOCH's rule: nothing newer than the epoch."""
    return mtime_ns if epoch is None else min(mtime_ns, epoch * 10**9)


def members(changes: Iterable[Change], new: Mapping[str, Entry], *,
            epoch: int | None) -> list[Member]:
    """The update's members for the changes: a whiteout is an empty file
    named `.wh.NAME`; the first name of a hardlink group written is the
    file, the others link to it."""
    out: list[Member] = []
    first_of: dict[str, str] = {}  # group -> the name written as the file
    for c in changes:
        if c.op is Op.WHITEOUT:
            out.append(Member(whiteout_name(c.name), Kind.FILE, 0o644,
                              mtime_ns=(epoch or 0) * 10**9))
            continue
        e = new[c.name]
        m = replace(e.member, mtime_ns=clamp(e.member.mtime_ns, epoch))
        if e.kind is Kind.FILE:
            first = first_of.setdefault(e.group, c.name)
            if first != c.name:
                m = replace(m, kind=Kind.HARDLINK, size=0, target=first)
        out.append(m)
    return out
