"""A tree removed however deep, without following links or crossing mounts."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dmoverlay.core import tree
from dmoverlay.core.tree import remove_tree
from tests.conftest import small_tmpfs
from tests.deeptree import make_chain


@contextmanager
def _open_files_at_most(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_tree_deeper_than_the_recursion_limit_and_path_max_is_removed(tmp_path: Path) -> None:
    """3,000 levels of 40-byte names: 123,000 bytes of path, three times
    Python's recursion limit; with 64 files open at most."""
    levels = 3000
    assert levels > sys.getrecursionlimit()
    top = tmp_path / "deep"
    top.mkdir()
    make_chain(top, levels, name="d" * 40, leaf="f")
    with pytest.raises(RecursionError):  # what the work directories met before
        shutil.rmtree(top)
    with _open_files_at_most(64):
        remove_tree(top)
    assert os.listdir(tmp_path) == []


def test_links_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_text("kept")
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "file").write_text("x")
    (top / "a" / "to-dir").symlink_to(outside)
    (top / "a" / "b" / "to-file").symlink_to(outside / "sub" / "keep")
    (top / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(top / "fifo")
    remove_tree(top)
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "sub" / "keep").read_text() == "kept"


def test_a_tree_already_gone_is_nothing_to_do_and_a_name_under_a_descriptor_works(
        tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")
    (tmp_path / "t" / "u").mkdir(parents=True)
    (tmp_path / "t" / "u" / "f").write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree("t", dir_fd=fd)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_a_link_given_as_the_tree_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as caught:
        remove_tree(tmp_path / "link")
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert (tmp_path / "real" / "f").read_text() == "x"


@pytest.mark.root
def test_a_mount_inside_keeps_its_content_and_the_rest_goes(tmp_path: Path) -> None:
    """shutil.rmtree would empty a filesystem mounted in the tree (a work
    directory whose mount was left by a failure); this leaves it whole,
    removes the rest, and says what was in the way."""
    top = tmp_path / "work"
    (top / "a").mkdir(parents=True)
    (top / "a" / "f").write_text("x")
    (top / "z").mkdir()
    (top / "z" / "g").write_text("x")
    with small_tmpfs(top / "mnt", "size=1m") as mnt:
        (mnt / "theirs").write_text("kept")
        with pytest.raises(OSError) as caught:
            remove_tree(top)
        assert caught.value.errno == errno.EXDEV
        assert os.listdir(top) == ["mnt"]
        assert (mnt / "theirs").read_text() == "kept"
    remove_tree(top)
    assert os.listdir(tmp_path) == []


@pytest.mark.root
def test_a_bind_of_a_directory_from_elsewhere_on_the_same_filesystem_keeps_it(
        tmp_path: Path) -> None:
    """The same device number as the tree, so only its ".." (the bound
    directory's real parent) tells it is mounted there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "theirs").write_text("kept")
    top = tmp_path / "work"
    (top / "bound").mkdir(parents=True)
    (top / "mine").write_text("x")
    subprocess.run(["mount", "--bind", str(outside), str(top / "bound")], check=True)
    try:
        assert os.stat(top / "bound").st_dev == os.stat(top).st_dev
        with pytest.raises(OSError) as caught:
            remove_tree(top)
        assert caught.value.errno == errno.EXDEV
        assert os.listdir(top) == ["bound"]
    finally:
        subprocess.run(["umount", str(top / "bound")], check=True)
    assert (outside / "theirs").read_text() == "kept"
    remove_tree(top)
    assert os.listdir(tmp_path) == ["outside"]


def test_a_link_given_with_a_trailing_slash_is_not_followed(tmp_path: Path) -> None:
    """open("link/", O_NOFOLLOW) follows the link: the slash is taken off."""
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "sub" / "keep").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(OSError) as caught:
        remove_tree(f"{tmp_path}/link/")
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert (tmp_path / "outside" / "sub" / "keep").read_text() == "kept"
    with pytest.raises(OSError):
        remove_tree("/")


@pytest.mark.root
def test_a_mount_given_as_the_tree_is_refused_whole(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "size=1m") as mnt:
        (mnt / "sub").mkdir()
        (mnt / "sub" / "theirs").write_text("kept")
        with pytest.raises(OSError) as caught:
            remove_tree(mnt)
        assert caught.value.errno == errno.EBUSY
        assert (mnt / "sub" / "theirs").read_text() == "kept"


@pytest.mark.root
def test_a_bind_made_while_the_tree_is_removed_keeps_its_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each directory's mount is asked when it is opened, not once ahead."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "theirs").write_text("kept")
    top = tmp_path / "work"
    (top / "a" / "late").mkdir(parents=True)
    real_clear = tree._clear
    bound: list[Path] = []

    def clear_then_bind(fd: int) -> tuple[list[str], OSError | None]:
        if not bound:  # the top's listing is done: now a mount comes in below it
            subprocess.run(["mount", "--bind", str(outside), str(top / "a" / "late")],
                           check=True)
            bound.append(top / "a" / "late")
        return real_clear(fd)
    monkeypatch.setattr(tree, "_clear", clear_then_bind)
    try:
        with pytest.raises(OSError) as caught:
            remove_tree(top)
        assert caught.value.errno == errno.EXDEV
    finally:
        for point in bound:
            subprocess.run(["umount", str(point)], check=True)
    assert (outside / "theirs").read_text() == "kept"


def test_without_proc_no_subdirectory_is_gone_into(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc cannot tell a mount point (injected), nothing below the
    top's own entries is touched: a bind there could not be told apart."""
    top = tmp_path / "work"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "f").write_text("x")
    (top / "g").write_text("x")
    monkeypatch.setattr(tree, "_mount_of", lambda fd: None)
    with pytest.raises(OSError) as caught:
        remove_tree(top)
    assert caught.value.errno == errno.EXDEV
    assert sorted(os.listdir(top)) == ["sub"] and os.listdir(top / "sub") == ["f"]


@pytest.mark.root
def test_a_directory_that_cannot_be_searched_is_left_and_the_rest_goes(
        shared_dir: Path) -> None:
    """As a user: a directory of mode 0444 can be listed, not gone into;
    its siblings go all the same, and the error says what stayed."""
    top = shared_dir / "w"
    (top / "a" / "r").mkdir(parents=True)
    (top / "a" / "r" / "f").write_text("x")
    (top / "z" / "zz").mkdir(parents=True)
    (top / "z" / "zz" / "f").write_text("x")
    for path in [top, *top.rglob("*")]:
        os.chown(path, 65534, 65534)
    (top / "a" / "r").chmod(0o444)
    script = ("import sys\nfrom dmoverlay.core.tree import remove_tree\n"
              "try:\n    remove_tree(sys.argv[1])\nexcept OSError as exc:\n"
              "    print(exc.errno)\n")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", script, str(top)],
                          capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == str(errno.EACCES), done.stderr
    assert [p.relative_to(top).as_posix() for p in sorted(top.rglob("*"))] == [
        "a", "a/r", "a/r/f"]
    (top / "a" / "r").chmod(0o755)
