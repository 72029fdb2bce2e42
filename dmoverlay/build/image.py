"""`dmoverlay build`: a root tree or tarball -> LiveOS/squashfs.img holding
LiveOS/rootfs.img, without root, reproducibly.  Work happens in a private
directory beside the output, which is renamed into place only at the end."""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dmoverlay.build import ext4, squashfs
from dmoverlay.build.source import Tree, is_tar, read_directory, read_tar
from dmoverlay.core import log
from dmoverlay.core.errors import ImageError, SourceError, UsageError
from dmoverlay.core.run import require_tools
from dmoverlay.core.sizes import format_size
from dmoverlay.core.tree import discard_tree

DEFAULT_LABEL = "LiveOS_rootfs"
ROOTFS = "LiveOS/rootfs.img"


@dataclass(frozen=True)
class DiskOptions:
    path: Path
    label: str = "LIVE"
    overlay_size: int | None = None


@dataclass(frozen=True)
class BuildOptions:
    source: Path
    output: Path
    label: str = DEFAULT_LABEL
    size: int | None = None
    free: int | None = None
    squash: squashfs.SquashOptions = field(default_factory=squashfs.SquashOptions)
    all_root: bool = False
    force: bool = False
    fs_uuid: str | None = None
    epoch: int | None = None  # None: the newest mtime in the tree
    disk: DiskOptions | None = None


@dataclass(frozen=True)
class BuildResult:
    output: Path
    rootfs: ext4.Ext4Plan
    entries: int
    data_bytes: int
    squashfs_bytes: int
    disk: Path | None

    def to_dict(self) -> dict[str, object]:
        """The summary `build --json` prints."""
        return {
            "output": str(self.output),
            "squashfs_bytes": self.squashfs_bytes,
            "entries": self.entries,
            "data_bytes": self.data_bytes,
            "rootfs": {"size": self.rootfs.size, "inodes": self.rootfs.inodes,
                       "label": self.rootfs.label, "uuid": self.rootfs.uuid,
                       "epoch": self.rootfs.epoch},
            "disk": str(self.disk) if self.disk else None,
        }


def build(opts: BuildOptions) -> BuildResult:
    require_tools("mkfs.ext4", "debugfs", "mksquashfs")
    _check_paths(opts)
    work = Path(tempfile.mkdtemp(prefix=f".{opts.output.name}.", dir=opts.output.parent))
    try:
        return _build_in(work, opts)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ImageError(f"no space left in {opts.output.parent}",
                             hint="free some space or write the image elsewhere") from None
        raise
    finally:
        discard_tree(work)


def _build_in(work: Path, opts: BuildOptions) -> BuildResult:
    with log.step(f"reading {opts.source}"):
        tree = _read_source(opts.source, work / "tree")
        log.info(f"{len(tree.entries)} entries, {format_size(tree.data_bytes())} of data")
    epoch = opts.epoch if opts.epoch is not None else tree.newest_mtime()
    plan = ext4.plan(tree, size=opts.size, free=opts.free, label=opts.label,
                     fs_uuid=opts.fs_uuid, epoch=epoch)
    _check_space(opts, tree, work)
    live = work / "squash" / "LiveOS"
    live.mkdir(parents=True)
    with log.step(f"making rootfs.img ({format_size(plan.size)} ext4, label {plan.label})"):
        scratch = work / "scratch"
        scratch.mkdir()
        ext4.make(tree, live / "rootfs.img", plan, all_root=opts.all_root, scratch=scratch)
    partial = work / "squashfs.img"
    with log.step(f"compressing into squashfs.img ({opts.squash.compressor})"):
        squashfs.make(work / "squash", partial, opts.squash, epoch=epoch)
        _fsync(partial)
    disk_partial = _make_disk(opts, partial, work, epoch)
    if opts.disk is not None and disk_partial is not None:
        os.replace(disk_partial, opts.disk.path)
    squashfs_bytes = partial.stat().st_size
    os.replace(partial, opts.output)
    log.info(f"wrote {opts.output} ({format_size(squashfs_bytes)})")
    return BuildResult(output=opts.output, rootfs=plan, entries=len(tree.entries),
                       data_bytes=tree.data_bytes(), squashfs_bytes=squashfs_bytes,
                       disk=opts.disk.path if opts.disk else None)


def _make_disk(opts: BuildOptions, squashfs_img: Path, work: Path, epoch: int) -> Path | None:
    if opts.disk is None:
        return None
    from dmoverlay.build import disk  # pyparted is needed only here

    partial = work / "disk.img"
    scratch = work / "disk-scratch"
    scratch.mkdir()
    with log.step(f"making disk image {opts.disk.path}"):
        disk.make_disk(squashfs=squashfs_img, disk=partial, label=opts.disk.label,
                       overlay_size=opts.disk.overlay_size, epoch=epoch, scratch=scratch)
        _fsync(partial)
    return partial


def _read_source(source: Path, staging: Path) -> Tree:
    if source.is_dir():
        return read_directory(source)
    if source.is_file():
        if not is_tar(source):
            raise SourceError(f"{source}: neither a directory nor a tar archive",
                              hint="give a root tree, or a tar archive (plain, gz, xz, bz2, zst)")
        return read_tar(source, staging)
    raise SourceError(f"{source}: neither a directory nor a tar archive")


def _check_paths(opts: BuildOptions) -> None:
    src = opts.source
    try:
        os.stat(src)
    except OSError as exc:
        raise SourceError(f"{src}: {(exc.strerror or str(exc)).lower()}") from None
    if not os.access(src, os.R_OK):
        raise SourceError(f"{src}: permission denied")
    check_outputs(opts)
    for out in [opts.output] + ([opts.disk.path] if opts.disk else []):
        if out.resolve().is_relative_to(src.resolve()) and src.is_dir():
            raise UsageError(f"{out} is inside the source tree",
                             hint="write the image outside the tree it is built from")


def check_outputs(opts: BuildOptions) -> None:
    """The output (and disk image) can be written: before the long steps."""
    outputs = [opts.output] + ([opts.disk.path] if opts.disk else [])
    if opts.disk and opts.disk.path.resolve() == opts.output.resolve():
        raise UsageError("the disk image and the squashfs image are the same file")
    for out in outputs:
        if not out.parent.is_dir():
            raise UsageError(f"{out.parent}: no such directory")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise UsageError(f"{out.parent}: not writable")
        if os.path.lexists(out):
            if not opts.force:
                raise UsageError(f"{out} exists", hint="use --force to replace it")
            if out.is_dir():
                raise UsageError(f"{out} is a directory")


def _check_space(opts: BuildOptions, tree: Tree, work: Path) -> None:
    """Before the long steps: room for the ext4 data and a squashfs no larger
    than it (the disk image, if asked for, holds another copy)."""
    data = ext4.minimum_size(ext4.usage(tree))
    need = data * (3 if opts.disk else 2)
    st = os.statvfs(work)
    have = st.f_bavail * st.f_frsize
    if have < need:
        raise ImageError(f"not enough space in {opts.output.parent}: need about "
                         f"{format_size(need)}, {format_size(have)} free",
                         hint="free some space or write the image elsewhere")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

