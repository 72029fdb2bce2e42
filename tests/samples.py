"""Sample root trees for tests, the demo and the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

CAPABILITY = bytes.fromhex("0100000200300000000000000000000000000000")  # cap_net_raw+ep
NS = 1_000_000_000


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def make_plain_tree(root: Path) -> None:
    """What a normal user can make: files, links, modes, times; owned by the maker."""
    _write(root / "usr/lib/libfoo.so.1", b"\x7fELF fake library\n" * 100, 0o755)
    _write(root / "usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
    _write(root / "etc/os-release", b"NAME=Sample\nID=sample\n")
    _write(root / "etc/empty", b"")
    (root / "var/log").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    os.symlink("/usr/bin", root / "bin")
    os.symlink("/does/not/exist", root / "dangling")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    with open(root / "var/sparse.img", "wb") as f:
        f.seek(8 << 20)
        f.write(b"data in the middle")
        f.truncate(16 << 20)
    os.utime(root / "etc/os-release", ns=(1_600_000_000 * NS + 123_456_789,) * 2)
    os.utime(root / "etc/empty", ns=(4_102_444_800 * NS,) * 2)  # 2100: past ext4's 2038 line
    os.utime(root / "lib", ns=(1_500_000_000 * NS,) * 2, follow_symlinks=False)


def make_rich_tree(root: Path) -> None:
    """Everything a root filesystem holds (needs root: owners, device nodes)."""
    make_plain_tree(root)
    _write(root / "usr/bin/ping", b"ping\n", 0o755)
    os.setxattr(root / "usr/bin/ping", "security.capability", CAPABILITY)
    os.chmod(root / "usr/bin/ping", 0o4755)
    _write(root / "usr/bin/wall", b"wall\n", 0o755)
    os.chown(root / "usr/bin/wall", 0, 5)
    os.chmod(root / "usr/bin/wall", 0o2755)
    _write(root / "etc/shadow", b"root:*:1::::::\n", 0o640)
    os.chown(root / "etc/shadow", 0, 42)
    _write(root / "etc/secret", b"no one may read this\n", 0o000)
    os.setxattr(root / "etc/os-release", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    os.setxattr(root / "etc/os-release", "user.comment", b"hello")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    home = root / "home/user"
    _write(home / "notes with spaces & \"quotes\" #1.txt", b"x\n", 0o600)
    _write(home / "ünïcödé\\back", b"y\n", 0o640)
    for p in (home, home.parent / "user", *home.iterdir()):
        os.chown(p, 1000, 1000, follow_symlinks=False)
    os.chmod(home, 0o700)
    os.symlink("../../etc/os-release", home / "link")
    os.chown(home / "link", 1000, 1000, follow_symlinks=False)
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(root / "dev/loop9", 0o660 | 0o060000, os.makedev(7, 9))
    os.chown(root / "dev/loop9", 0, 6)
    (root / "run").mkdir()
    os.mkfifo(root / "run/initctl", 0o600)
    os.utime(root / "usr/bin/ping", ns=(0, 0))  # the epoch itself
    os.utime(root / "etc", ns=(1_234_567_890 * NS + 1,) * 2)


def main() -> None:
    """python -m tests.samples DIR [--rich]: make a sample root tree (the demo's)."""
    import sys

    args = sys.argv[1:]
    target = Path(next(a for a in args if not a.startswith("-")))
    (make_rich_tree if "--rich" in args else make_plain_tree)(target)
    print(target)


if __name__ == "__main__":
    main()
