"""An update judged as apply will judge it, before it is written: apply's
own planner, run over the update's members against OLD (or against an
empty root, for an update made from a tree), in the order apply will read
them.  So mkupdates refuses exactly what apply would refuse (names,
device nodes, setuid files, xattrs by apply's policy, a whiteout after the
entry it removes...), with apply's words, and no rule is written twice.

`ListingTree` is the planner's view of a root, read from a listing rather
than a disk: pure, so the check needs no tree on disk, and OLD may be an
archive."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping

from dmoverlay.apply.plan import RUN, Options, Plan, Refusal, Where, make_plan
from dmoverlay.core.entries import Kind, Member
from dmoverlay.mkupdates.diff import WHITEOUT
from dmoverlay.mkupdates.listing import Entry


class ListingTree:
    """The planner's `Tree` over a listing: the live /run is the listing's
    top-level `run` directory (what apply would find there is the live
    system's, unknown here; the listing's is the best guess)."""

    def __init__(self, listing: Mapping[str, Entry]) -> None:
        self.listing = listing
        self.children: dict[str, list[str]] = {}
        for name in listing:
            parent, _, base = name.rpartition("/")
            self.children.setdefault(parent, []).append(base)

    def _path(self, where: Where) -> str:
        if where.tree == "root":
            return where.path
        return f"{RUN}/{where.path}" if where.path else RUN

    def kind(self, where: Where) -> Kind | None:
        path = self._path(where)
        if not path:
            return Kind.DIR
        e = self.listing.get(path)
        if e is None and path in self.children:  # implied by its entries
            return Kind.DIR
        return e.kind if e is not None else None

    def readlink(self, where: Where) -> str:
        e = self.listing.get(self._path(where))
        if e is None or e.kind is not Kind.SYMLINK:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return e.member.target

    def listdir(self, where: Where) -> list[str]:
        return sorted(self.children.get(self._path(where), []))

    def same_mount(self, where: Where) -> bool:
        return True


def reads_as_whiteout(puts: Iterable[str]) -> list[Refusal]:
    """Entries of NEW whose name apply would take for a whiteout: no update
    can carry them."""
    return [Refusal(name, f"named {WHITEOUT}..., which apply reads as a whiteout",
                    "rename it: an update cannot carry such a name")
            for name in puts if name.rpartition("/")[2].startswith(WHITEOUT)]


def judge(old: Mapping[str, Entry], members: Iterable[Member], options: Options, *,
          puts: Iterable[str] = ()) -> Plan:
    """apply's plan for the members over OLD; its refusals are mkupdates'.
    `puts`: NEW's names the update writes (their names are judged first)."""
    plan = make_plan(ListingTree(old), members, options)
    plan.refusals[:0] = reads_as_whiteout(puts)
    return plan
