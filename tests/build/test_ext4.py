"""rootfs.img's plan (size, inodes, UUID), its mkfs command line and the
debugfs script that fixes its inodes.  No tools run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmoverlay.build import ext4
from dmoverlay.build.source import Entry, Tree
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import ImageError, SourceError, UsageError
from dmoverlay.core.sizes import GiB, MiB

NS = 1_000_000_000


def tree(*entries: Entry, staged: bool = False) -> Tree:
    root = Entry("", Kind.DIR, 0o755, 0, 0, 5 * NS)
    return Tree(root=Path("/nowhere"), entries=[root, *entries], staged=staged)


def file(path: str, size: int = 0, **kw: object) -> Entry:
    return Entry(path, Kind.FILE, 0o644, 0, 0, 10 * NS, size=size, **kw)  # type: ignore[arg-type]


def test_default_plan_leaves_two_gib_free() -> None:
    t = tree(file("big", 100 * MiB))
    p = ext4.plan(t, size=None, free=None, label="L", fs_uuid=None, epoch=1)
    use = ext4.usage(t)
    free = p.blocks - use.blocks - ext4.overhead_blocks(p.blocks, p.inodes)
    assert 2 * GiB <= free * ext4.BLOCK < 2 * GiB + 8 * MiB
    assert use.blocks * ext4.BLOCK >= 100 * MiB


def test_overhead_grows_with_backup_groups() -> None:
    # 4 GiB: 32 groups, 8 of them (0, 1, 3, 5, 7, 9, 25, 27) with superblock copies
    assert ext4.backup_groups(32) == 8
    small = ext4.overhead_blocks(1 << 18, 1 << 16)
    large = ext4.overhead_blocks(1 << 20, 1 << 16)
    assert large - small > 4 * ext4.reserved_gdt_blocks(1 << 20)


def test_plan_has_an_inode_for_every_entry_and_the_free_space() -> None:
    many = tree(*[file(f"f{i}", 1) for i in range(50_000)])
    p = ext4.plan(many, size=None, free=16 * MiB, label="L", fs_uuid=None, epoch=1)
    assert p.inodes >= 50_000 + 16 * MiB // ext4.INODE_RATIO


def test_plan_refuses_a_size_too_small() -> None:
    with pytest.raises(UsageError, match="too small"):
        ext4.plan(tree(file("big", 100 * MiB)), size=50 * MiB, free=None, label="L",
                  fs_uuid=None, epoch=1)


def test_plan_refuses_size_and_free_together() -> None:
    with pytest.raises(UsageError):
        ext4.plan(tree(), size=GiB, free=GiB, label="L", fs_uuid=None, epoch=1)


def test_uuid_is_derived_from_the_tree() -> None:
    def uuid_of(t: Tree) -> str:
        return ext4.plan(t, size=None, free=None, label="L", fs_uuid=None, epoch=1).uuid

    a = uuid_of(tree(file("a", 1)))
    assert a == uuid_of(tree(file("a", 1)))
    assert a != uuid_of(tree(file("a", 2)))
    assert a != uuid_of(tree(file("b", 1)))
    given_uuid = "0b9d3c2a-5e1f-4a57-8c0d-2f1e3d4c5b6a"
    p = ext4.plan(tree(), size=None, free=None, label="L", fs_uuid=given_uuid, epoch=1)
    assert p.uuid == given_uuid and p.hash_seed != given_uuid


def test_journal_size_follows_mke2fs() -> None:
    assert ext4.journal_blocks(20_000) == 1024
    assert ext4.journal_blocks(524_288) == 16384  # 2 GiB: 64 MiB
    assert ext4.journal_blocks(10**9) == 262144


def test_mkfs_command_pins_what_makes_images_reproducible(tmp_path: Path) -> None:
    p = ext4.plan(tree(), size=None, free=None, label="Live", fs_uuid=None, epoch=42)
    argv = ext4.mkfs_argv(p, tmp_path / "r.img", tmp_path / "tree")
    joined = " ".join(argv)
    assert f"-U {p.uuid}" in joined and f"hash_seed={p.hash_seed}" in joined
    assert "lazy_itable_init=0" in joined and "-L Live" in joined
    assert argv[-3:] == [str(tmp_path / "tree"), str(tmp_path / "r.img"), str(p.blocks)]
    env = ext4.mkfs_env(p)
    assert env["E2FSPROGS_FAKE_TIME"] == "42"
    assert Path(env["MKE2FS_CONFIG"]).is_file()


def test_empty_directories_take_a_block_each() -> None:
    dirs = [Entry(f"d{i}", Kind.DIR, 0o755, 0, 0, 0) for i in range(3000)]
    assert ext4.usage(tree(*dirs)).blocks >= 3000


def script(t: Tree, **kw: object) -> list[bytes]:
    """The fixup script, with inode numbers 100, 101, ... in manifest order."""
    inodes = {e.path: 100 + i for i, e in enumerate(t.entries)}
    return ext4.fixup_script(t, epoch=100, all_root=bool(kw.get("all_root")),
                             value_file={b"v": Path("/x/v0")}, inodes=inodes).splitlines()


def test_directory_tree_only_gets_times() -> None:
    lines = script(tree(file("f", 1)))
    on_f = [line for line in lines if line.startswith(b"sif <101>")]
    assert {line.split()[2] for line in on_f} == {
        b"mtime_lo", b"mtime_extra", b"atime_lo", b"atime_extra", b"ctime_lo", b"ctime_extra",
        b"crtime_lo", b"crtime_extra"}
    assert lines[0].startswith(b"sif <100> ")  # the root
    assert b"sif <101> mtime_lo 10" in lines
    assert b"sif <101> ctime_lo 100" in lines  # the build time, later than mtime


def test_all_root_sets_owners() -> None:
    lines = script(tree(Entry("f", Kind.FILE, 0o644, 1000, 1000, 0)), all_root=True)
    assert b"sif <101> uid 0" in lines and b"sif <101> gid 0" in lines


def test_staged_tree_gets_modes_owners_devices_and_xattrs() -> None:
    t = tree(
        Entry("dev", Kind.DIR, 0o755, 0, 0, 0),
        Entry("dev/null", Kind.CHAR, 0o666, 0, 0, 0, rdev=(1, 3)),
        Entry("run/fifo", Kind.FIFO, 0o600, 0, 0, 0),
        Entry("bin/ping", Kind.FILE, 0o4755, 0, 5, 0, xattrs=(("security.capability", b"v"),)),
        Entry("bin/ping2", Kind.FILE, 0o4755, 0, 5, 0, link_to="bin/ping"),
        staged=True,
    )
    lines = script(t)
    at = lines.index(b"cd <101>")  # into dev/, by number
    assert lines[at + 1:at + 4] == [b'rm "./null"', b'mknod "null" c 1 3',
                                    b'sif "./null" mode 020666']
    assert b"sif <103> mode 010600" in lines  # the fifo: made by mkfs from the staged one
    assert b"sif <104> mode 0104755" in lines
    assert b"sif <104> gid 5" in lines
    assert b'ea_set -f "/x/v0" <104> "security.capability"' in lines
    assert not any(b"<105>" in line for line in lines), "a hardlink's inode is set once"


def test_no_name_reaches_the_script_but_a_device_node_s() -> None:
    hostile = 'x\nsif <2> uid 0 "'
    t = tree(Entry(hostile, Kind.DIR, 0o755, 0, 0, 0),
             Entry(f"{hostile}/f", Kind.FILE, 0o644, 0, 0, 0,
                   xattrs=(("user.a b\"c", b"v"),)), staged=True)
    text = b"\n".join(script(t))
    assert b"<2>" not in text and b'0 "' not in text  # nothing of the name
    assert b'ea_set -f "/x/v0" <102> "user.a b""c"' in text


@pytest.mark.parametrize(("name", "words"), [
    ("user.x\ndump <2> /tmp/out", "control character"),
    ("nonamespace", "no namespace"),
    ("user.", "no namespace"),
    ("user." + "n" * 300, "longer than 255"),
])
def test_xattr_names_refused(name: str, words: str) -> None:
    t = tree(file("f", xattrs=((name, b"v"),)), staged=True)
    with pytest.raises(SourceError, match=words):
        script(t)


def test_device_node_named_with_a_newline_is_refused() -> None:
    t = tree(Entry("a\nb", Kind.CHAR, 0o666, 0, 0, 0, rdev=(1, 3)), staged=True)
    with pytest.raises(ImageError, match="newline"):
        script(t)


def test_lost_found_gets_the_build_time() -> None:
    assert b'sif "/lost+found" mtime_lo 100' in script(tree())


def test_a_device_named_like_an_inode_number_goes_by_path() -> None:
    """debugfs reads "<12>", quoted or not, as inode 12: after mknod, the
    node is named "./<12>"."""
    lines = script(tree(Entry("<12>", Kind.CHAR, 0o600, 0, 0, 0, rdev=(1, 3)), staged=True))
    assert b'rm "./<12>"' in lines and b'mknod "<12>" c 1 3' in lines
    assert b'sif "./<12>" mode 020600' in lines
