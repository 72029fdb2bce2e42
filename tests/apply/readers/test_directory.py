"""A directory read as an update: its members, and a file that changes
while it is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmoverlay.apply.readers.directory import DirectoryReader
from dmoverlay.core.entries import Kind
from dmoverlay.core.errors import SourceError
from tests import samples
from tests.apply.readers.readkit import (
    read_spec,
)
from tests.deeptree import chain


def test_directory_members(tmp_path: Path, staging: Path) -> None:
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    os.setxattr(root / "etc/os-release", "user.comment", b"hello")
    got = read_spec(root, staging)
    names = [m.name for m, _ in got]
    assert names[0] == ""
    for i, name in enumerate(names[1:], 1):  # parents first, then sorted siblings
        parent = name.rpartition("/")[0]
        assert parent in names[:i]
    by_name = {m.name: (m, d) for m, d in got}
    release, data = by_name["etc/os-release"]
    assert release.mtime_ns == 1_600_000_000_123_456_789
    assert ("user.comment", b"hello") in release.xattrs
    assert data == b"NAME=Sample\nID=sample\n"
    assert by_name["etc/empty"][0].mtime_ns == 4_102_444_800 * samples.NS
    assert by_name["lib"][0].kind is Kind.SYMLINK and by_name["lib"][0].target == "usr/lib"
    again = by_name["usr/bin/tool-again"][0]
    assert (again.kind, again.target) == (Kind.HARDLINK, "usr/bin/tool")
    assert names.index("usr/bin/tool") < names.index("usr/bin/tool-again")
    assert by_name["var/sparse.img"][0].size == 16 << 20
    assert read_spec(root, staging) == got
    (root / "etc/empty").write_bytes(b"now something")
    assert read_spec(root, staging) != got


def test_directory_named_through_a_symlink(tree: Path, tmp_path: Path,
                                          staging: Path) -> None:
    os.symlink(tree, tmp_path / "link")
    got = read_spec(tmp_path / "link", staging)
    assert got[0][0].kind is Kind.DIR
    assert got == read_spec(tree, staging)


def test_directory_file_changing_while_read(tree: Path, staging: Path) -> None:
    reader = DirectoryReader(tree, description="tree")
    with pytest.raises(SourceError, match="etc/conf changed while it was read"):
        for member, _data in reader.members():
            if member.name == "etc/conf":
                (tree / "etc/conf").write_bytes(b"short")
    with pytest.raises(SourceError, match="etc/conf changed while it was read"):
        for member, _data in reader.members():
            if member.name == "etc/conf":
                with open(tree / "etc/conf", "ab") as f:
                    f.write(b"x" * 100)


def test_a_tree_as_deep_as_a_path_can_go_is_read(tmp_path: Path) -> None:
    """1,500 levels (3,000 bytes of path): deeper than Python lets
    generators nest, so the walk keeps its own stack."""
    depth = 1500
    with chain(tmp_path, depth):
        names = [m.name for m, _ in DirectoryReader(tmp_path, description="deep").members()]
    assert len(names) == depth + 1
    assert names[-1] == "/".join(["d"] * depth)
