"""Hostile and unusual archives through `dmoverlay build`: nothing in a
member reaches the host, and whatever ext4 can hold comes out exactly."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.build.test_errors import fails
from tests.conftest import dmoverlay
from tests.treecheck import mounted_rootfs


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "",
          pax: dict[str, str] | None = None, mtime: float = 1_600_000_000) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = kind, linkname, mtime, 0o644
    info.pax_headers = pax or {}
    return info


def test_an_xattr_name_cannot_run_debugfs_commands(tmp_path: Path) -> None:
    """Issue 8: a newline in a pax xattr name started a debugfs command of
    the archive's own (here: dump an inode to a host file)."""
    victim = tmp_path / "victim"
    name = f'SCHILY.xattr.user.x\ndump <2> "{victim}"\nea_set "/f" user.y'
    archive = write_tar(tmp_path / "evil.tar", [(entry("f", pax={name: "v"}), b"data")])
    line = fails(tmp_path, str(archive), "-o", str(tmp_path / "out.img"))
    assert "control character" in line
    assert not victim.exists()


@pytest.mark.root
def test_names_and_xattrs_survive_exactly(tmp_path: Path) -> None:
    """Names with control characters, quotes and blanks; xattr names with
    blanks and quotes; link targets with newlines: all as the archive says."""
    odd = 'new\nline "q" \\b\t#c\r<12>'
    archive = write_tar(tmp_path / "odd.tar", [
        (entry(f"{odd}", tarfile.DIRTYPE), b""),
        (entry(f"{odd}/f", pax={"SCHILY.xattr.user.a b": "1",
                                'SCHILY.xattr.user."q"\\#': "2"}), b"data"),
        (entry(f"{odd}/hard\n", tarfile.LNKTYPE, linkname=f"{odd}/f"), b""),
        (entry(f"{odd}/link\n", tarfile.SYMTYPE, linkname="to\nsomewhere"), b""),
        (entry("fifo\n", tarfile.FIFOTYPE), b""),
        (entry("<12>", tarfile.CHRTYPE), b""),
    ])
    out = tmp_path / "out.img"
    result = dmoverlay("-q", "build", str(archive), "-o", str(out))
    assert result.returncode == 0, result.stderr
    with mounted_rootfs(out, tmp_path) as image:
        d = image / odd
        assert sorted(os.listdir(d)) == sorted(["f", "hard\n", "link\n"])
        assert (d / "f").read_bytes() == b"data"
        assert os.getxattr(d / "f", "user.a b") == b"1"
        assert os.getxattr(d / "f", 'user."q"\\#') == b"2"
        assert os.stat(d / "hard\n").st_ino == os.stat(d / "f").st_ino
        assert os.readlink(d / "link\n") == "to\nsomewhere"
        assert os.stat(image / "fifo\n").st_mode & 0o170000 == 0o010000
        assert os.stat(image / "<12>").st_mode & 0o170000 == 0o020000
        assert os.stat(d / "f").st_mtime_ns == 1_600_000_000 * 10**9


def test_a_device_node_named_with_a_newline_is_refused(tmp_path: Path) -> None:
    """mkfs cannot make a device node from a tree unpacked without privilege,
    and debugfs's mknod needs the name in its script."""
    archive = write_tar(tmp_path / "dev.tar", [(entry("tty\nx", tarfile.CHRTYPE), b"")])
    line = fails(tmp_path, str(archive), "-o", str(tmp_path / "out.img"))
    assert "newline" in line


def test_an_output_directory_named_with_a_newline(tmp_path: Path) -> None:
    """The build works beside its output: no byte of that path goes into a
    debugfs script (the xattr values' files are named from where debugfs
    runs), so a newline in it is no reason to fail."""
    archive = write_tar(tmp_path / "x.tar", [
        (entry("f", pax={"SCHILY.xattr.user.k": "val"}), b"data")])
    where = tmp_path / "out\nput"
    where.mkdir()
    out = where / "sq.img"
    result = dmoverlay("-q", "build", str(archive), "-o", str(out), "--free", "8M",
                       "--disk", str(where / "d.img"))
    assert result.returncode == 0, result.stderr
    rootfs = tmp_path / "rootfs.img"
    with open(rootfs, "wb") as f:
        subprocess.run(["unsquashfs", "-cat", str(out), "LiveOS/rootfs.img"], stdout=f,
                       check=True)
    listed = subprocess.run(["debugfs", "-R", "ea_list /f", str(rootfs)], capture_output=True,
                            text=True, check=True).stdout
    assert 'user.k (3) = "val"' in listed
