"""open_update: every kind of input gives the same members, and every
damaged input fails during the pass, never yielding less without a word."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.apply.readers.directory import DirectoryReader
from dmoverlay.core.entries import InFile, Kind, file_identity
from dmoverlay.core.errors import SourceError
from tests import samples
from tests.apply.readers.readkit import (
    COMPRESSORS,
    compress,
    make_cpio,
    make_tar,
    read_all,
    read_spec,
    shape,
)

# ------------------------------------------- every format, every compression


@pytest.mark.parametrize("how", list(COMPRESSORS))
@pytest.mark.parametrize("fmt", ["tar", "cpio"])
def test_archive_gives_the_directory_members(tree: Path, tmp_path: Path, staging: Path,
                                             fmt: str, how: str) -> None:
    plain = tmp_path / f"update.{fmt}"
    (make_tar if fmt == "tar" else make_cpio)(tree, plain)
    archive = compress(plain, how)
    got = read_spec(archive, staging)
    expected = read_spec(tree, staging)
    assert shape(got) == shape(expected)
    times = {m.name: m.mtime_ns for m, _ in got}
    second = 1 if fmt == "tar" else 10**9  # cpio keeps whole seconds
    assert times == {m.name: m.mtime_ns // second * second for m, _ in expected}
    xattrs = {m.name: m.xattrs for m, _ in got if m.xattrs}
    assert xattrs == ({"etc/conf": (("user.note", b"\x00binary\xff"),)} if fmt == "tar" else {})
    with open_update(str(archive), staging=staging) as reader:
        kind = "" if how == "none" else f"{how}-compressed "
        assert reader.description == f"{kind}{fmt} archive {archive}"
        first = read_all(reader)
        for _ in reader.members():  # a pass that skips all the data
            pass
        assert read_all(reader) == first
    assert list(staging.iterdir()) == []


def damaged(archive: Path, how: str, fmt: str) -> Iterator[tuple[str, bytes]]:
    raw = archive.read_bytes()
    yield "cut in the middle", raw[: len(raw) * 2 // 3]
    if how != "none":  # (a plain archive ends in padding that may be cut)
        yield "cut near the end", raw[:-9]
        middle = bytearray(raw)
        middle[len(raw) // 2] ^= 0x55
        yield "a byte changed", bytes(middle)
    if how == "gzip":
        crc = bytearray(raw)
        crc[-8] ^= 1
        yield "bad CRC", bytes(crc)
        yield "no size and CRC", raw[:-8]
    if how == "xz":
        yield "no footer", raw[:-12]
    if how == "none" and fmt == "cpio":
        yield "no trailer", raw[: raw.index(b"TRAILER!!!") - 110]


@pytest.mark.parametrize("how", list(COMPRESSORS))
@pytest.mark.parametrize("fmt", ["tar", "cpio"])
def test_damaged_archives_fail(tree: Path, tmp_path: Path, staging: Path, fmt: str,
                               how: str) -> None:
    plain = tmp_path / f"update.{fmt}"
    (make_tar if fmt == "tar" else make_cpio)(tree, plain, *(["-H", "crc"] if fmt == "cpio"
                                                            else []))
    archive = compress(plain, how)
    bad = tmp_path / "bad"
    for what, data in damaged(archive, how, fmt):
        bad.write_bytes(data)
        with pytest.raises(SourceError) as info:  # opening or the pass may fail
            with open_update(str(bad), staging=staging) as reader:
                read_all(reader)
            pytest.fail(f"{what}: read without an error")
        assert "\n" not in info.value.message, what
    assert list(staging.iterdir()) == []


def _located(data: object) -> InFile | None:
    located = getattr(data, "located", None)
    return None if located is None else located()


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_lasting_plain_updates_locate_their_data(tree: Path, tmp_path: Path, staging: Path,
                                                 fmt: str) -> None:
    """A directory and a plain tar on disk say where each file's data lies, and
    a pass that takes the locations reads none of it; compressed archives and
    an image's directory (unmounted when the reader closes) do not."""
    (tree / "usr/share/doc").mkdir(parents=True)
    (tree / f"usr/share/doc/{'long-name-' * 20}").write_bytes(b"in a pax or GNU long name")
    archive = make_tar(tree, tmp_path / "u.tar", fmt=fmt)
    for spec, lasting in ((tree, True), (archive, True), (compress(archive, "xz"), False)):
        seen = 0
        with open_update(str(spec), staging=staging) as reader:
            for member, data in reader.members():
                place = _located(data)
                assert (place is not None) == (lasting and member.kind is Kind.FILE), spec
                if place is None:
                    continue
                with open(place.path, "rb") as f:
                    f.seek(place.offset)
                    assert f.read(place.size) == (tree / member.name).read_bytes()
                assert place.size == member.size
                assert place.identity == file_identity(os.stat(place.path))
                seen += 1
        assert seen == (4 if lasting else 0)
    image_dir = DirectoryReader(tree, description="an image's directory")
    assert all(_located(d) is None for _, d in image_dir.members())



@pytest.mark.parametrize("fmt", ["tar", "cpio", "directory"])
def test_hardlinks_come_after_their_file(tree: Path, tmp_path: Path, staging: Path,
                                         fmt: str) -> None:
    spec = {"directory": lambda: tree,
            "tar": lambda: make_tar(tree, tmp_path / "u.tar"),
            "cpio": lambda: make_cpio(tree, tmp_path / "u.cpio")}[fmt]()
    got = read_spec(spec, staging)
    seen: dict[str, Kind] = {}
    links = 0
    for member, data in got:
        if member.kind is Kind.HARDLINK:
            assert seen.get(member.target) is Kind.FILE
            assert data is None and member.size == 0
            links += 1
        seen[member.name] = member.kind
    assert links == 1


def test_stopping_a_pass_early_then_reading_again(tree: Path, tmp_path: Path,
                                                  staging: Path) -> None:
    archive = compress(make_tar(tree, tmp_path / "u.tar"), "zstd")
    with open_update(str(archive), staging=staging) as reader:
        for _ in reader.members():
            break
        assert len(read_all(reader)) == len(read_spec(tree, staging))


# ------------------------------------------------ the same update, any format


def _formats(root: Path, tmp_path: Path) -> dict[str, Path]:
    return {
        "tar": make_tar(root, tmp_path / "u.tar"),
        "tar.xz": compress(make_tar(root, tmp_path / "v.tar"), "xz"),
        "cpio newc": make_cpio(root, tmp_path / "u.cpio"),
        "cpio crc.zst": compress(make_cpio(root, tmp_path / "v.cpio", "-H", "crc"), "zstd"),
        "cpio odc": make_cpio(root, tmp_path / "w.cpio", "-H", "odc"),
    }


def test_same_members_from_directory_tar_and_cpio(tmp_path: Path, staging: Path) -> None:
    root = tmp_path / "plain"
    samples.make_plain_tree(root)
    expected = shape(read_spec(root, staging))
    for name, path in _formats(root, tmp_path).items():
        assert shape(read_spec(path, staging)) == expected, name


@pytest.mark.root
def test_same_members_from_a_rich_tree(rich_tree: Path, tmp_path: Path,
                                       staging: Path) -> None:
    expected = shape(read_spec(rich_tree, staging))
    for name, path in _formats(rich_tree, tmp_path).items():
        assert shape(read_spec(path, staging)) == expected, name


def test_anaconda_updates_img(tree: Path, tmp_path: Path, staging: Path) -> None:
    """`find . | cpio -c -o | gzip -9`, as anaconda's makeupdates does."""
    out = tmp_path / "updates.img"
    subprocess.run(f"find . | cpio -c -o --quiet | gzip -9 > {out}", shell=True, cwd=tree,
                   check=True)
    with open_update(str(out), staging=staging) as reader:
        assert reader.description == f"gzip-compressed cpio archive {out}"
        assert shape(read_all(reader)) == shape(read_spec(tree, staging))
