"""`dmoverlay apply` and `dmoverlay rollback`.

1. Read the whole update once, verifying it to the end, and spool file data
   (under the live /run: never under /tmp, which a tmpfs hides at start-up).
2. Plan against the root as the live system sees it; refuse before writing.
3. Check space (blocks and inodes of each filesystem, and the COW store).
4. Journal, then: move what a whiteout removes to the journal where the
   update makes the name again (OCI's way to replace a directory), make new
   directories (private), write every file to a temporary name beside its
   target with owner, mode, xattrs and times set on the open file, sync the
   filesystems once, and rename each into place (exchanging with the old
   inode, which goes to the journal: no copies); the other whiteouts last.
5. Give new directories their final modes last.  Any failure undoes it all
   (undo.py), and a failed system call is one error line naming the member.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import secrets
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from dmoverlay.apply import undo
from dmoverlay.apply.inroot import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Trees,
    raw_name,
    renameat2,
    syncfs,
)
from dmoverlay.apply.journal import (
    JOURNALS,
    MAX_LOG,
    Record,
    Writer,
    next_txn,
    put_line,
    ready_line,
    tmp_name,
)
from dmoverlay.apply.plan import Action, Op, Options, Plan, Where, make_plan
from dmoverlay.apply.workers import chunks, jobs_for, run_pulled
from dmoverlay.core import cow, rundir
from dmoverlay.core.compress import Readable
from dmoverlay.core.entries import InFile, Kind, Member, UpdateReader, file_identity
from dmoverlay.core.errors import DmoverlayError, ImageError, UsageError, WriteFailed
from dmoverlay.core.sizes import KiB, MiB, format_size
from dmoverlay.core.tree import discard_tree

CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap
BLOCK = 4096
SPOOL_RESERVE = 16 * MiB  # of the staging filesystem (RAM at boot) never used
SPOOL_CHECK_EVERY = 4 * MiB
PARALLEL_FROM = 256  # files: fewer are written by one process (a fork costs ~1 ms)
CHUNK_FILES = 64  # files (or 2 MiB of data) handed to a writing process at a time
# A crash test's hook: stop dead (as a kill would) at the N-th change point.
_CRASH_AT = int(os.environ.get("DMOVERLAY_CRASH_AT", "0") or 0)
_crash_count = 0
_MAIN_PID = os.getpid()


def _change_point() -> None:
    global _crash_count
    if _CRASH_AT:
        _crash_count += 1
        if _crash_count >= _CRASH_AT:
            if os.getpid() != _MAIN_PID:  # a worker: the whole apply dies, as in a kill
                os.kill(_MAIN_PID, signal.SIGKILL)
            os._exit(86)


class ApplyRefused(DmoverlayError):
    """The update may not be applied; nothing was written."""

    def __init__(self, plan: Plan) -> None:
        first = plan.refusals[0]
        more = len(plan.refusals) - 1
        tail = f" (and {more} more: see --dry-run)" if more else ""
        super().__init__(f"refused: {first.name}: {first.reason}{tail}",
                         hint=first.hint or "nothing was written")
        self.plan = plan

    def to_dict(self) -> dict[str, object]:
        """The refusal as JSON reports it: the whole plan, refusals and all."""
        return {"ok": False, **self.plan.to_dict()}


# ------------------------------------------------------------------ reading


class Spool:
    """File data of an update, kept until it is written into the root: the
    update is read and checked to its end first.

    Data that lies in a file already (a directory's file, a plain tar's
    member: `Located`) is kept as where it lies, and copied from there if
    that file has not changed since; other data (streamed, decompressed) in
    one file under the live /run.  The kernel copies it into the root
    (copy_file_range, else sendfile): no byte of it passes through Python."""

    def __init__(self, directory: Path) -> None:
        # unbuffered, written with pwrite at offsets we know: no lseek per file
        self.file = tempfile.TemporaryFile(dir=directory, buffering=0)  # noqa: SIM115 (closed in close)
        self.fd = self.file.fileno()
        self.dev = os.fstat(self.fd).st_dev
        self.size = 0
        self.unchecked = 0  # bytes added since the room was last checked
        self.where: dict[str, tuple[int, int] | InFile | Sparse] = {}
        # the located file last copied from, open, and its identity when read
        self.source: tuple[str, int, tuple[int, ...]] | None = None
        self.kernel_copy: dict[tuple[int, int], bool] = {}  # by st_dev pair: copy_file_range works

    def add(self, name: str, stream: Readable, size: int,
            sparse: tuple[tuple[int, int], ...] | None = None) -> None:
        located = getattr(stream, "located", None)
        place = located() if located is not None else None
        if place is not None:
            self.where[name] = place
            return
        if sparse is not None:
            self._add_sparse(name, stream, size, sparse)
            return
        self.unchecked += size
        if self.unchecked > SPOOL_CHECK_EVERY or size > SPOOL_CHECK_EVERY:
            self._check_room(name, size)
        start = offset = self.size
        left = size
        while left:
            chunk = stream.read(min(CHUNK, left))
            if not chunk:
                raise ImageError(f"{name}: update ended inside this file's data")
            _pwrite_all(self.fd, chunk, offset)
            offset += len(chunk)
            left -= len(chunk)
        self.size += size
        self.where[name] = (start, size)

    def _add_sparse(self, name: str, stream: Readable, size: int,
                    pieces: tuple[tuple[int, int], ...]) -> None:
        """A sparse member: only the pieces its map names are kept (the
        stream reads its holes as zeros), to be written where they lie."""
        data = sum(length for _, length in pieces)
        self.unchecked += data
        if self.unchecked > SPOOL_CHECK_EVERY or data > SPOOL_CHECK_EVERY:
            self._check_room(name, data)
        start = self.size
        read = 0  # of the member's stream
        for at, length in pieces:
            _read_exactly(stream, at - read, name, None, 0)
            _read_exactly(stream, length, name, self.fd, self.size)
            self.size += length
            read = at + length
        _read_exactly(stream, size - read, name, None, 0)
        self.where[name] = Sparse(start, size, pieces)

    def _check_room(self, name: str, size: int) -> None:
        st = os.fstatvfs(self.fd)
        if self.unchecked > st.f_bavail * st.f_frsize - SPOOL_RESERVE:
            raise ImageError(f"{name}: {format_size(size)} of data, more than the room left "
                             "to stage the update under the live /run",
                             hint="nothing was written; free memory or use a smaller update")
        self.unchecked = 0

    def copy_into(self, name: str, fd: int, dev: int) -> None:
        """Write the data of `name` at the position of `fd`, a file on the
        filesystem `dev`.  ImageError if it lies in a file that changed."""
        place = self.where[name]
        if isinstance(place, InFile):
            self._copy_located(place, fd, dev)
            return
        if isinstance(place, Sparse):
            self._copy_sparse(name, place, fd, dev)
            return
        offset, size = place
        if self._copy(self.fd, self.dev, offset, size, fd, dev) != size:
            raise ImageError(f"{name}: its staged data was cut short",
                             hint="leave the staging directory under the live /run alone")

    def _copy_sparse(self, name: str, place: Sparse, fd: int, dev: int) -> None:
        """Each piece where it lies in the file; what lies between stays a hole."""
        offset = place.start
        for at, length in place.pieces:
            os.lseek(fd, at, os.SEEK_SET)
            if self._copy(self.fd, self.dev, offset, length, fd, dev) != length:
                raise ImageError(f"{name}: its staged data was cut short",
                                 hint="leave the staging directory under the live /run alone")
            offset += length
        os.ftruncate(fd, place.size)

    def _copy_located(self, place: InFile, fd: int, dev: int) -> None:
        src = self._open_source(place)
        try:
            copied = self._copy(src, place.identity[0], place.offset, place.size, fd, dev)
        except OSError as exc:
            if exc.errno in _TARGET_FULL:
                raise
            self.check_sources()
            raise ImageError(f"cannot copy {place.path} into the root: {exc.strerror}",
                             hint=_UNDONE) from None
        if copied != place.size:
            raise _changed(place.path)

    def check_sources(self) -> None:
        """ImageError if the file data was last copied from changed since the
        update was read.  The ctime moves with any write: the same identity
        after the copies means the bytes copied are those the pass saw.  (A
        file is checked when the next copy comes from another one, or here:
        a tar archive once, not once a member.)"""
        if self.source is not None:
            path, fd, identity = self.source
            if file_identity(os.fstat(fd)) != identity:
                raise _changed(path)

    def _open_source(self, place: InFile) -> int:
        if self.source is not None and self.source[0] == place.path:
            return self.source[1]
        self.check_sources()
        self.release_source()
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(place.path, flags)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise _changed(place.path) from None
            raise ImageError(f"cannot read {place.path}: {exc.strerror}", hint=_UNDONE) from None
        self.source = (place.path, fd, place.identity)
        return fd

    def _copy(self, src: int, src_dev: int, offset: int, size: int, dst: int,
              dst_dev: int) -> int:
        """Copy `size` bytes at `offset` of `src` to `dst`; how many were
        copied (fewer only if `src` ends before)."""
        pair = (src_dev, dst_dev)
        done = 0
        while done < size:
            if self.kernel_copy.get(pair, True):
                try:
                    n = os.copy_file_range(src, dst, size - done, offset + done)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    self.kernel_copy[pair] = False  # e.g. across filesystems: EXDEV
                    continue
            else:
                n = os.sendfile(dst, src, offset + done, size - done)
            if not n:
                break
            done += n
        return done

    def release_source(self) -> None:
        """Close the file last copied from (it is opened again if need be)."""
        if self.source is not None:
            os.close(self.source[1])
            self.source = None

    def close(self) -> None:
        self.release_source()
        self.file.close()


@dataclass(frozen=True)
class Sparse:
    """A sparse file's data in the spool: its pieces, one after the other
    from `start`, and where each lies in a file of `size` bytes."""

    start: int
    size: int
    pieces: tuple[tuple[int, int], ...]


def _read_exactly(stream: Readable, length: int, name: str, fd: int | None,
                  offset: int) -> None:
    """Read `length` bytes of `stream`, written at `offset` of `fd` (or
    dropped: a hole, which reads as zeros)."""
    while length > 0:
        chunk = stream.read(min(CHUNK, length))
        if not chunk:
            raise ImageError(f"{name}: update ended inside this file's data")
        if fd is not None:
            _pwrite_all(fd, chunk, offset)
            offset += len(chunk)
        length -= len(chunk)


_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_TARGET_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_UNDONE = "nothing was changed: the files written so far were removed"


def _changed(path: str) -> ImageError:
    return ImageError(f"{path} changed after the update was read",
                      hint=f"leave the update alone while it is applied; {_UNDONE}")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    done = os.pwrite(fd, data, offset)
    while done < len(data):  # rare: a signal, or a full filesystem on the way to ENOSPC
        done += os.pwrite(fd, memoryview(data)[done:], offset + done)


@contextmanager
def _no_gc_passes() -> Iterator[None]:
    """Python's cyclic collector off meanwhile: the members and the plan are
    tens of thousands of objects that live to the end, and the collector
    would walk them all again and again (~6 % of an apply).  They hold no
    cycles; whatever else does is collected once it is back on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_all(reader: UpdateReader, spool: Spool) -> list[Member]:
    members = []
    with _no_gc_passes():
        for member, stream in reader.members():
            if member.kind is Kind.FILE:
                assert stream is not None
                spool.add(member.name, stream, member.size, member.sparse)
            members.append(member)
    return members


# ------------------------------------------------------------------ space


@dataclass(frozen=True)
class Need:
    blocks: int = 0
    inodes: int = 0


def space_needed(plan: Plan) -> dict[str, Need]:
    """Blocks and inodes per tree.  Replaced inodes are kept by the journal,
    so nothing an update replaces is freed."""
    blocks: dict[str, int] = {}
    inodes: dict[str, int] = {}
    for a in plan.actions:
        if a.op is Op.FOLLOW or a.op is Op.WHITEOUT:
            continue
        tree, m = a.where.tree, a.member
        size = m.size if m is not None and m.kind is Kind.FILE else 0
        blocks[tree] = blocks.get(tree, 0) + 1 + -(-size // BLOCK)
        inodes[tree] = inodes.get(tree, 0) + 1
    return {tree: Need(blocks[tree], inodes[tree]) for tree in blocks}


def check_space(trees: Trees, plan: Plan,
                cow_free: Callable[[str], int | None]) -> None:
    for tree, need in space_needed(plan).items():
        st = os.fstatvfs(trees.top(tree))
        margin = max(MiB // BLOCK, need.blocks // 20)
        have = st.f_bavail * st.f_frsize // BLOCK
        label = "the root" if tree == "root" else "the live /run"
        if need.blocks + margin > have:
            raise ImageError(f"the update does not fit in {label}: it needs "
                             f"{format_size((need.blocks + margin) * BLOCK)}, "
                             f"{format_size(have * BLOCK)} free", hint="nothing was written")
        if st.f_files and need.inodes + 16 > st.f_favail:
            raise ImageError(f"the update does not fit in {label}: it needs {need.inodes} "
                             f"inodes, {st.f_favail} free", hint="nothing was written")
        cow = cow_free(trees.root if tree == "root" else trees.run or "")
        if cow is not None and (need.blocks + margin) * BLOCK > cow:
            raise ImageError(f"the update does not fit in the overlay's COW store: it needs "
                             f"about {format_size((need.blocks + margin) * BLOCK)}, "
                             f"{format_size(cow)} left", hint="nothing was written")


# ------------------------------------------------------------------ executing


@dataclass
class Result:
    txn: str
    plan: Plan
    written: int = 0
    pending: list[str] = field(default_factory=list)  # dry run: unfinished ones to undo first
    dry_run: bool = False

    def to_dict(self) -> dict[str, object]:
        """What was done (or, in a dry run, would be) as JSON reports it."""
        return {"ok": True, "dry_run": self.dry_run, "transaction": self.txn,
                "undo_first": self.pending, **self.plan.to_dict()}



def _failed(exc: OSError, a: Action | None) -> WriteFailed:
    """The one error line for a failed write: the member, where, and why."""
    why = exc.strerror or str(exc)
    what = f"{a.name} ({a.where})" if a is not None and a.name else \
        str(a.where) if a is not None else "the journal"
    return WriteFailed(f"cannot apply {what}: {why}", hint=_UNDONE)


@dataclass
class _Txn:
    trees: Trees
    name: str
    log: Writer
    dirs: dict[str, Where] = field(default_factory=dict)  # tree -> journal dir
    jobs: int = 0  # processes asked for to write files (0: decided by the update's size)

    def saved(self, tree: str, n: int) -> tuple[int, str]:
        return self.trees.dir_fd(self.dirs[tree]), str(n)

    def taken(self, n: int, where: Where) -> WriteFailed:
        """Change n's name was there before us: logged (so that no undo
        removes it), and the error that ends the apply."""
        self.log.write_now(Record("taken", n).to_json() + "\n")
        self.log.sync()
        return WriteFailed(f"{where} is in the way: it was made after the update was planned, "
                           "or bears a name dmoverlay keeps for its temporary files",
                           hint="nothing was changed; move it away and apply again")


def _journal_dir(trees: Trees, tree: str, txn: str) -> Where:
    top = trees.top(tree)
    path = f"{JOURNALS}/{txn}"
    parts = path.split("/")
    fd = top
    opened = []
    try:
        for part in parts:
            with suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            opened.append(fd)
    finally:
        for f in opened:
            os.close(f)
    return Where(tree, path)


def _since_ns() -> int:
    """A moment before any entry this transaction makes: whole seconds (some
    filesystems keep no more), with a second to spare for the kernel's
    coarse clock."""
    return max(0, (time.time_ns() // 10**9 - 1) * 10**9)


def execute(trees: Trees, plan: Plan, spool: Spool, txn_name: str, jobs: int = 0) -> Result:
    """Carry out a plan, or undo every part of it and raise.  `jobs`: how
    many processes write files (0: one per CPU for a large update)."""
    used = {a.where.tree for a in plan.actions} | {"root"}
    # making the journal changes the tops' times: note them first
    tops = {t: os.fstat(trees.top(t)) for t in used}
    try:
        dirs = {t: _journal_dir(trees, t, txn_name) for t in used}
        log = Writer(trees.dir_fd(dirs["root"]))
    except OSError as exc:
        undo_failed(trees, txn_name)
        raise _failed(exc, None) from None
    log.add(Record("begin", time_ns=_since_ns()))
    for t, st in sorted(tops.items()):
        log.add(Record("times", tree=t, path="", atime_ns=st.st_atime_ns,
                       mtime_ns=st.st_mtime_ns))
    txn = _Txn(trees, txn_name, log, dirs, jobs)
    umask = os.umask(0)  # modes are set exactly, at creation
    try:
        result = _execute(txn, plan, spool)
    except BaseException as exc:
        log.close()
        undo_failed(trees, txn_name)
        if isinstance(exc, OSError):  # the one place a system's error becomes ours
            raise _failed(exc, getattr(exc, "action", None)) from None
        raise
    finally:
        os.umask(umask)
        spool.release_source()  # an image's mount must not stay busy
    log.close()
    return result


def undo_failed(trees: Trees, txn: str) -> None:
    """Undo a transaction this process was carrying out (its journal is ours)."""
    undo.undo(trees, txn, undo.load(trees, txn))


def _at(exc: OSError, a: Action) -> OSError:
    """The error, with the action it came from (for the one error line)."""
    exc.action = a  # type: ignore[attr-defined]
    return exc


def _execute(txn: _Txn, plan: Plan, spool: Spool) -> Result:
    """The plan's changes, each step complete and on disk before the next:
    an undo after a crash finds the journal ahead of every change."""
    steps = _Steps.of(txn.name, plan)
    _journal_all(txn, steps)
    _remove_all(txn, steps.first, steps.parent)
    _make_dirs(txn, steps)
    jobs = jobs_for(len(steps.files), txn.jobs, least=PARALLEL_FROM)
    _write_temporaries(txn, steps, spool, jobs)
    _sync_barrier(txn)
    _rename_into_place(txn, steps, jobs)
    _finish(txn, steps)
    return Result(txn.name, plan, written=len(steps.puts))


Numbered = list[tuple[int, Action]]  # actions with their number in the plan


@dataclass(frozen=True)
class _Steps:
    """A plan's actions sorted by the step that carries them out."""

    mkdirs: Numbered
    puts: Numbered  # creates, replaces and hardlinks
    files: Numbered  # the puts of files and symlinks
    links: Numbered  # the puts of hardlinks
    first: Numbered  # whiteouts of places the update then makes again
    last: Numbered  # the other whiteouts
    tmp: dict[int, str]  # put n -> its temporary's name, beside its target
    parent: dict[int, Where]  # action n -> the directory it changes

    @classmethod
    def of(cls, txn_name: str, plan: Plan) -> _Steps:
        mkdirs: Numbered = []
        puts: Numbered = []
        removes: Numbered = []
        by_op = {Op.MKDIR: mkdirs, Op.CREATE: puts, Op.REPLACE: puts, Op.LINK: puts,
                 Op.WHITEOUT: removes}
        for n, a in enumerate(plan.actions):
            if a.op in by_op:
                by_op[a.op].append((n, a))
        # a whiteout of a place the update then makes again (OCI's way to replace
        # a directory) is done first: the old entry must be out of the way
        made = {a.where for _, a in mkdirs} | {a.where for _, a in puts}
        return cls(mkdirs, puts,
                   files=[p for p in puts if p[1].op is not Op.LINK],
                   links=[p for p in puts if p[1].op is Op.LINK],
                   first=[(n, a) for n, a in removes if a.where in made],
                   last=[(n, a) for n, a in removes if a.where not in made],
                   tmp={n: tmp_name(txn_name, n) for n, _ in puts},
                   parent={n: a.where.parent for n, a in [*mkdirs, *puts, *removes]})


def _journal_all(txn: _Txn, steps: _Steps) -> None:
    """Every change logged and synced before the first is made: the times of
    each existing directory changed, then the changes in the order they are
    done (an undo goes through them backwards)."""
    trees, log = txn.trees, txn.log
    touched = set(steps.parent.values()) - {a.where for _, a in steps.mkdirs}
    for where in sorted((w for w in touched if w.path), key=str):  # tops are noted already
        st = trees.lstat(where)
        if st is not None:
            log.add(Record("times", tree=where.tree, path=where.path,
                           atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))
    for n, a in steps.first:
        log.add(Record("remove", n, a.where.tree, a.where.path))
    for n, a in steps.mkdirs:
        log.add(Record("mkdir", n, a.where.tree, a.where.path))
    log.add_lines("".join(f"{put_line(n, a.where.tree, a.where.path, steps.tmp[n])}\n"
                          for n, a in steps.puts))
    for n, a in steps.last:
        log.add(Record("remove", n, a.where.tree, a.where.path))
    if sum(map(len, log.pending)) + READY_LINE * len(steps.puts) > MAX_LOG:
        raise ImageError(f"the update has too many entries for one apply ({len(steps.puts)})",
                         hint="nothing was written; split the update in parts")
    log.sync()
    _change_point()


def _make_dirs(txn: _Txn, steps: _Steps) -> None:
    """New directories, private (0700) until their metadata is set at the end."""
    for n, a in steps.mkdirs:
        try:
            os.mkdir(a.where.name, 0o700, dir_fd=txn.trees.dir_fd(steps.parent[n]))
        except FileExistsError:
            raise txn.taken(n, a.where) from None
        except OSError as exc:
            raise _at(exc, a) from None
        _change_point()


def _write_temporaries(txn: _Txn, steps: _Steps, spool: Spool, jobs: int) -> None:
    """Each new file and symlink written at its temporary name, by several
    processes; hardlinks after, beside their source's temporary."""
    trees, tmp, parent = txn.trees, steps.tmp, steps.parent
    placed_tmp = {a.where: (parent[n], tmp[n]) for n, a in steps.puts} if steps.links else {}

    def prepare(chunk: Numbered) -> None:
        """The chunk's files written, and their "ready" lines appended to the
        log (unsynced; also those of a chunk cut short by a failure)."""
        lines = []
        try:
            for n, a in chunk:
                try:
                    ino = _prepare(trees, a, tmp[n], spool, placed_tmp)
                except FileExistsError:
                    raise txn.taken(n, parent[n].child(tmp[n])) from None
                except OSError as exc:
                    # a temporary made before the failure is ours: its inode
                    # tells the undo so
                    with suppress(OSError):
                        made = os.lstat(tmp[n], dir_fd=trees.dir_fd(parent[n]))
                        lines.append(ready_line(n, made.st_ino))
                    raise _at(exc, a) from None
                lines.append(_ready(n, a, ino))
                _change_point()
            spool.check_sources()
        finally:
            if lines:
                txn.log.write_now("".join(f"{line}\n" for line in lines))

    run_pulled(_chunks(steps.files, parent, data=True), prepare, jobs)
    prepare(steps.links)


def _sync_barrier(txn: _Txn) -> None:
    """The temporaries and their "ready" lines on disk before any rename:
    after a crash, the undo finds every temporary it must remove."""
    for fd in txn.trees.fds.values():
        syncfs(fd)
    txn.log.sync()


def _rename_into_place(txn: _Txn, steps: _Steps, jobs: int) -> None:
    """Each temporary renamed over its target, by several processes; an old
    entry moves to the journal."""
    tmp = steps.tmp

    def commit(chunk: Numbered) -> None:
        for n, a in chunk:
            try:
                _commit(txn, n, a, tmp[n])
            except OSError as exc:
                raise _at(exc, a) from None
            _change_point()

    # a file over an (empty) directory closes that directory's descriptors
    # (Trees.forget), which only this process would know of: it goes last, here
    others = [p for p in steps.puts if p[1].replaces != "dir"]
    run_pulled(_chunks(others, steps.parent, data=False), commit, jobs)
    commit([p for p in steps.puts if p[1].replaces == "dir"])


def _finish(txn: _Txn, steps: _Steps) -> None:
    """The remaining whiteouts, the new directories' metadata (children
    first: their parents' times stay), everything synced and logged done."""
    _remove_all(txn, steps.last, steps.parent)
    for _, a in reversed(steps.mkdirs):
        assert a.member is not None
        try:
            _set_dir_metadata(txn.trees, a.where, a.member)
        except OSError as exc:
            raise _at(exc, a) from None
    for fd in txn.trees.fds.values():
        syncfs(fd)
    txn.log.add(Record("done"))
    txn.log.sync()


READY_LINE = 100  # bytes a "ready" line takes at most


def _ready(n: int, a: Action, ino: int) -> str:
    """The "ready" line of a prepared entry: its inode, and the size and time
    it has unless changed since (a hardlink's are its first name's)."""
    m = a.member
    if a.op is Op.LINK or m is None:
        return ready_line(n, ino)
    size = m.size if m.kind is Kind.FILE else len(raw_name(m.target))
    return ready_line(n, ino, size, m.mtime_ns)


def _remove_all(txn: _Txn, removes: Numbered, parent: dict[int, Where]) -> None:
    """Whiteouts: each entry moved to the journal."""
    trees = txn.trees
    for n, a in removes:
        try:
            parent_fd = trees.dir_fd(parent[n])
            jfd, jname = txn.saved(a.where.tree, n)
            trees.forget(a.where)
            renameat2(parent_fd, a.where.name, jfd, jname, RENAME_NOREPLACE)
        except OSError as exc:
            raise _at(exc, a) from None
        _change_point()


def _chunks(puts: list[tuple[int, Action]], parent: dict[int, Where], *,
            data: bool) -> list[list[tuple[int, Action]]]:
    """Puts in chunks of one directory each, handed out to the processes
    that write them.  Making a file costs about as much as copying 32 KiB
    of data (measured on tmpfs); renaming one (not `data`) the same
    whatever its size."""
    def cost(p: tuple[int, Action]) -> int:
        m = p[1].member
        return 1 + (m.size // (32 * KiB) if data and m is not None else 0)

    return chunks(puts, group=lambda p: parent[p[0]], cost=cost, most=CHUNK_FILES)


def _prepare(trees: Trees, a: Action, tmp: str, spool: Spool,
             placed_tmp: dict[Where, tuple[Where, str]]) -> int:
    """Write the new entry at `tmp` beside its target; its inode number."""
    m = a.member
    assert m is not None
    parent = trees.dir_fd(a.where.parent)
    if a.op is Op.LINK:
        assert a.link_to is not None
        src_dir, src_name = placed_tmp[a.link_to]
        os.link(src_name, tmp, src_dir_fd=trees.dir_fd(src_dir), dst_dir_fd=parent,
                follow_symlinks=False)
        return os.lstat(tmp, dir_fd=parent).st_ino
    if m.kind is Kind.SYMLINK:
        os.symlink(m.target, tmp, dir_fd=parent)
        os.chown(tmp, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        if m.xattrs:
            _set_xattrs(m, f"/proc/self/fd/{parent}/{tmp}")
        os.utime(tmp, ns=(m.mtime_ns, m.mtime_ns), dir_fd=parent, follow_symlinks=False)
        return os.lstat(tmp, dir_fd=parent).st_ino
    # created with its final permission bits (the umask is 0 meanwhile);
    # setuid/setgid bits only after chown, which would clear them
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 m.mode & 0o777, dir_fd=parent)
    try:
        st = os.fstat(fd)
        spool.copy_into(m.name, fd, st.st_dev)
        if (st.st_uid, st.st_gid) != (m.uid, m.gid):
            os.fchown(fd, m.uid, m.gid)
        if m.mode & 0o7000:
            os.fchmod(fd, m.mode)
        _set_xattrs(m, fd)
        os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
        return st.st_ino
    finally:
        os.close(fd)


def _set_xattrs(m: Member, target: int | str) -> None:
    """The member's xattrs on `target`, an open file, or a path that reaches
    a symlink through its directory's descriptor (set on the link itself).
    The planner let through only what the kernel takes (xattrpolicy); what a
    filesystem still refuses fails the write, and execute() says which."""
    for key, value in m.xattrs:
        if isinstance(target, int):
            os.setxattr(target, key, value)
        else:
            os.setxattr(target, key, value, follow_symlinks=False)


def _commit(txn: _Txn, n: int, a: Action, tmp: str) -> None:
    """Rename one prepared entry into place.  With an old entry there, the
    two are exchanged in one step and the old one moves to the journal."""
    trees = txn.trees
    parent = trees.dir_fd(a.where.parent)
    tmp_raw, name_raw = raw_name(tmp), raw_name(a.where.name)
    if a.op is not Op.REPLACE and not a.replaces:
        try:
            renameat2(parent, tmp_raw, parent, name_raw, RENAME_NOREPLACE)
            return
        except FileExistsError:
            pass  # came to be since the plan: it goes to the journal as a replaced one
    if a.replaces == "dir":
        trees.forget(a.where)
    renameat2(parent, tmp_raw, parent, name_raw, RENAME_EXCHANGE)
    jfd, jname = txn.saved(a.where.tree, n)
    renameat2(parent, tmp_raw, jfd, jname, RENAME_NOREPLACE)


def _set_dir_metadata(trees: Trees, where: Where, m: Member) -> None:
    fd = trees.dir_fd(where)
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode & 0o7777)
    _set_xattrs(m, fd)
    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))


# ------------------------------------------------------------------ the jobs


@dataclass(frozen=True)
class ApplyOptions:
    root: Path
    run_dir: Path | None = Path("/run")
    allow_setuid: bool = False
    allow_xattrs: tuple[str, ...] = ()  # xattr names let through (applyplan.Options)
    dry_run: bool = False
    jobs: int = 0  # processes writing files; 0: one per CPU for a large update


def _check_dirs(opts: ApplyOptions) -> None:
    if not opts.root.is_dir():
        raise UsageError(f"{opts.root}: not a directory", hint="--root is the new root to update")
    if opts.run_dir is not None and not opts.run_dir.is_dir():
        raise UsageError(f"{opts.run_dir}: not a directory", hint="--run-dir is the live /run")


STAGING = rundir.NAME  # under the live /run: ours alone, shared with setup's state


@contextmanager
def staging(opts: ApplyOptions) -> Iterator[Path]:
    """A private directory for downloads and spooled data under the live /run
    (never /tmp, which a tmpfs hides at start-up), removed afterwards.  Its
    parent, RUNDIR/dmoverlay, must be a real directory of ours that nobody
    else may write: never a link, which would move the staging elsewhere."""
    _check_dirs(opts)
    run = opts.run_dir if opts.run_dir is not None else Path("/run")
    run_fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(STAGING, 0o700, dir_fd=run_fd)
            made = True
        except FileExistsError:
            made = False
        try:
            with _private_dir(run_fd, run / STAGING) as base_fd:
                name = f"staging-{secrets.token_hex(6)}"
                os.mkdir(name, 0o700, dir_fd=base_fd)
                try:
                    yield _checked_path(base_fd, name, run / STAGING / name)
                finally:
                    discard_tree(name, dir_fd=base_fd)
        finally:
            if made:
                with suppress(OSError):
                    os.rmdir(STAGING, dir_fd=run_fd)
    finally:
        os.close(run_fd)


@contextmanager
def _private_dir(dir_fd: int, path: Path) -> Iterator[int]:
    """The directory `path` (the entry STAGING of `dir_fd`), opened without
    following a link; UsageError unless it is ours and private."""
    fd, why = rundir.open_private(STAGING, dir_fd=dir_fd)
    if why is not None:
        raise UsageError(f"{path} is not a private directory of dmoverlay: {why}",
                         hint=f"remove {path}: dmoverlay makes it again, for itself alone")
    try:
        yield fd
    finally:
        os.close(fd)


def _checked_path(dir_fd: int, name: str, path: Path) -> Path:
    """`path`, once it is known to lead to the entry `name` of `dir_fd`."""
    want = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    st = os.stat(path)
    if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
        raise UsageError(f"{path} changed while it was made", hint="try again")
    return path


@contextmanager
def opened(opts: ApplyOptions) -> Iterator[Trees]:
    """The trees, with the root locked: an apply or rollback that ran beside
    another would take its journal for one a crash left, and undo it."""
    _check_dirs(opts)
    with Trees(os.fspath(opts.root), os.fspath(opts.run_dir) if opts.run_dir else None) as t:
        try:
            fcntl.flock(t.top("root"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{opts.root}: another dmoverlay apply or rollback is running on it",
                             hint="wait for it to end; nothing was changed") from None
        yield t  # the lock ends with the root's descriptor


def recover(trees: Trees, *, dry_run: bool = False) -> list[str]:
    """Undo the transactions a crash left unfinished, newest first (with
    `dry_run`, only find them); their names.  Every one is checked before
    any is undone."""
    names = [n for n in undo.transactions(trees) if not undo.finished(trees, n)]
    logs = {n: undo.load(trees, n) for n in names}
    if not dry_run:
        for name in reversed(names):
            undo.undo(trees, name, logs[name])
    return names


def apply_members(opts: ApplyOptions, members: list[Member], spool: Spool,
                  cow_free: Callable[[str], int | None] = cow.free_bytes) -> Result:
    with opened(opts) as trees, _no_gc_passes():
        pending = recover(trees, dry_run=opts.dry_run)
        plan = make_plan(trees, members, Options(allow_setuid=opts.allow_setuid,
                                                 has_run=opts.run_dir is not None,
                                                 allow_xattrs=opts.allow_xattrs))
        if not plan.ok:
            raise ApplyRefused(plan)
        if opts.dry_run:
            return Result("", plan, pending=pending, dry_run=True)
        check_space(trees, plan, cow_free)
        names = [n for tree in trees.fds for n in undo.transactions(trees, tree)]
        return execute(trees, plan, spool, next_txn(names), opts.jobs)


def rollback(opts: ApplyOptions, *, force: bool = False) -> str | None:
    """Undo an unfinished transaction, or else the last finished one; its
    name.  Entries changed since that apply refuse it (RollbackRefused),
    unless `force`: then they are left as they are, and the rest undone."""
    with opened(opts) as trees:
        undone = recover(trees)
        if undone:
            return undone[-1]
        names = undo.transactions(trees)
        if not names:
            return None
        txn = names[-1]
        log = undo.load(trees, txn)
        changed = undo.changed_since(trees, log)
        if changed and not force:
            raise undo.refusal(trees, txn, changed)
        undo.undo(trees, txn, log, keep=[w for w, why in changed if why != "deleted"])
        return txn
