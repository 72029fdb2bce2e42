"""What applying an update would do, decided before anything is written.

Every name is resolved as the live system will see it: ROOT is `/`, its
top-level `run` is the live /run (a separate directory), symlinks are
followed inside that view and never out of it (`..` at the top stays
there, as in the kernel).  Every place is judged where it resolves, not as
its name is written: a link back to the top leads to the journal or /proc
as surely as their names do.  The result is a list of actions, or of
refusals; the executor only carries actions out."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, Protocol

from dmoverlay.apply import xattrpolicy
from dmoverlay.core.entries import Kind, Member

NAME_MAX = 255
PATH_MAX = 4095
MAX_LINKS = 40  # as the kernel: more symlinks than this in one lookup is a loop
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Kernel filesystems a tmpfs or devtmpfs covers at boot: nothing to write there.
FORBIDDEN_TOP = {"proc": "the kernel's proc filesystem", "sys": "sysfs",
                 "dev": "devtmpfs"}
HIDDEN_TOP = {"tmp": "a tmpfs is mounted on /tmp at start-up and hides it"}
RUN = "run"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# dmoverlay's own names: the journal at each tree's top, temporary files
# beside each target, and the staging directory at the live /run's top
RESERVED_TOP = ".dmoverlay"
RESERVED_PREFIX = ".dmoverlay-"
STAGING_TOP = "dmoverlay"
_RESERVED = ("a name dmoverlay keeps for its journal and temporary files",
             "the update is malformed or hostile")


class Op(StrEnum):
    MKDIR = "create dir"
    CREATE = "create"
    REPLACE = "replace"
    LINK = "hardlink"
    WHITEOUT = "whiteout"
    FOLLOW = "follow link"


_new_where = tuple.__new__  # what Where(...) calls, without its Python-level __new__


class Where(NamedTuple):
    """A real place: `tree` is "root" or "run"; `path` is relative to that
    tree's top and contains no symlink (every component was checked).
    (A named tuple: planning hashes places by the hundred thousand.)"""

    tree: str
    path: str

    def __str__(self) -> str:
        return f"/{self.path}" if self.tree == "root" else f"<run>/{self.path}"

    def child(self, name: str) -> Where:
        return _new_where(Where, (self.tree, f"{self.path}/{name}" if self.path else name))

    @property
    def parent(self) -> Where:
        return _new_where(Where, (self.tree, self.path.rpartition("/")[0]))

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass(frozen=True)
class Action:
    op: Op
    name: str  # the member's name in the update ("" for links followed)
    where: Where
    member: Member | None = None
    detail: str = ""  # FOLLOW: "lib -> usr/lib"; LINK: where the first name lands
    replaces: str = ""  # REPLACE: the kind of entry replaced
    link_to: Where | None = None

    def to_dict(self) -> dict[str, object]:
        return {"op": str(self.op), "name": self.name, "tree": self.where.tree,
                "path": self.where.path, "replaces": self.replaces, "detail": self.detail}


@dataclass(frozen=True)
class Refusal:
    name: str
    reason: str
    hint: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "reason": self.reason, "hint": self.hint}


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusals

    def count(self, op: Op) -> int:
        return sum(1 for a in self.actions if a.op is op)

    def to_dict(self) -> dict[str, object]:
        """The plan as JSON reports it."""
        return {"actions": [a.to_dict() for a in self.actions],
                "refusals": [r.to_dict() for r in self.refusals]}


class Tree(Protocol):
    """Read-only lookups in the real trees (root, run), by symlink-free path."""

    def kind(self, where: Where) -> Kind | None: ...

    def readlink(self, where: Where) -> str:
        """The link's text; OSError if it is no longer a link or is gone
        (the tree changed since kind() was asked)."""

    def listdir(self, where: Where) -> list[str]: ...

    def same_mount(self, where: Where) -> bool:
        """Whether a directory is on its tree's top's mount (a rename can
        reach the journal from there)."""


_UNKNOWN = Where("", "")  # not looked up yet


@dataclass(frozen=True)
class Options:
    allow_setuid: bool = False  # setuid/setgid files, file capabilities
    has_run: bool = True  # a live /run to put run/ entries in
    allow_xattrs: tuple[str, ...] = ()  # xattr names (and below) the policy refuses


class Refused(Exception):
    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# ------------------------------------------------------------------ names


def split_name(name: str) -> list[str]:
    """The components of a member's name, or Refused for any name that is
    not a plain relative path."""
    if not name:
        raise Refused("empty name")
    if "\0" in name:
        raise Refused("name holds a NUL byte")
    if _CONTROL.search(name):
        raise Refused("name holds a control character")
    if name.startswith("/"):
        raise Refused("absolute name", "names in an update are relative to the root")
    plain = name.isascii()  # then its length in bytes is len(): no encoding
    if (len(name) if plain else len(os.fsencode(name))) > PATH_MAX:
        raise Refused(f"name longer than {PATH_MAX} bytes")
    parts = name.removesuffix("/").split("/")
    if parts[0] == RESERVED_TOP or (RESERVED_PREFIX in name and any(
            p.startswith(RESERVED_PREFIX) for p in parts)):
        raise Refused("a name dmoverlay keeps for its journal and temporary files")
    short = plain and len(name) <= NAME_MAX  # and so is every component
    for part in parts:
        if part == "..":
            raise Refused("name holds '..'", "the update is malformed or hostile")
        if part in ("", "."):
            raise Refused("name holds an empty or '.' component")
        if not short and len(os.fsencode(part)) > NAME_MAX:
            raise Refused(f"a component is longer than {NAME_MAX} bytes")
    return parts


# ------------------------------------------------------------------ planning


@dataclass
class _Planned:
    """What the plan has put at a place so far (later members see it)."""

    kind: Kind
    by_update: bool = True


class Planner:
    def __init__(self, tree: Tree, options: Options) -> None:
        self.tree = tree
        self.options = options
        self.plan = Plan()
        self.planned: dict[Where, _Planned] = {}  # made or replaced by this plan
        self.removed: set[Where] = set()  # whiteouts
        self.placed: dict[str, Where] = {}  # member name -> where it lands
        self.followed: set[tuple[str, str]] = set()
        self.actions_at: dict[Where, int] = {}
        self.new_dirs: set[Where] = set()  # made by the plan where nothing was
        self.cleared: set[Where] = set()  # whited out, then made again: empty when made
        # directories already resolved, by the update's spelling; forgotten
        # whenever the plan changes what a walk could meet (links, whiteouts)
        self.resolved: dict[tuple[str, ...], Where] = {}
        self.kinds: dict[Where, Kind | None] = {}
        # directories checked for mounts: the mount point at or above each
        # (below its tree's top), or None when it is on the top's mount
        self.mounts: dict[Where, Where | None] = {Where("root", ""): None, Where("run", ""): None}
        # directories holding an entry the plan made: kept from the first
        # time a directory is to be replaced (most updates replace none)
        self.holding: set[Where] | None = None

    def _real(self, where: Where) -> Kind | None:
        """The kind of the real tree's entry (it does not change while we plan)."""
        if where in self.kinds:
            return self.kinds[where]
        # nothing is below a directory the plan makes where there was nothing
        kind = None if where.parent in self.new_dirs else self.tree.kind(where)
        self.kinds[where] = kind
        return kind

    # -- the view: the real trees with the plan's changes on top

    def _kind_at(self, where: Where) -> tuple[Kind | None, bool]:
        """The kind of entry at a place, and whether this update put it there."""
        if where in self.planned:
            p = self.planned[where]
            return p.kind, p.by_update
        if self.removed and self._removed_at(where):
            return None, False
        return self._real(where), False

    def _removed_at(self, where: Where) -> bool:
        """Whether a whiteout removed the place or a directory above it:
        its ancestors looked up, not every whiteout (O(depth))."""
        removed, path = self.removed, where.path
        while path:
            if _new_where(Where, (where.tree, path)) in removed:
                return True
            path = path.rpartition("/")[0]
        return False

    def _top(self, parts: list[str]) -> tuple[Where, list[str], list[str]]:
        """Where a path from the live system's `/` starts (`run/...` is the
        live /run), what is left to walk, and the live path walked so far."""
        if parts and parts[0] == RUN:
            if not self.options.has_run:
                raise Refused("goes into /run, which needs the live /run", "give --run-dir")
            return Where("run", ""), parts[1:], [RUN]
        return Where("root", ""), parts, []

    def resolve_dir(self, parts: Sequence[str], name: str, *,
                    create: bool = True) -> Where | None:
        """The real directory the components lead to, following links as the
        live system would.  Missing directories are planned on the way, or,
        without `create`, end the walk with None."""
        key = tuple(parts)
        if key in self.resolved:
            return self.resolved[key]
        found = self._walk(parts, name, create=create)
        if found is not None:
            self.resolved[key] = found
        return found

    def _walk(self, parts: Sequence[str], name: str, *, create: bool) -> Where | None:
        where, todo, seen = self._top(list(parts))
        links = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                # as the kernel: /.. is /, and the live /run's .. is / too
                where, todo, seen = self._top(seen[:-1] + todo)
                continue
            if not where.path:
                if where.tree == "root" and part == RUN:  # a link's way into /run
                    where, todo, seen = self._top([RUN, *todo])
                    continue
                self._check_top(where.tree, part)
            elif part.startswith(RESERVED_PREFIX):
                raise Refused(f"goes through {where.child(part)}, {_RESERVED[0]}", _RESERVED[1])
            here = where.child(part)
            kind, by_update = self._kind_at(here)
            if kind is None:
                if not create:
                    return None
                self._check_mount(where)
                self._mkdir(here, name)
                where = here
            elif kind is Kind.DIR:
                where = here
            elif kind is Kind.SYMLINK:
                if by_update:
                    raise Refused(f"goes through the symlink {'/'.join([*seen, part])} "
                                  "that the update itself creates",
                                  "an update may not write through its own links")
                links += 1
                if links > MAX_LINKS:
                    raise Refused("too many levels of symbolic links")
                target = self._readlink(here)
                self._note_follow(here, target)
                rest = [p for p in target.split("/") if p]
                if target.startswith("/"):
                    where, todo, seen = self._top(rest + todo)
                else:
                    todo = rest + todo
                continue
            else:
                raise Refused(f"{'/'.join([*seen, part])} is a {kind}, not a directory")
            seen.append(part)
        return where

    def _readlink(self, link: Where) -> str:
        try:
            return self.tree.readlink(link)
        except OSError as exc:  # no longer a link (EINVAL), or gone
            raise Refused(f"{link} changed while the update was planned ({exc.strerror})",
                          "nothing was written; apply it again") from None

    def _check_place(self, where: Where, kind: Kind | None) -> None:
        """Judge where an entry lands by the first component of its place,
        at its tree's top.  Only a place just below a top needs it: the
        first component of a deeper one is a directory the walk went
        through, judged on the way, as every step of a walk is."""
        if "/" in where.path:
            return
        self._check_top(where.tree, where.path)
        if where.tree == "root" and where.path == RUN and kind is not Kind.DIR:
            raise Refused("replaces /run, on which the live /run is mounted",
                          "only a directory may be named run at the top")

    def _check_top(self, tree: str, part: str) -> None:
        """A name just below a tree's top.  Case does not matter here: on a
        case-folding directory, .DMOVERLAY is the journal."""
        folded = part.casefold()
        if folded == RESERVED_TOP or folded.startswith(RESERVED_PREFIX):
            raise Refused(f"reaches {Where(tree, part)}, {_RESERVED[0]}", _RESERVED[1])
        if tree == "run":
            if folded == STAGING_TOP:
                raise Refused(f"reaches {Where(tree, part)}, dmoverlay's staging directory",
                              _RESERVED[1])
            return
        if folded in FORBIDDEN_TOP:
            raise Refused(f"writes under /{part} ({FORBIDDEN_TOP[folded]})",
                          "nothing in an update may go there")
        if folded in HIDDEN_TOP:
            raise Refused(f"writes under /{part}: {HIDDEN_TOP[folded]}",
                          "put it elsewhere, e.g. under var/tmp or run")

    def _check_mount(self, directory: Where) -> None:
        """Refuse to change anything in a directory on another mount than its
        tree's top: the rename to the journal would fail (EXDEV) mid-commit."""
        point = self.mounts.get(directory, _UNKNOWN)
        if point is _UNKNOWN:
            point = self._mount_point(directory)
        if point is not None:
            where = "" if point == directory else f"{directory}, below "
            raise Refused(f"writes into {where}{point}: another filesystem is mounted there",
                          "a rename cannot cross filesystems: unmount it, or leave its "
                          "files out of the update")

    def _mount_point(self, directory: Where) -> Where | None:
        """The mount point at or above a directory (below its tree's top),
        or None.  One question to the tree per directory, ever."""
        chain = []
        d = directory
        while d.path and d not in self.mounts:
            chain.append(d)
            d = d.parent
        found = self.mounts.get(d) if d.path else None
        for c in reversed(chain):
            if found is None and self._real(c) is Kind.DIR and not self.tree.same_mount(c):
                found = c
            self.mounts[c] = found
        return found

    def _note_follow(self, link: Where, target: str) -> None:
        key = (str(link), target)
        if key not in self.followed:
            self.followed.add(key)
            self.plan.actions.append(Action(Op.FOLLOW, "", link, detail=f"{link} -> {target}"))

    def _mkdir(self, where: Where, name: str, member: Member | None = None) -> None:
        if where in self.removed:  # OCI's way to replace a directory: it starts empty
            self.kinds = {w: k for w, k in self.kinds.items()
                          if w.tree != where.tree or not w.path.startswith(where.path + "/")}
            self.new_dirs.add(where)
        elif self._real(where) is None:
            self.new_dirs.add(where)
        self.planned[where] = _Planned(Kind.DIR)
        if self.holding is not None:
            self.holding.add(where.parent)
        self.removed.discard(where)
        default = Member(name=name, kind=Kind.DIR, mode=0o755)
        self._add(Action(Op.MKDIR, member.name if member else name, where, member or default))

    def _add(self, action: Action) -> None:
        old = self.actions_at.get(action.where)
        if old is not None and action.op is Op.MKDIR and self.plan.actions[old].op is Op.WHITEOUT:
            # both stay: the old entry is removed, then the new directory made
            self.cleared.add(action.where)
            old = None
        if old is not None and action.op is not Op.FOLLOW:
            # a later entry of the same name wins, as when tar extracts
            self.plan.actions[old] = action
        else:
            self.actions_at[action.where] = len(self.plan.actions)
            self.plan.actions.append(action)

    # -- members

    def add(self, member: Member) -> None:
        try:
            self._add_member(member)
        except Refused as exc:
            self.plan.refusals.append(Refusal(member.name or "/", exc.reason, exc.hint))

    def _add_member(self, m: Member) -> None:
        if m.name == "":
            if m.kind is not Kind.DIR:
                raise Refused(f"the top of the update is a {m.kind}, not a directory",
                              "the update is malformed or hostile")
            return  # the update's own top: the root's metadata stays as it is
        parts = split_name(m.name)
        self._check_kind(m)
        base = parts[-1]
        if base == OPAQUE:
            raise Refused("opaque whiteouts are not supported",
                          "list the entries to delete with .wh.NAME")
        if base.startswith(WHITEOUT):
            self._whiteout(m, parts[:-1], base.removeprefix(WHITEOUT))
            return
        if m.xattrs:
            self._check_xattrs(m)
        parent = self.resolve_dir(parts[:-1], m.name)
        assert parent is not None
        where = parent.child(base)
        self._check_place(where, m.kind)
        if m.kind is not Kind.DIR:
            self._check_mount(parent)  # a directory's is checked if it is made
        if m.kind is Kind.DIR:
            self._dir(m, where)
        else:
            self._entry(m, where)

    def _check_kind(self, m: Member) -> None:
        if m.kind in (Kind.CHAR, Kind.BLOCK, Kind.FIFO, Kind.SOCKET):
            raise Refused(f"a {m.kind} (device nodes, fifos and sockets are refused)",
                          "the live system makes its own device nodes")
        if (m.kind is Kind.FILE and m.mode & (stat.S_ISUID | stat.S_ISGID)
                and not self.options.allow_setuid):
            raise Refused("a setuid/setgid file", "pass --allow-setuid if it is meant to be")

    def _check_xattrs(self, m: Member) -> None:
        opts = self.options
        for key, value in m.xattrs:
            verdict = xattrpolicy.refusal(key, value, m.kind, allow_setuid=opts.allow_setuid,
                                          allowed=opts.allow_xattrs)
            if verdict is not None:
                raise Refused(*verdict)

    def _dir(self, m: Member, where: Where) -> None:
        kind, _ = self._kind_at(where)
        if kind is None:
            self._check_mount(where.parent)
            self._mkdir(where, m.name, m)
        elif kind is Kind.SYMLINK:
            # keep the link, go on inside its target
            self.resolve_dir(self._live_parts(where), m.name)
        elif kind is not Kind.DIR:
            raise Refused(f"a directory over a {kind}", "remove it first with a .wh. entry")
        elif where in self.planned and self.planned[where].by_update:
            self._add(Action(Op.MKDIR, m.name, where, m))  # a repeated entry: its metadata

    def _live_parts(self, where: Where) -> list[str]:
        parts = [p for p in where.path.split("/") if p]
        return [RUN, *parts] if where.tree == "run" else parts

    def _entry(self, m: Member, where: Where) -> None:
        kind, _ = self._kind_at(where)
        if kind is Kind.DIR:
            self._check_mount(where)  # a mount point is no directory to replace
        if kind is Kind.DIR and not self._empty_dir(where):
            raise Refused(f"a {m.kind} over a non-empty directory",
                          "remove the directory first with a .wh. entry")
        link_to = None
        if m.kind is Kind.HARDLINK:
            link_to = self.placed.get(m.target.removeprefix("./"))
            first = self.planned.get(link_to) if link_to else None
            if link_to is None or first is None or first.kind is not Kind.FILE:
                raise Refused(f"hardlink to {m.target!r}, which is not an earlier file "
                              "of the update", "the update is malformed")
        # create or replace, judged against the real tree: a name the update
        # wrote twice, or removed and wrote again, still replaces what is there
        replaces = None if where in self.cleared else self._real(where)
        if m.kind is Kind.SYMLINK or kind not in (None, Kind.FILE):
            self.resolved.clear()  # a walk through here would now end elsewhere
        op = Op.LINK if link_to else (Op.CREATE if replaces is None else Op.REPLACE)
        self._add(Action(op, m.name, where, m, replaces=replaces or "", link_to=link_to))
        self.planned[where] = _Planned(Kind.FILE if m.kind is Kind.HARDLINK else m.kind)
        if self.holding is not None:
            self.holding.add(where.parent)
        self.removed.discard(where)
        self.placed[m.name] = where

    def _empty_dir(self, where: Where) -> bool:
        """No child in the real tree (less whiteouts) nor planned by the update.
        (An entry planned deeper inside has a planned or real directory on
        its way, a child of this one: children are enough.)"""
        if self.holding is None:  # the first time: then kept as the plan grows
            self.holding = {w.parent for w in self.planned}
        if where in self.holding:
            return False
        if self._real(where) is None or where in self.cleared:
            return True
        return all(where.child(n) in self.removed for n in self.tree.listdir(where))

    def _whiteout(self, m: Member, parent_parts: list[str], victim: str) -> None:
        if not victim or victim in (".", ".."):
            raise Refused("whiteout of nothing")
        if victim.startswith(RESERVED_PREFIX):
            raise Refused(f"whiteout of {victim!r}, {_RESERVED[0]}", _RESERVED[1])
        parent = self.resolve_dir(parent_parts, m.name, create=False)
        if parent is None:
            return  # its directory does not exist: nothing to remove
        where = parent.child(victim)
        self._check_place(where, None)
        kind, by_update = self._kind_at(where)
        if by_update:
            raise Refused(f"whiteout of {victim!r}, which the update itself creates")
        if kind is None:
            return  # nothing to remove: already as the update wants it
        self._check_mount(parent)
        if kind is Kind.DIR:
            self._check_mount(where)
        self._add(Action(Op.WHITEOUT, m.name, where, m, replaces=kind))
        self.removed.add(where)
        self.resolved.clear()


def make_plan(tree: Tree, members: Iterable[Member], options: Options) -> Plan:
    planner = Planner(tree, options)
    for member in members:
        planner.add(member)
    return planner.plan
