"""Undoing a transaction of `dmoverlay apply` from its journal.

The journal is input: the root may come from an image, or have been written
by hand.  It is reached through descriptors opened beneath its tree, never
through a link; every record is checked before the first step is undone
(journal.Log.check); and a step removes only what the transaction made, as
the inode numbers it logged tell: a user's file that carries a temporary's
name, or an entry edited since the apply, stays.

A step that cannot be done is reported (one warning each) and the others go
on.  The journal is then set aside as `<txn>.failed` (not a transaction's
name: no apply or rollback reads it again), holding whatever it could not
put back, so that no journal ever stands in the way of the next apply."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cached_property

from dmoverlay.apply.inroot import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Trees,
    list_dir,
    renameat2,
    syncfs,
)
from dmoverlay.apply.journal import JOURNALS, LOG, Log, Record, ends_done, read_log, txn_names
from dmoverlay.apply.plan import Where
from dmoverlay.core import log as progress
from dmoverlay.core.entries import kind_on_disk
from dmoverlay.core.errors import DmoverlayError, InRootError, JournalError, RollbackRefused

SET_ASIDE = ".failed"
SHOWN = 3  # changed entries named in a refusal; the rest counted



def place(trees: Trees, where: Where) -> str:
    """A place as the user finds it on this machine."""
    top = trees.root if where.tree == "root" else trees.run or "<run>"
    return os.path.join(top, where.path) if where.path else top


# ------------------------------------------------------------------ finding journals


def _dir(trees: Trees, where: Where) -> int | None:
    """The directory at `where`, opened beneath its tree; None if there is
    none; JournalError if something else is there (a link, a file)."""
    if where.tree not in trees.fds:
        return None
    try:
        st = os.lstat(where.name, dir_fd=trees.dir_fd(where.parent))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"{place(trees, where)}: {exc.strerror}",
                           hint="nothing was changed") from None
    if not stat.S_ISDIR(st.st_mode):
        raise JournalError(f"{place(trees, where)} is a {kind_on_disk(st.st_mode)}, not a journal "
                           "directory of dmoverlay",
                           hint="nothing was changed; move it out of the way") from None
    return trees.dir_fd(where)


def journals_dir(trees: Trees, tree: str) -> int | None:
    """`.dmoverlay/journal` of a tree, if it has one."""
    top, _, _ = JOURNALS.partition("/")
    if _dir(trees, Where(tree, top)) is None:
        return None
    return _dir(trees, Where(tree, JOURNALS))


def transactions(trees: Trees, tree: str = "root") -> list[str]:
    """The transactions journaled in a tree, oldest first."""
    fd = journals_dir(trees, tree)
    if fd is None:
        return []
    return txn_names(_names(fd))


def txn_dir(trees: Trees, tree: str, txn: str) -> int | None:
    if journals_dir(trees, tree) is None:
        return None
    return _dir(trees, Where(tree, f"{JOURNALS}/{txn}"))


def finished(trees: Trees, txn: str) -> bool:
    fd = txn_dir(trees, "root", txn)
    return fd is not None and ends_done(fd)


def load(trees: Trees, txn: str) -> Log:
    """The checked log of a transaction (empty if it has none: a crash came
    before it was written); JournalError if it cannot be trusted."""
    name = place(trees, Where("root", f"{JOURNALS}/{txn}"))
    fd = txn_dir(trees, "root", txn)
    # a record may name a tree only if this transaction's directory is there
    # (each tree's a real one): execute makes it in every tree it changes
    # before the log is written, and a journal that came with the root (an
    # image's) has none in the live /run, which is not the image's to change
    here = tuple(t for t in trees.fds if txn_dir(trees, t, txn) is not None)
    log = Log.parse(read_log(fd, name, txn), f"{name}/{LOG}", txn) if fd is not None else Log()
    log.check(f"{name}/{LOG}", txn, here)
    return log


# ------------------------------------------------------------------ changes since


def _same_time(on_disk: int, logged: int) -> bool:
    """A filesystem that keeps whole seconds only keeps the logged time cut."""
    return on_disk == logged or (on_disk % 10**9 == 0 and on_disk == logged // 10**9 * 10**9)


def _lstat(trees: Trees, where: Where) -> os.stat_result | None:
    try:
        return os.lstat(where.name, dir_fd=trees.dir_fd(where.parent))
    except (OSError, InRootError):
        return None


def changed_since(trees: Trees, log: Log) -> list[tuple[Where, str]]:
    """Entries of a finished transaction that are no longer as it left them:
    a new entry modified, replaced or deleted; a new directory with entries
    it did not make; a removed name made again."""
    made = {Where(r.tree, r.path) for r in log.records if r.step in ("put", "mkdir")}
    changed = []
    for r in log.records:
        where = Where(r.tree, r.path)
        why = ""
        if r.step == "put":
            why = _put_changed(trees, where, log.ready(r.n))
        elif r.step == "mkdir":
            why = _dir_changed(trees, where, made)
        elif r.step == "remove" and where not in made and _lstat(trees, where) is not None:
            why = "made again"
        if why:
            changed.append((where, why))
    return changed


def _put_changed(trees: Trees, where: Where, ready: Record | None) -> str:
    st = _lstat(trees, where)
    if st is None:
        return "deleted"
    if ready is None or st.st_ino != ready.ino:
        return "replaced"
    if ready.size >= 0 and (st.st_size != ready.size
                            or not _same_time(st.st_mtime_ns, ready.mtime_ns)):
        return "modified"
    return ""


def _dir_changed(trees: Trees, where: Where, made: set[Where]) -> str:
    st = _lstat(trees, where)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return ""
    try:
        names = trees.listdir(where)
    except (OSError, InRootError):
        return ""
    return "holds new entries" if any(where.child(n) not in made for n in names) else ""


def refusal(trees: Trees, txn: str, changed: list[tuple[Where, str]]) -> RollbackRefused:
    shown = ", ".join(f"{place(trees, w)} ({why})" for w, why in changed[:SHOWN])
    more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
    return RollbackRefused(
        f"rollback of transaction {txn} refused: {len(changed)} "
        f"{'entry' if len(changed) == 1 else 'entries'} changed since it was applied: "
        f"{shown}{more}",
        hint="nothing was changed; --force undoes the rest and leaves those as they are")


# ------------------------------------------------------------------ undoing


@dataclass
class _Undo:
    trees: Trees
    txn: str
    log: Log
    keep: frozenset[Where]
    jdirs: dict[str, int | None]
    left: list[str] = field(default_factory=list)  # not put back: the journal is kept
    notes: list[str] = field(default_factory=list)  # worth a warning, but nothing is lost

    @cached_property
    def removes(self) -> dict[Where, Record]:
        return {Where(r.tree, r.path): r for r in self.log.records if r.step == "remove"}

    def saved(self, r: Record) -> tuple[int, str] | None:
        """Where the journal keeps change n's old entry, if it does."""
        jfd = self.jdirs.get(r.tree)
        if jfd is None:
            return None
        with suppress(FileNotFoundError):
            os.lstat(str(r.n), dir_fd=jfd)
            return jfd, str(r.n)
        return None

    def ours(self, st: os.stat_result | None, r: Record) -> bool:
        """Whether an entry is the one put `r` made (its logged inode)."""
        ino = self.log.inode_of(r.n)
        return st is not None and ino != 0 and st.st_ino == ino

    def our_tmp(self, st: os.stat_result | None, r: Record) -> bool:
        """A temporary that no "ready" names (a crash or failure came while
        it was written) is ours unless its name was taken before us or it
        is older than the transaction."""
        if st is None or stat.S_ISDIR(st.st_mode) or r.n in self.log.taken:
            return False
        return self.ours(st, r) or (not self.log.inode_of(r.n)
                                    and st.st_ctime_ns >= self.log.since_ns)


def undo(trees: Trees, txn: str, log: Log, *, keep: Iterable[Where] = ()) -> list[str]:
    """Put back what a transaction changed, whatever point it reached; leave
    the places in `keep` as they are.  What could not be put back, one line
    each (also shown as warnings)."""
    jdirs = {tree: txn_dir(trees, tree, txn) for tree in trees.fds}
    u = _Undo(trees, txn, log, frozenset(keep), jdirs)
    steps = {"put": _undo_put, "remove": _undo_remove, "mkdir": _undo_mkdir}
    for r in reversed(log.records):
        step = steps.get(r.step)
        if step is None:
            continue
        where = Where(r.tree, r.path)
        try:
            step(u, r, where)
        except (OSError, InRootError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else exc.message
            u.left.append(f"{place(trees, where)}: could not be put back: {why}")
    try:
        _finish(u)
        _set_times(u)  # last: removing the journal changes the tops' times
        for fd in trees.fds.values():
            syncfs(fd)
    except (OSError, DmoverlayError) as exc:
        u.left.append(f"the journal of transaction {txn} could not be removed: "
                      f"{exc.strerror if isinstance(exc, OSError) else exc.message}")
    for line in [*u.notes, *u.left]:
        progress.warning(line)
    return u.left


def _parent(u: _Undo, where: Where) -> int | None:
    try:
        return u.trees.dir_fd(where.parent)
    except InRootError:
        return None


def _stat(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None


def _undo_put(u: _Undo, r: Record, where: Where) -> None:
    saved = u.saved(r)
    parent = _parent(u, where)
    if parent is None:
        if saved:
            u.left.append(f"{place(u.trees, where)}: not put back: its directory is gone")
        return  # else its directory never came to be, nor did it
    target, tmp = _stat(parent, where.name), _stat(parent, r.tmp)
    u.trees.forget(where)
    if where in u.keep:
        if saved:
            u.left.append(f"{place(u.trees, where)}: left as it is (changed since the apply); "
                          "the old one stays in the journal")
        return
    if saved:  # the old entry is in the journal, the new one in place
        if target is None:  # removed since: the old one simply goes back
            renameat2(*saved, parent, where.name, RENAME_NOREPLACE)
        elif u.ours(target, r):
            renameat2(*saved, parent, where.name, RENAME_EXCHANGE)
            _unlink_if(u, r, *saved)
        else:
            u.left.append(f"{place(u.trees, where)}: not put back: it is not the entry this "
                          "transaction wrote; the old one stays in the journal")
    elif tmp is not None and u.ours(target, r) and not u.ours(tmp, r):
        # exchanged, not yet moved to the journal: the old entry is at tmp
        renameat2(parent, r.tmp, parent, where.name, RENAME_EXCHANGE)
        _unlink_if(u, r, parent, r.tmp)
    elif u.our_tmp(tmp, r):  # prepared, never renamed
        os.unlink(r.tmp, dir_fd=parent)
    elif u.ours(target, r):  # created where there was nothing
        os.unlink(where.name, dir_fd=parent)
    if tmp is not None and r.n not in u.log.taken and not u.our_tmp(tmp, r) \
            and not u.ours(target, r):
        u.notes.append(f"{place(u.trees, where.parent.child(r.tmp))}: left alone: named "
                       "like a temporary file of this transaction, but not made by it")


def _unlink_if(u: _Undo, r: Record, fd: int, name: str) -> None:
    """Unlink the entry put `r` made, which an exchange just moved here."""
    if u.ours(_stat(fd, name), r):
        os.unlink(name, dir_fd=fd)


def _undo_remove(u: _Undo, r: Record, where: Where) -> None:
    saved = u.saved(r)
    if saved is None:
        return  # never removed
    parent = _parent(u, where)
    try:
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, "its directory is gone")
        renameat2(*saved, parent, where.name, RENAME_NOREPLACE)
    except (FileExistsError, FileNotFoundError) as exc:
        why = "something else is there now" if isinstance(exc, FileExistsError) else \
            "its directory is gone"
        u.left.append(f"{place(u.trees, where)}: not put back: {why}; the removed one stays "
                      "in the journal")


def _undo_mkdir(u: _Undo, r: Record, where: Where) -> None:
    if r.n in u.log.taken:
        return  # it was there before: not ours
    whiteout = u.removes.get(where)
    if whiteout is not None and u.saved(whiteout) is None:
        return  # the entry it replaces never left: what is there is that one
    parent = _parent(u, where)
    if parent is None:
        return  # its parent never came to be
    st = _stat(parent, where.name)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return  # never made; or what is there is not ours
    u.trees.forget(where)
    if where in u.keep:
        u.left.append(f"{place(u.trees, where)}: left (it holds entries made since the apply)")
        return
    try:
        os.rmdir(where.name, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        u.left.append(f"{place(u.trees, where)}: not removed: it holds entries this "
                      "transaction did not make")


def _set_times(u: _Undo) -> None:
    for r in u.log.records:
        if r.step == "times" and r.tree in u.trees.fds:
            where = Where(r.tree, r.path)
            with suppress(OSError, InRootError):  # gone meanwhile: nothing to restore
                if u.trees.lstat(where) is not None:
                    os.utime(u.trees.dir_fd(where), ns=(r.atime_ns, r.mtime_ns))


def _finish(u: _Undo) -> None:
    """Remove the journal, or set it aside if it still holds anything."""
    trees, top = u.trees, JOURNALS.partition("/")[0]
    held = any(set(_names(fd)) - {LOG} for fd in u.jdirs.values() if fd is not None)
    for tree, fd in u.jdirs.items():
        if fd is None:
            continue
        jfd = trees.dir_fd(Where(tree, JOURNALS))
        if u.left or held:
            trees.forget(Where(tree, f"{JOURNALS}/{u.txn}"))
            aside = _set_aside(jfd, u.txn)
            u.left.append(f"the journal of transaction {u.txn} is kept as "
                          f"{place(trees, Where(tree, f'{JOURNALS}/{aside}'))}")
            continue
        with suppress(FileNotFoundError):
            os.unlink(LOG, dir_fd=fd)
        with suppress(OSError):  # empty directories only: nothing else is lost
            os.rmdir(u.txn, dir_fd=jfd)
            os.rmdir(JOURNALS.partition("/")[2], dir_fd=trees.dir_fd(Where(tree, top)))
        trees.forget(Where(tree, top))
        with suppress(OSError):
            os.rmdir(top, dir_fd=trees.top(tree))


def _names(fd: int) -> list[str]:
    try:
        return list_dir(fd)
    except OSError as exc:
        raise JournalError(f"cannot list a journal directory: {exc.strerror}",
                           hint="nothing was changed") from None


def _set_aside(jfd: int, txn: str) -> str:
    """Rename a journal to a name no apply reads again; that name."""
    for k in range(1000):
        name = f"{txn}{SET_ASIDE}" + (f"-{k}" if k else "")
        try:
            renameat2(jfd, txn, jfd, name, RENAME_NOREPLACE)
            return name
        except FileExistsError:
            continue
    raise JournalError(f"cannot set the journal of transaction {txn} aside",
                       hint=f"remove old {txn}{SET_ASIDE}-* journals")
