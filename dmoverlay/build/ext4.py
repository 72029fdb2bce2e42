"""rootfs.img: the ext4 filesystem inside the squashfs.

Made without privilege: `mkfs.ext4 -d` copies names and data from a tree,
then one debugfs session sets what mkfs cannot be trusted with (times to the
nanosecond, owners and modes of an unpacked archive, device nodes, xattrs).
The sizing and the debugfs script are pure and tested on their own."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dmoverlay.build.source import Entry, Tree
from dmoverlay.core import debugfs
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import SourceError, UsageError
from dmoverlay.core.run import run
from dmoverlay.core.sizes import MiB, format_size, round_up
from dmoverlay.core.tarread import check_xattr_name

BLOCK = 4096
INODE_SIZE = 256
INODE_RATIO = 16384
DEFAULT_FREE = 2048 * MiB
# Names we derive UUIDs under, so the same tree gives the same UUID.
UUID_NAMESPACE = uuid.UUID("6c1b5f0e-3d8e-4f51-9a57-4a0c5d2f7e11")


@dataclass(frozen=True)
class Usage:
    """What the tree needs in the filesystem, before any free space."""

    blocks: int
    inodes: int


@dataclass(frozen=True)
class Ext4Plan:
    size: int  # bytes, a whole number of blocks
    inodes: int
    label: str
    uuid: str
    hash_seed: str
    epoch: int  # seconds: mkfs time, and the ctime of every inode

    @property
    def blocks(self) -> int:
        return self.size // BLOCK


def usage(tree: Tree) -> Usage:
    """Blocks and inodes the tree's own content takes."""
    blocks = 0
    inodes = 0
    names_per_dir: dict[str, int] = {}
    for e in tree.entries:
        if e.kind is Kind.DIR:
            names_per_dir.setdefault(e.path, 0)  # even an empty one takes a block
        if e.path:
            parent = e.path.rpartition("/")[0]
            names_per_dir[parent] = names_per_dir.get(parent, 0) + len(e.path) - len(parent) + 12
        if e.link_to:
            continue
        inodes += 1
        if e.kind is Kind.FILE:
            blocks += -(-e.size // BLOCK)
        elif e.kind is Kind.SYMLINK and len(os.fsencode(e.target)) >= 60:
            blocks += 1
        if sum(len(k) + len(v) + 20 for k, v in e.xattrs) > 96:
            blocks += 1
    blocks += sum(max(1, -(-n // BLOCK)) for n in names_per_dir.values())
    # extent tree blocks of large or fragmented files, directory index blocks
    blocks += blocks // 100
    return Usage(blocks=blocks, inodes=inodes)


def journal_blocks(fs_blocks: int) -> int:
    """mke2fs's default journal size for a filesystem of 4 KiB blocks."""
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192),
                        (4096 * 1024, 16384), (8192 * 1024, 32768),
                        (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if fs_blocks < limit:
            return size
    return 262144


# Geometry of the filesystems mke2fs makes from dmoverlay/mke2fs.conf.
BLOCKS_PER_GROUP = 8 * BLOCK  # one block of block bitmap
DESC_PER_BLOCK = BLOCK // 64  # the 64bit feature's group descriptors
INODES_PER_ITABLE_BLOCK = BLOCK // INODE_SIZE
# Root directory, lost+found (16 KiB) and the journal's and resize inode's
# own tree blocks: what a fresh filesystem uses beyond the counted metadata.
FRESH_FS_BLOCKS = 64


def groups(blocks: int) -> int:
    return -(-blocks // BLOCKS_PER_GROUP)


def backup_groups(n_groups: int) -> int:
    """How many of the first `n_groups` groups carry a superblock and
    descriptor copy under sparse_super: 0, 1 and the powers of 3, 5 and 7."""
    found = {g for g in (0, 1) if g < n_groups}
    for base in (3, 5, 7):
        power = base
        while power < n_groups:
            found.add(power)
            power *= base
    return len(found)


def reserved_gdt_blocks(blocks: int) -> int:
    """Descriptor blocks mke2fs reserves (resize_inode) so the filesystem can
    grow 1024-fold or to 2^32 blocks: up to 1024 in every backup group."""
    max_blocks = min(blocks * 1024, 0xFFFFFFFF)
    growth = -(-groups(max_blocks) // DESC_PER_BLOCK)
    descriptors = -(-groups(blocks) // DESC_PER_BLOCK)
    return max(0, min(BLOCK // 4, growth - descriptors))


def inode_count(blocks: int, inodes: int) -> int:
    """What mke2fs makes of `-N inodes`: whole inode-table blocks in every group."""
    n = groups(blocks)
    return round_up(-(-inodes // n), INODES_PER_ITABLE_BLOCK) * n


def overhead_blocks(blocks: int, inodes: int) -> int:
    """Blocks mke2fs takes for itself in a filesystem of `blocks` with
    `inodes`: superblock and descriptor copies with their reserved growth
    blocks in each backup group, bitmaps, inode tables, the journal."""
    n = groups(blocks)
    per_backup = 1 + -(-n // DESC_PER_BLOCK) + reserved_gdt_blocks(blocks)
    itable = inode_count(blocks, inodes) // INODES_PER_ITABLE_BLOCK
    return (backup_groups(n) * per_backup + 2 * n + itable + journal_blocks(blocks)
            + FRESH_FS_BLOCKS)


def inodes_for(use: Usage, blocks: int) -> int:
    """One inode per 16 KiB (mke2fs's ratio), or, for a tree of many small
    files, the tree's inodes plus one per 16 KiB of room left."""
    by_ratio = blocks * BLOCK // INODE_RATIO
    by_tree = use.inodes + 16 + max(0, blocks - use.blocks) * BLOCK // INODE_RATIO
    return max(by_ratio, by_tree)


def fitting_blocks(use: Usage, free_blocks: int) -> int:
    """The smallest filesystem holding the content, mke2fs's own blocks (which
    grow with the size) and `free_blocks` more."""
    blocks = use.blocks + free_blocks
    while (need := use.blocks + free_blocks
           + overhead_blocks(blocks, inodes_for(use, blocks))) > blocks:
        blocks = need
    return blocks


def minimum_size(use: Usage) -> int:
    """The smallest filesystem that holds the content with nothing free."""
    return fitting_blocks(use, 0) * BLOCK


def plan(tree: Tree, *, size: int | None, free: int | None, label: str,
         fs_uuid: str | None, epoch: int) -> Ext4Plan:
    """Choose the size and inode count.  `size` is the whole filesystem;
    `free` is room left beyond the content (the live root writes there)."""
    if size is not None and free is not None:
        raise UsageError("--size and --free exclude each other", hint="give one of them")
    if len(label.encode()) > 16:
        raise UsageError(f"ext4 label {label!r} is longer than 16 bytes")
    use = usage(tree)
    if size is None:
        free_blocks = -(-(DEFAULT_FREE if free is None else free) // BLOCK)
        blocks = fitting_blocks(use, free_blocks)
    else:
        blocks = size // BLOCK
        if use.blocks + overhead_blocks(blocks, inodes_for(use, blocks)) > blocks:
            raise UsageError(f"--size {format_size(size)} is too small: the tree needs about "
                             f"{format_size(minimum_size(use))}",
                             hint="leave out --size, or use --free")
    size = blocks * BLOCK
    fs_uuid = fs_uuid or str(derived_uuid(tree, label=label, size=size, epoch=epoch))
    return Ext4Plan(size=size, inodes=inodes_for(use, blocks), label=label, uuid=fs_uuid,
                    hash_seed=hash_seed(fs_uuid, UUID_NAMESPACE), epoch=epoch)


def hash_seed(fs_uuid: str, namespace: uuid.UUID) -> str:
    """The seed of the directory hashes, derived from the filesystem's UUID
    (mke2fs would choose one at random, and directories would differ)."""
    return str(uuid.uuid5(namespace, "hash_seed:" + fs_uuid))


def derived_uuid(tree: Tree, *, label: str, size: int, epoch: int) -> uuid.UUID:
    """A UUID that is the same for the same tree and options, and differs when
    any name, type, mode, owner, time, size or link changes (file contents are
    not read for it)."""
    digest = hashlib.sha256(f"{label}\0{size}\0{epoch}\0".encode())
    for e in tree.entries:
        digest.update(os.fsencode(e.path) + b"\0")
        digest.update(f"{e.kind}:{e.mode}:{e.uid}:{e.gid}:{e.mtime_ns}:{e.size}:"
                      f"{e.rdev}:{e.link_to}\0".encode("utf-8", "surrogateescape"))
        digest.update(os.fsencode(e.target) + b"\0")
        for name, value in e.xattrs:
            digest.update(os.fsencode(name) + b"=" + value + b"\0")
    return uuid.uuid5(UUID_NAMESPACE, digest.hexdigest())


def mkfs_argv(p: Ext4Plan, image: Path, root: Path | None = None, *,
              offset: int = 0) -> list[str]:
    """The one mkfs.ext4 command line, for rootfs.img and for a disk's live
    partition alike: a filesystem as `p` plans it at byte `offset` of the new
    file `image`, filled from the tree at `root` if one is given."""
    extended = [
        *([f"offset={offset}"] if offset else []),
        # A new file holds nothing to discard.
        "nodiscard", f"hash_seed={p.hash_seed}",
        # Zero inode tables and journal now (as holes: free in the squashfs),
        # or the kernel's lazy init would write them into the COW at boot.
        "lazy_itable_init=0", "lazy_journal_init=0", "root_owner=0:0",
    ]
    return [
        # -T default: the pinned profile defines no "small" or "floppy" types,
        # and mke2fs warns about each one missing.
        "mkfs.ext4", "-q", "-F", "-t", "ext4", "-T", "default", "-b", str(BLOCK),
        "-I", str(INODE_SIZE), "-N", str(p.inodes), "-m", "0", "-L", p.label, "-U", p.uuid,
        "-E", ",".join(extended),
        *(["-d", os.fspath(root)] if root is not None else []),
        os.fspath(image), str(p.blocks),
    ]


def mkfs_env(p: Ext4Plan) -> dict[str, str]:
    conf = resources.files("dmoverlay") / "mke2fs.conf"
    return {"MKE2FS_CONFIG": os.fspath(Path(str(conf))), "E2FSPROGS_FAKE_TIME": str(p.epoch)}


# ------------------------------------------------------------------- debugfs

def check_xattr(path: str, name: str) -> None:
    """An xattr name ext4 can hold and debugfs can be given, or one clear
    error."""
    check_xattr_name(path, name)
    if not debugfs.scriptable(name):
        raise SourceError(f"{path!r}: xattr name {name!r} holds a control character "
                          "(CR or LF)", hint="debugfs cannot be given it; remove it")


def fixup_script(tree: Tree, *, epoch: int, all_root: bool,
                 value_file: dict[bytes, Path], inodes: dict[str, int]) -> bytes:
    """The debugfs commands that make each inode what the manifest says.
    `value_file` maps each xattr value to the file holding it (filled in by
    the caller, which writes them: debugfs reads binary values from files;
    a relative name is found in the directory debugfs runs in);
    `inodes` maps each path to its inode number (debugfs.inode_numbers).

    Commands name inodes by number: no name of the source reaches the script
    (a name is any bytes), and debugfs looks nothing up.  Only a device node
    is made by name, in its directory, since mkfs cannot make one from a
    tree unpacked without privilege."""
    lines: list[bytes] = []
    for e in tree.entries:
        if e.link_to:
            continue
        if tree.staged and e.kind in (Kind.CHAR, Kind.BLOCK):
            lines += _mknod(e, inodes)
            lines += _inode_fixes(e, debugfs.argument("./" + _name(e)), tree, epoch=epoch,
                                  all_root=all_root, value_file=value_file)
            lines.append(debugfs.command(b"cd", debugfs.inode(debugfs.ROOT_INODE)))
        else:
            lines += _inode_fixes(e, debugfs.inode(inodes[e.path]), tree, epoch=epoch,
                                  all_root=all_root, value_file=value_file)
    if not any(e.path == "lost+found" for e in tree.entries):
        # made by mkfs itself, with a time that overflows past 2038 in 1.47.0
        lines += debugfs.set_all_times(debugfs.argument("/lost+found"), epoch * 1_000_000_000)
    return debugfs.script(lines)


def _name(e: Entry) -> str:
    return e.path.rpartition("/")[2]


def _inode_fixes(e: Entry, target: bytes, tree: Tree, *, epoch: int, all_root: bool,
                 value_file: dict[bytes, Path]) -> list[bytes]:
    lines = []
    # mkfs makes the root directory itself (root_owner=0:0, mode 0755)
    exact = tree.staged or not e.path
    if exact:
        lines.append(debugfs.set_mode(target, e.st_mode))
    if exact or all_root:
        lines += debugfs.set_owner(target, *((0, 0) if all_root else (e.uid, e.gid)))
    mtime_ns = e.mtime_ns if e.mtime_ns or e.path else epoch * 1_000_000_000
    ctime_ns = max(mtime_ns, epoch * 1_000_000_000)
    lines += debugfs.set_times(target, {b"mtime": mtime_ns, b"atime": mtime_ns,
                                        b"ctime": ctime_ns, b"crtime": ctime_ns})
    if tree.staged:
        for name, value in e.xattrs:
            check_xattr(e.path, name)
            lines.append(debugfs.command(b"ea_set -f", debugfs.argument(value_file[value]),
                                         target, debugfs.argument(name)))
    return lines


def _mknod(e: Entry, inodes: dict[str, int]) -> list[bytes]:
    """Replace the placeholder of a device node by the node, from inside its
    directory (entered by number).  mknod takes its name as it is; other
    commands read "<12>", quoted or not, as an inode number, and are given
    "./<12>" instead."""
    spec = {Kind.CHAR: b"c %d %d" % e.rdev, Kind.BLOCK: b"b %d %d" % e.rdev}[e.kind]
    parent = inodes[e.path.rpartition("/")[0]]
    return [debugfs.command(b"cd", debugfs.inode(parent)),
            debugfs.command(b"rm", debugfs.argument("./" + _name(e))),
            debugfs.command(b"mknod", debugfs.argument(_name(e)), spec)]


def make(tree: Tree, image: Path, p: Ext4Plan, *, all_root: bool, scratch: Path) -> None:
    """Write rootfs.img at `image` (a new file)."""
    with open(image, "xb") as f:
        f.truncate(p.size)
    run(mkfs_argv(p, image, tree.root), env=mkfs_env(p))
    values: dict[bytes, Path] = {}
    for e in tree.entries:
        for _, value in e.xattrs:
            if value not in values:
                # named from scratch, where debugfs runs: no byte of the
                # output's path (a newline) goes into the script
                values[value] = Path(f"xattr-{len(values)}")
                (scratch / values[value]).write_bytes(value)
    inodes = debugfs.inode_numbers(
        image, (e.path for e in tree.entries if not e.link_to),
        {e.path for e in tree.entries if e.kind is Kind.DIR}, scratch=scratch)
    script = fixup_script(tree, epoch=p.epoch, all_root=all_root, value_file=values,
                          inodes=inodes)
    debugfs.run_script(image, script, scratch=scratch, name="fixup.debugfs", write=True,
                       epoch=p.epoch)
