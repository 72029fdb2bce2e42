"""Applying updates onto a root: links kept and followed inside the root,
nothing written outside it, each file atomic, all or nothing, undoable."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dmoverlay.apply.execute import (
    ApplyOptions,
    ApplyRefused,
    Spool,
    apply_members,
    execute,
    read_all,
    rollback,
)
from dmoverlay.apply.inroot import Trees
from dmoverlay.apply.plan import Op, Options, make_plan
from dmoverlay.apply.readers import open_update
from dmoverlay.core.entries import Kind, Member
from dmoverlay.core.errors import ImageError
from tests.applykit import apply, d, f, hard, link, make_root, other, snapshot
from tests.conftest import small_tmpfs


@pytest.fixture
def live(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, run = make_root(tmp_path / "live")
    return tmp_path, root, run


def test_file_under_a_linked_directory_lands_in_its_target(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [d("lib"), f("lib/libfoo.so", b"new libfoo\n"), f("lib64/libbar.so"),
                           f("bin/tool", b"new tool\n", 0o755)])
    assert os.readlink(root / "lib") == "usr/lib"
    assert os.readlink(root / "lib64") == "/usr/lib"
    assert os.readlink(root / "bin") == "/usr/bin"
    assert (root / "usr/lib/libfoo.so").read_bytes() == b"new libfoo\n"
    assert (root / "usr/lib/libbar.so").is_file()
    assert (root / "usr/bin/tool").read_bytes() == b"new tool\n"


def test_absolute_link_is_followed_inside_the_root_never_to_the_host(
        live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("lib64/dmoverlay-test-canary.so")])
    assert (root / "usr/lib/dmoverlay-test-canary.so").exists()
    assert not Path("/usr/lib/dmoverlay-test-canary.so").exists()


def test_a_file_over_a_symlink_replaces_the_link(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("etc/resolv.conf", b"nameserver 10.0.0.1\n")])
    assert not (root / "etc/resolv.conf").is_symlink()
    assert (root / "etc/resolv.conf").read_bytes() == b"nameserver 10.0.0.1\n"
    assert (run / "resolv.conf").read_text() == "nameserver 127.0.0.1\n"


def test_existing_directory_modes_are_left_alone(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [d("var/log", 0o755), f("var/log/new.log")])
    assert os.stat(root / "var/log").st_mode & 0o7777 == 0o2750


def test_new_directories_get_their_modes(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [d("opt", 0o711), d("opt/app", 0o750), f("opt/app/x")])
    assert os.stat(root / "opt").st_mode & 0o7777 == 0o711
    assert os.stat(root / "opt/app").st_mode & 0o7777 == 0o750
    assert os.stat(root / "opt/app").st_mtime_ns == 1_500_000_000 * 10**9


def test_run_entries_go_to_the_live_run(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("run/install/updates.conf", b"x\n")])
    assert (run / "install/updates.conf").read_bytes() == b"x\n"
    assert list((root / "run").iterdir()) == []


def test_metadata_is_set(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("etc/secret", b"s\n", 0o600, uid=123, gid=45,
                             xattrs=(("user.origin", b"update"),))])
    st = os.lstat(root / "etc/secret")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 123, 45)
    assert st.st_mtime_ns == 1_600_000_000 * 10**9
    assert os.getxattr(root / "etc/secret", "user.origin") == b"update"


def test_setuid_allowed_with_the_option(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("usr/bin/su2", mode=0o4755)], allow_setuid=True)
    assert os.stat(root / "usr/bin/su2").st_mode & 0o7777 == 0o4755


def test_hardlinks_stay_hardlinks(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    apply(top, root, run, [f("usr/bin/a", b"a\n"), hard("usr/bin/b", "usr/bin/a")])
    assert os.stat(root / "usr/bin/a").st_ino == os.stat(root / "usr/bin/b").st_ino


def test_whiteout_removes_and_rollback_restores(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    before = snapshot(root)
    apply(top, root, run, [other("etc/.wh.keep.d", Kind.FILE), other("etc/.wh.os-release",
                                                                     Kind.FILE)])
    assert not (root / "etc/keep.d").exists() and not (root / "etc/os-release").exists()
    rollback(ApplyOptions(root, run))
    assert snapshot(root) == before


def test_replacing_a_running_binary_works(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    binary = root / "usr/bin/sleeper"
    shutil.copy("/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "30"])
    try:
        with pytest.raises(OSError):
            open(binary, "r+b").close()  # writing in place: ETXTBSY
        apply(top, root, run, [f("usr/bin/sleeper", b"#!/bin/sh\n", 0o755)])
        assert binary.read_bytes() == b"#!/bin/sh\n"
    finally:
        proc.kill()
        proc.wait()


def test_rollback_restores_the_tree_exactly(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    before_root, before_run = snapshot(root), snapshot(run)
    result = apply(top, root, run, [
        d("lib"), f("lib/libfoo.so", b"new\n"), f("etc/resolv.conf"), d("opt"), f("opt/x"),
        f("run/y"), other("etc/keep.d/.wh.a.conf", Kind.FILE), link("usr/bin/t2", "tool"),
    ])
    assert result.plan.count(Op.REPLACE) == 2
    assert snapshot(root) != before_root
    assert rollback(ApplyOptions(root, run)) == result.txn
    assert snapshot(root) == before_root
    assert snapshot(run) == before_run
    assert not (root / ".dmoverlay").exists()


def test_a_name_made_after_planning_goes_to_the_journal(live: tuple[Path, Path, Path]) -> None:
    """A file planned as new whose name came to be before the rename: it is
    exchanged like a replaced one, and rollback puts it back."""
    top, root, run = live
    member, data = f("etc/new.conf", b"new\n")
    spool = Spool(top)
    try:
        spool.add(member.name, io.BytesIO(data), len(data))
        with Trees(os.fspath(root), os.fspath(run)) as trees:
            plan = make_plan(trees, [member], Options())
            assert [a.op for a in plan.actions] == [Op.CREATE]
            (root / "etc/new.conf").write_bytes(b"made meanwhile\n")
            before = snapshot(root)
            execute(trees, plan, spool, "000001")
    finally:
        spool.close()
    assert (root / "etc/new.conf").read_bytes() == b"new\n"
    assert rollback(ApplyOptions(root, run)) == "000001"
    assert snapshot(root) == before


def test_two_applies_roll_back_one_at_a_time(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    first = snapshot(root)
    apply(top, root, run, [f("etc/os-release", b"ID=one\n")])
    second = snapshot(root)
    apply(top, root, run, [f("etc/os-release", b"ID=two\n")])
    rollback(ApplyOptions(root, run))
    assert snapshot(root) == second
    rollback(ApplyOptions(root, run))
    assert snapshot(root) == first
    assert rollback(ApplyOptions(root, run)) is None


def test_dry_run_writes_nothing(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    before = snapshot(top)
    result = apply(top, root, run, [f("lib/libfoo.so"), f("opt/new")], dry_run=True)
    assert [a.op for a in result.plan.actions] == [Op.FOLLOW, Op.REPLACE, Op.MKDIR, Op.CREATE]
    assert snapshot(top) == before


# ------------------------------------------------------------------ refusals

REFUSED = [
    ("dotdot", [f("../evil")], "'..'"),
    ("dotdot-inside", [f("usr/../../evil")], "'..'"),
    ("absolute", [f("/etc/evil")], "absolute"),
    ("dot", [f("usr/./x")], "'.' component"),
    ("empty", [f("usr//x")], "empty"),
    ("nul", [f("usr/x\0y")], "NUL"),
    ("control", [f("usr/x\ny")], "control character"),
    ("long-component", [f("usr/" + "x" * 256)], "longer than 255"),
    ("long-path", [f("/".join(["d" * 200] * 21))], "longer than 4095"),
    ("journal", [f(".dmoverlay/journal/000001/log")], "keeps for its journal"),
    ("temporary-name", [f("usr/.dmoverlay-000001-0")], "keeps for its journal"),
    ("own-symlink", [link("usr/mine", "/etc"), f("usr/mine/passwd")], "update itself creates"),
    ("own-symlink-dir", [link("usr/mine", "/etc"), d("usr/mine")], "update itself creates"),
    ("link-loop", [f("loop/x")], "too many levels"),
    ("hardlink-outside", [hard("usr/h", "/etc/shadow")], "not an earlier file"),
    ("hardlink-not-yet-seen", [hard("usr/h", "usr/later"), f("usr/later")], "not an earlier"),
    ("char-device", [other("usr/null", Kind.CHAR)], "char"),
    ("block-device", [other("usr/sda", Kind.BLOCK)], "block"),
    ("fifo", [other("usr/fifo", Kind.FIFO)], "fifo"),
    ("socket", [other("usr/sock", Kind.SOCKET)], "socket"),
    ("setuid", [f("usr/bin/su", mode=0o4755)], "setuid"),
    ("setgid", [f("usr/bin/wall", mode=0o2755)], "setuid/setgid"),
    ("file-over-nonempty-dir", [f("etc/keep.d")], "non-empty directory"),
    ("dir-over-file", [d("etc/os-release")], "directory over a file"),
    ("proc", [f("proc/sys/kernel/x")], "/proc"),
    ("sys", [f("sys/x")], "sysfs"),
    ("dev", [f("dev/x")], "devtmpfs"),
    ("tmp", [f("tmp/x")], "tmpfs"),
    ("proc-via-link", [f("kernel/x")], "/proc"),
]


@pytest.mark.parametrize(("case", "entries", "words"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_and_nothing_written(live: tuple[Path, Path, Path], case: str,
                                     entries: list[tuple[Member, bytes]], words: str) -> None:
    top, root, run = live
    os.symlink("loop2", root / "loop")
    os.symlink("loop", root / "loop2")
    os.symlink("/proc", root / "kernel")
    before = snapshot(top)
    good = [f("usr/fine")]  # refusal is all or nothing: the good entry is not written either
    with pytest.raises(ApplyRefused) as caught:
        apply(top, root, run, good + entries)
    assert words in caught.value.message, caught.value.message
    assert snapshot(top) == before


def test_all_refusals_are_listed(live: tuple[Path, Path, Path]) -> None:
    top, root, run = live
    with pytest.raises(ApplyRefused) as caught:
        apply(top, root, run, [f("../a"), f("/b"), f("tmp/c")])
    assert len(caught.value.plan.refusals) == 3
    assert "and 2 more" in caught.value.message


@pytest.mark.root
def test_an_update_that_does_not_fit_is_refused_before_writing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "size=4m,nr_inodes=200") as small:
        root, run = make_root(small / "live")
        before = snapshot(small)
        with pytest.raises(ImageError, match="does not fit"):
            apply(tmp_path, root, run, [f("usr/big", os.urandom(6 << 20))])
        with pytest.raises(ImageError, match="inodes"):
            apply(tmp_path, root, run, [f(f"usr/f{i}") for i in range(300)])
        assert snapshot(small) == before


def test_an_update_larger_than_the_cow_left_is_refused(live: tuple[Path, Path, Path]) -> None:
    """The COW numbers come from dmsetup on a real overlay (tested in the VM);
    here a fake stands for an overlay with 1 MiB left."""
    top, root, run = live
    before = snapshot(top)
    asked: list[str] = []

    def one_mib_left(path: str) -> int:
        asked.append(path)
        return 1 << 20

    with pytest.raises(ImageError, match="COW store"):
        apply(top, root, run, [f("usr/big", bytes(2 << 20))], cow_free=one_mib_left)
    assert asked == [str(root)]
    assert snapshot(top) == before


@pytest.mark.root
def test_data_larger_than_the_staging_room_is_refused(tmp_path: Path) -> None:
    from dmoverlay.apply.execute import Spool

    with small_tmpfs(tmp_path / "run", "size=20m") as small:
        spool = Spool(small)
        with pytest.raises(ImageError, match="room left to stage"):
            spool.add("bomb", io.BytesIO(b""), 8 << 20)  # the header says 8 MiB: refused first
        spool.close()


def _update_tree(top: Path) -> Path:
    tree = top / "update"
    (tree / "usr/lib").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (tree / "usr/lib" / name).write_bytes(name.encode() * 3000)
    return tree


def _packed(tree: Path, how: str) -> Path:
    if how == "directory":
        return tree
    if how == "squashfs":
        image = tree.parent / "update.img"
        subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet",
                        "-no-progress"], check=True, stdout=subprocess.DEVNULL)
        return image
    out = tree.parent / ("update.tar" if how == "tar" else "update.tar.gz")
    subprocess.run(["tar", "-czf" if how == "tar.gz" else "-cf", str(out), "-C", str(tree),
                    "."], check=True)
    return out


@pytest.mark.parametrize(("how", "staged"), [("directory", 0), ("tar", 0), ("tar.gz", 9000),
                                             pytest.param("squashfs", 0, marks=pytest.mark.root)])
def test_data_in_lasting_files_is_not_staged(live: tuple[Path, Path, Path], how: str,
                                             staged: int) -> None:
    """A directory's files, a plain tar's members and an image's files
    (mounted while the apply runs) are copied from where they lie, not
    through the staging file (RAM under /run at boot)."""
    top, root, run = live
    spec = _packed(_update_tree(top), how)
    spool = Spool(top)
    try:
        with open_update(os.fspath(spec), staging=top) as reader:
            members = read_all(reader, spool)
            assert spool.size == staged
            apply_members(ApplyOptions(root, run), members, spool, lambda _: None)
    finally:
        spool.close()
    for name in ("a", "b", "c"):
        assert (root / "usr/lib" / name).read_bytes() == name.encode() * 3000


@pytest.mark.root
def test_data_copied_across_filesystems(tmp_path: Path) -> None:
    """copy_file_range refuses to cross filesystems (EXDEV): sendfile then."""
    with small_tmpfs(tmp_path / "tmpfs", "size=20m") as other:
        root, run = make_root(tmp_path / "live")
        tree = _update_tree(other)
        big = os.urandom(300_000)
        (tree / "usr/lib/big").write_bytes(big)
        spool = Spool(other)  # staged data on the tmpfs as well
        try:
            with open_update(os.fspath(tree), staging=other) as reader:
                members = read_all(reader, spool)
            spool.add("usr/lib/streamed", io.BytesIO(big[::-1]), len(big))
            members.append(Member("usr/lib/streamed", Kind.FILE, 0o644, size=len(big)))
            apply_members(ApplyOptions(root, run), members, spool, lambda _: None)
        finally:
            spool.close()
    assert (root / "usr/lib/big").read_bytes() == big
    assert (root / "usr/lib/streamed").read_bytes() == big[::-1]
    assert (root / "usr/lib/c").read_bytes() == b"c" * 3000


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("change", ["rewritten", "same size and times", "replaced",
                                    "removed", "tar touched", "tar rewritten"])
def test_an_update_changed_after_reading_is_refused_and_undone(
        live: tuple[Path, Path, Path], change: str, jobs: int) -> None:
    """With two processes writing, the one that finds the change tells the
    other, and the apply is undone as a whole."""
    top, root, run = live
    tree = _update_tree(top)
    spec = _packed(tree, "tar" if change.startswith("tar") else "directory")
    before = snapshot(root), snapshot(run)
    spool = Spool(top)
    try:
        with open_update(os.fspath(spec), staging=top) as reader:
            members = read_all(reader, spool)
        last = tree / "usr/lib/c"  # written last: a and b are written, then removed
        st = last.stat()
        if change == "rewritten":
            last.write_bytes(b"shorter")
        elif change == "same size and times":
            last.write_bytes(b"C" * 3000)
            os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif change == "replaced":
            (tree / "usr/lib/new").write_bytes(b"c" * 3000)
            os.replace(tree / "usr/lib/new", last)
        elif change == "removed":
            last.unlink()
        elif change == "tar touched":
            os.utime(spec)
        else:
            with open(spec, "r+b") as f:
                f.seek(-600, os.SEEK_END)
                f.write(bytes(10))  # in the end-of-archive padding: still a good tar
        with pytest.raises(ImageError, match="changed after the update was read") as info:
            apply_members(ApplyOptions(root, run, jobs=jobs), members, spool, lambda _: None)
    finally:
        spool.close()
    assert info.value.hint is not None and "nothing was changed" in info.value.hint
    assert (snapshot(root), snapshot(run)) == before
    assert not (root / ".dmoverlay").exists()
