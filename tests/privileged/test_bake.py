"""`build --from-live`: a running overlay's merged view made a new image,
entry by entry what the live root shows, while the system runs on."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.privileged.conftest import cli, error_line, resources, setup_args, teardown
from tests.treecheck import describe, differences, digest, hardlink_groups, mounted_rootfs

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def change(root: Path) -> None:
    """Every kind of change an overlay holds: content, new files, a removal,
    a link, a hard link, a mode, an owner, an xattr, a directory."""
    (root / "etc/os-release").write_text("NAME=Baked\nID=baked\n")
    (root / "var/big").write_bytes(os.urandom(3 * MiB))  # many chunks
    (root / "var/new-dir/deeper").mkdir(parents=True)
    (root / "var/new-dir/deeper/file").write_text("deep\n")
    os.symlink("../etc/os-release", root / "var/link")
    os.link(root / "var/big", root / "var/big.hard")
    os.chmod(root / "usr/bin/tool", 0o700)
    os.chown(root / "var/new-dir", 1000, 1000)
    os.setxattr(root / "var/new-dir/deeper/file", "user.mark", b"baked")
    (root / "usr/lib/libfoo.so.1").unlink()
    (root / "dangling").unlink()
    (root / ".dmoverlay").mkdir()  # apply's journal: not part of the system
    (root / ".dmoverlay/journal").write_text("{}")
    os.sync()


def bake(place: dict[str, Path], out: Path, *extra: str,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli("build", "--from-live", str(place["name"]), "--state-dir", str(place["state"]),
               "-o", str(out), "--compression", "zstd", "--free", "16M", *extra, check=check)


def copied(made: subprocess.CompletedProcess[str]) -> int:
    """The bytes bake says it copied while the root was frozen."""
    found = re.search(r"frozen [0-9.]+ s; ([0-9]+) bytes \(", made.stderr)
    assert found, made.stderr
    return int(found.group(1))


def check_image(image: Path, root: Path, scratch: Path) -> None:
    want = {k: v for k, v in describe(root).items() if not k.startswith(".dmoverlay")}
    scratch.mkdir()
    with mounted_rootfs(image, scratch) as got:
        assert differences(want, describe(got)) == []
        assert hardlink_groups(got) == hardlink_groups(root)


def base_size(place: dict[str, Path]) -> int:
    return int(subprocess.run(["blockdev", "--getsize64",
                               f"/dev/mapper/{place['name']}-base"],
                              capture_output=True, text=True, check=True).stdout)


def writable(root: Path) -> bool:
    """The live root takes a write again (a frozen one would make it wait)."""
    done = subprocess.run(["timeout", "20", "sh", "-c", 'echo x > "$1/thawed" && sync', "sh",
                           str(root)], check=False)
    return done.returncode == 0


@pytest.mark.parametrize("mode", ["persistent", "ram", "readonly", "thin"])
def test_the_image_holds_the_merged_view(images: dict[str, Path], place: dict[str, Path],
                                         mode: str) -> None:
    before = resources()
    store = place["top"] / "live.overlay"
    extra = {"persistent": ["--overlay", str(store)], "ram": [],
             "readonly": ["--overlay", str(store), "--overlay-readonly"],
             "thin": ["--overlay-thin"]}[mode]
    if mode == "readonly":  # a store with a change of an earlier boot, shown read-only
        cli(*setup_args(images["squashfs"], place, "--overlay", str(store),
                        "--overlay-size", "64M"))
        (place["target"] / "var/earlier").write_bytes(os.urandom(MiB))
        teardown(place)
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M", *extra))
    root = place["target"]
    change(root)
    out = place["top"] / "out"
    out.mkdir()
    slow = ["--freeze-limit", "300"] if mode == "thin" else []  # all of it, under TCG
    made = bake(place, out / "new.img", *slow)
    line = next(x for x in made.stderr.splitlines() if "frozen" in x)
    print(f"{mode}: {line.strip()}; the base {base_size(place)} bytes")
    check_image(out / "new.img", root, place["top"] / "m1")
    if mode == "thin":  # no exception table: all of it
        assert copied(made) == base_size(place)
    else:  # the tables name the changes: only they are copied, frozen
        assert 3 * MiB <= copied(made) < base_size(place) // 4
    again = bake(place, out / "again.img", *slow)
    assert digest(out / "again.img") == digest(out / "new.img"), "the same view, not the image"
    assert again.returncode == 0
    assert writable(root)
    assert sorted(os.listdir(out)) == ["again.img", "new.img"]  # no work directory left
    teardown(place)
    assert resources() == before


def test_the_output_on_the_live_root_is_refused_before_freezing(images: dict[str, Path],
                                                                place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M"))
    root = place["target"]
    refused = bake(place, root / "new.img", check=False)
    assert refused.returncode == 1
    assert "is on the live root" in error_line(refused)
    assert not any(p.name.startswith(".new.img") for p in root.iterdir())
    assert writable(root)
    # nor through it: a partition of a loop over a disk image kept on it
    disk = root / "disk.img"
    subprocess.run(["truncate", "-s", "16M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input="start=2048, type=83\n", text=True,
                   check=True)
    loop = subprocess.run(["losetup", "--find", "--show", "--partscan", str(disk)],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = place["top"] / "out"
    out.mkdir()
    try:
        # without udev, devtmpfs makes the partition's node a moment after the scan
        deadline = time.monotonic() + 20
        while not os.path.exists(f"{loop}p1") and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["mkfs.ext4", "-q", f"{loop}p1"], check=True)
        subprocess.run(["mount", f"{loop}p1", str(out)], check=True)
        try:
            refused = bake(place, out / "new.img", check=False)
            assert "is on a filesystem written through the live root" in error_line(refused)
            assert os.listdir(out) == ["lost+found"]
        finally:
            subprocess.run(["umount", str(out)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    assert writable(root)


def test_a_freeze_past_the_limit_is_thawed_and_makes_nothing(images: dict[str, Path],
                                                            place: dict[str, Path]) -> None:
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M"))
    out = place["top"] / "out"
    out.mkdir()
    cut = bake(place, out / "new.img", "--freeze-limit", "0.001", check=False)
    assert cut.returncode == 1
    assert "stayed frozen past --freeze-limit" in error_line(cut)
    assert os.listdir(out) == []
    assert writable(place["target"])


def test_a_full_output_filesystem_is_one_error_and_leaves_nothing(
        images: dict[str, Path], place: dict[str, Path]) -> None:
    before = resources()
    cli(*setup_args(images["squashfs"], place, "--overlay-size", "64M"))
    change(place["target"])
    out = place["top"] / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    try:
        full = bake(place, out / "new.img", check=False)
        assert "No space left" in error_line(full)
        assert os.listdir(out) == []
    finally:
        subprocess.run(["umount", str(out)], check=True)
    assert writable(place["target"])
    teardown(place)
    assert resources() == before
