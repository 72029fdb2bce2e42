"""`make_updates`: the steps in order.  Each side is read (apply's readers),
the difference decided (pure), judged by apply's planner, then written to a
private directory beside the output and renamed into place: a failure
leaves no output and no temporary file."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dmoverlay.apply.execute import ApplyRefused
from dmoverlay.apply.plan import Options, Refusal
from dmoverlay.apply.readers import DirectoryReader, open_update
from dmoverlay.core import log, signature
from dmoverlay.core.entries import Kind, Member, UpdateReader
from dmoverlay.core.errors import ImageError, KeysError, UsageError
from dmoverlay.core.tree import discard_tree
from dmoverlay.mkupdates import check, diff, formats
from dmoverlay.mkupdates.diff import Change, Op
from dmoverlay.mkupdates.exclude import Excluded, check_kept, parse
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.listing import Blobs, Entry, read_side

LIVE_DIR, ROOTFS = "LiveOS", "rootfs.img"  # what build writes in squashfs.img


@dataclass(frozen=True)
class MkupdatesOptions:
    new: str  # the tree, or NEW: a directory or an archive
    output: Path | None  # None: only list (dry run)
    old: str | None = None  # OLD, for a difference
    format: Format = Format.CPIO
    all_root: bool = False  # every owner root's
    no_xattrs: bool = False  # leave xattrs out (cpio cannot carry them)
    allow_setuid: bool = False  # as apply's flags: what apply would refuse without them
    allow_xattrs: tuple[str, ...] = ()
    epoch: int | None = None  # SOURCE_DATE_EPOCH: no time newer
    force: bool = False
    sign: Path | None = None  # an OpenSSH key: OUTPUT.sig beside it (core.signature)
    scratch: Path | None = None  # a dry run's work directory goes here (None: $TMPDIR)
    exclude: tuple[str, ...] = ()  # patterns of names left as the target has them (exclude.py)


@dataclass(frozen=True)
class Made:
    """What went in (or would: `output` None), in order."""

    output: Path | None
    changes: tuple[Change, ...]
    members: tuple[Member, ...] = field(repr=False)

    def listing(self) -> list[tuple[str, str]]:
        """Each member's kind (`whiteout` for a whiteout) and the path it changes."""
        return [("whiteout" if c.op is Op.WHITEOUT else str(m.kind), c.name)
                for c, m in zip(self.changes, self.members, strict=True)]

    def lines(self) -> list[str]:
        return [f"{kind}\t{path}" for kind, path in self.listing()]

    def to_dict(self) -> dict[str, object]:
        return {"output": os.fspath(self.output) if self.output else None,
                "members": [{"kind": kind, "path": path} for kind, path in self.listing()]}


def make_updates(opts: MkupdatesOptions) -> Made:
    """Write the update that turns OLD (or nothing) into NEW to
    `opts.output`, or with no output only say what it would hold.  Raises
    ApplyRefused for what apply would refuse, UsageError or SourceError for
    the rest; nothing is left behind either way."""
    excluded = Excluded(parse(p) for p in opts.exclude)
    if opts.output is not None:
        _check_output(opts)
    with ExitStack() as stack:
        work = stack.enter_context(_workdir(opts.output, opts.scratch))
        blobs = Blobs(work) if opts.output is not None else None
        if blobs is not None:
            stack.callback(blobs.close)
        new = _side(stack, opts.new, work / "new", blobs, opts)
        old = _side(stack, opts.old, work / "old", None, opts) if opts.old else {}
        if excluded:
            whole_old, whole_new = diff.with_parents(old), diff.with_parents(new)
            old, new = excluded.without(whole_old), excluded.without(whole_new)
        changes = diff.difference(old, new)
        if excluded:
            check_kept(excluded, changes, whole_old, whole_new)
        members = diff.members(changes, diff.with_parents(new), epoch=opts.epoch)
        _judge(old, changes, members, opts)
        made = Made(opts.output, tuple(changes), tuple(members))
        if opts.output is None or blobs is None:
            return made
        try:
            written = write(members, new, blobs, work, opts)
            sig = signature.sign(written, opts.sign) if opts.sign is not None else None
            # an old signature never stands beside the new output
            signature.signature_path(opts.output).unlink(missing_ok=True)
            os.replace(written, opts.output)
            if sig is not None:
                os.replace(sig, signature.signature_path(opts.output))
        except OSError as exc:
            raise _write_failed(opts.output, exc) from None
        return made


def _side(stack: ExitStack, spec: str, staging: Path, blobs: Blobs | None,
          opts: MkupdatesOptions) -> dict[str, Entry]:
    reader = stack.enter_context(open_update(spec, staging=staging))
    inner = _live_rootfs(spec, reader)
    if inner is not None:  # a squashfs.img made by build: its root is the rootfs.img inside
        reader = stack.enter_context(open_update(inner, staging=staging / "rootfs"))
    with log.step(f"reading {spec}"):
        side = read_side(reader, blobs)
    return diff.normalized(side, all_root=opts.all_root, no_xattrs=opts.no_xattrs)


def _write_failed(output: Path, exc: OSError) -> ImageError:
    hint = "free some space or write it elsewhere" if exc.errno == errno.ENOSPC else None
    return ImageError(f"cannot write {output}: {exc.strerror}", hint=hint)


def _live_rootfs(spec: str, reader: UpdateReader) -> str | None:
    """`LiveOS/rootfs.img` in a mounted image that holds nothing else (as
    build makes squashfs.img), else None."""
    if os.path.isdir(spec) or not isinstance(reader, DirectoryReader):
        return None
    top = reader.root
    try:
        # LiveOS judged where it is, not where a link in the image points
        if os.listdir(top) != [LIVE_DIR] or (top / LIVE_DIR).is_symlink() \
                or os.listdir(top / LIVE_DIR) != [ROOTFS]:
            return None
    except OSError:
        return None
    inner = top / LIVE_DIR / ROOTFS
    return os.fspath(inner) if inner.is_file() and not inner.is_symlink() else None


def _check_output(opts: MkupdatesOptions) -> None:
    assert opts.output is not None
    out = opts.output
    if opts.sign is not None and not opts.sign.is_file():
        raise KeysError(f"{opts.sign}: no such key file",
                        hint="make one with: ssh-keygen -t ed25519 -f KEY")
    for there in (out, signature.signature_path(out)):
        if there.exists() and not opts.force:
            raise UsageError(f"{there} exists", hint="give --force to replace it")
    if out.is_dir():
        raise UsageError(f"{out} is a directory", hint="-o names the file to write")
    here = out.parent.resolve()
    for spec in (opts.new, opts.old):
        if spec and os.path.isdir(spec):
            top = Path(spec).resolve()
            if here == top or top in here.parents:
                raise UsageError(f"{out} is inside {spec}", hint="write it elsewhere")


@contextmanager
def _workdir(output: Path | None, scratch: Path | None) -> Iterator[Path]:
    """A private directory beside the output (the rename into place stays
    on one filesystem), or in `scratch` (else the temporary directory) for
    a listing."""
    where = output.parent if output is not None else scratch
    parent = os.fspath(where) if where is not None else None
    try:
        work = Path(tempfile.mkdtemp(prefix=".mkupdates-", dir=parent))
    except OSError as exc:
        raise UsageError(f"cannot write beside {output}: {exc.strerror}") from None
    try:
        yield work
    finally:
        discard_tree(work)


def _judge(old: Mapping[str, Entry], changes: Sequence[Change], members: Sequence[Member],
           opts: MkupdatesOptions) -> None:
    plan = check.judge(old, read_order(members, opts.format),
                       Options(allow_setuid=opts.allow_setuid, allow_xattrs=opts.allow_xattrs),
                       puts=[c.name for c in changes if c.op is Op.PUT])
    if opts.format is Format.CPIO:
        plan.refusals.extend(_cpio_refusals(members))
    if opts.format is Format.SQUASHFS:
        plan.refusals.extend(Refusal(m.name, why, "use --format tar.zst") for m in members
                             if (why := formats.squashfs_problem(m)) is not None)
    if not plan.ok:
        raise ApplyRefused(plan)


def _cpio_refusals(members: Sequence[Member]) -> list[Refusal]:
    found = []
    for m in members:
        why = formats.cpio_problem(m)
        if why is not None:
            hint = ("give --no-xattrs to leave them out, or --format tar.zst or squashfs"
                    if m.xattrs else "use --format tar.zst")
            found.append(Refusal(m.name, why, hint))
    return found


def read_order(members: Sequence[Member], fmt: Format) -> list[Member]:
    """The members in the order apply will read them: an archive's own
    order, or a mounted squashfs's directory walk (sorted names, so that a
    whiteout `.wh.-x` comes after the `-x` it is meant to clear)."""
    if fmt is not Format.SQUASHFS:
        return list(members)
    return sorted(members, key=lambda m: diff.sort_key(m.name))


def write(members: Sequence[Member], new: Mapping[str, Entry], blobs: Blobs, work: Path,
          opts: MkupdatesOptions) -> Path:
    """The update written in `work`, fsynced; its path (where a signature
    would be made, before it is renamed into place)."""
    def data(m: Member) -> Iterator[bytes]:
        if not m.size:  # a whiteout, or an empty file
            return iter(())
        return blobs.chunks(new[m.name].group)  # kept by the name it was read under

    when = _mkfs_time(members, opts)
    # the top first, as `find .` lists it: an update with nothing else in it
    # is still an archive apply reads (an empty tar or cpio is not one)
    members = [Member("", Kind.DIR, 0o755, mtime_ns=when * 10**9), *members]
    out = work / f"update.{opts.format.value}"
    with log.step(f"writing {opts.output}"):
        if opts.format is Format.CPIO:
            with open(out, "xb") as f:
                formats.write_cpio(members, data, f)
        elif opts.format is Format.TAR_ZST:
            plain = work / "update.tar"
            with open(plain, "xb") as f:
                formats.write_tar(members, data, f)
            formats.zstd(plain, out)
        else:
            formats.stage(members, data, work / "tree", top_time=when)
            formats.squashfs(work / "tree", out, mkfs_time=when, all_root=opts.all_root)
    _sync(out)
    return out


def _mkfs_time(members: Sequence[Member], opts: MkupdatesOptions) -> int:
    if opts.epoch is not None:
        return opts.epoch
    return max((m.mtime_ns // 10**9 for m in members), default=0)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o644 & ~_umask())
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
