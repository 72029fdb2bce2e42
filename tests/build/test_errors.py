"""Bad input to `dmoverlay build`: one `error:` line, a non-zero exit, and
nothing left behind in the output directory."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import dmoverlay, small_tmpfs


def fails(out_dir: Path, *args: str, user: int | None = None,
          env: dict[str, str] | None = None) -> str:
    before = sorted(os.listdir(out_dir))
    result = dmoverlay("-q", "build", *args, user=user, env=env)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(out_dir)) == before, "the build left files behind"
    return lines[0]


def make_tar(path: Path, add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x",
             **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def add_entry(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def good_tar(tar: tarfile.TarFile) -> None:
    add_entry(tar, "usr", tarfile.DIRTYPE)
    add_file(tar, "usr/a", os.urandom(300_000))
    add_file(tar, "usr/b", b"b" * 5000)


def test_missing_source(tmp_path: Path) -> None:
    line = fails(tmp_path, str(tmp_path / "nope"), "-o", str(tmp_path / "out.img"))
    assert "no such file" in line


def test_source_neither_directory_nor_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    line = fails(tmp_path, str(junk), "-o", str(tmp_path / "out.img"))
    assert "neither a directory nor a tar archive" in line


def test_source_is_a_device(tmp_path: Path) -> None:
    line = fails(tmp_path, "/dev/null", "-o", str(tmp_path / "out.img"))
    assert "neither a directory nor a tar archive" in line


def test_output_exists_without_force(plain_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"precious")
    line = fails(tmp_path, str(plain_tree), "-o", str(out))
    assert "exists" in line
    assert out.read_bytes() == b"precious"


def test_force_replaces_output(plain_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    result = dmoverlay("-q", "build", str(plain_tree), "-o", str(out), "--force",
                       "--compression", "zstd")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"hsqs"


def test_output_directory_missing(plain_tree: Path, tmp_path: Path) -> None:
    line = fails(tmp_path, str(plain_tree), "-o", str(tmp_path / "no/such/dir/out.img"))
    assert "no such directory" in line


def test_output_inside_source(plain_tree: Path, tmp_path: Path) -> None:
    line = fails(plain_tree, str(plain_tree), "-o", str(plain_tree / "out.img"))
    assert "inside the source" in line


@pytest.mark.parametrize(("args", "words"), [
    (["--size", "1M"], "too small"),
    (["--size", "1G", "--free", "1G"], "exclude each other"),
    (["--size", "lots"], "not a size"),
    (["--compression", "xz", "--level", "5"], "takes no compression level"),
    (["--compression", "zstd", "--level", "99"], "level must be 1 to 22"),
    (["--block-size", "100K"], "power of two"),
    (["--label", "a-label-longer-than-sixteen"], "longer than 16"),
    (["--compression", "brotli"], "brotli"),
    (["--overlay-size", "1G"], "needs --disk"),
])
def test_bad_options(plain_tree: Path, tmp_path: Path, args: list[str], words: str) -> None:
    line = fails(tmp_path, str(plain_tree), "-o", str(tmp_path / "out.img"), *args)
    assert words in line


def test_bad_source_date_epoch(plain_tree: Path, tmp_path: Path) -> None:
    line = fails(tmp_path, str(plain_tree), "-o", str(tmp_path / "out.img"),
                 env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert "SOURCE_DATE_EPOCH" in line


def _corruptions(raw: bytes) -> dict[str, bytes]:
    gz = gzip.compress(raw)
    xz = lzma.compress(raw)
    bad_crc = bytearray(gz)
    bad_crc[-8] ^= 0xFF
    zst = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True,
                         check=True).stdout
    return {
        "gzip-missing-trailer": gz[:-8],
        "gzip-bad-crc": bytes(bad_crc),
        "gzip-cut-in-half": gz[: len(gz) // 2],
        "xz-missing-footer": xz[:-12],
        "zstd-cut": zst[: len(zst) - 10],
        "plain-cut-at-member": raw[:512 * 2],
        "plain-cut-mid-data": raw[:1000],
    }


@pytest.mark.parametrize("case", list(_corruptions(b"").keys()))
def test_corrupt_or_truncated_archive(tmp_path: Path, case: str) -> None:
    raw = make_tar(tmp_path / "good.tar", good_tar)
    bad = tmp_path / f"{case}.tar"
    bad.write_bytes(_corruptions(raw)[case])
    (tmp_path / "good.tar").unlink()
    line = fails(tmp_path, str(bad), "-o", str(tmp_path / "out.img"))
    assert "truncated" in line


def through_symlink(tar: tarfile.TarFile) -> None:
    add_entry(tar, "lib", tarfile.SYMTYPE, "/etc")
    add_file(tar, "lib/passwd")


def dir_then_file(tar: tarfile.TarFile) -> None:
    add_entry(tar, "d", tarfile.DIRTYPE)
    add_file(tar, "d")


@pytest.mark.parametrize(("build", "words"), [
    (lambda t: add_file(t, "../evil"), "leaves the tree"),
    (lambda t: add_file(t, "a/../../evil"), "leaves the tree"),
    (through_symlink, "goes through 'lib'"),
    (lambda t: add_entry(t, "hard", tarfile.LNKTYPE, "not-there"), "hardlink"),
    (dir_then_file, "directory and as a"),
    (lambda t: add_file(t, "x" * 300), "longer than 255"),
])
def test_hostile_archive(tmp_path: Path, build: Callable[[tarfile.TarFile], None],
                         words: str) -> None:
    archive = tmp_path / "hostile.tar"
    make_tar(archive, build)
    line = fails(tmp_path, str(archive), "-o", str(tmp_path / "out.img"))
    assert words in line


def test_symlink_in_archive_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    archive = tmp_path / "hostile.tar"

    def escape(tar: tarfile.TarFile) -> None:
        add_entry(tar, "escape", tarfile.SYMTYPE, str(victim))
        add_file(tar, "escape/planted")

    make_tar(archive, escape)
    fails(tmp_path, str(archive), "-o", str(tmp_path / "out.img"))
    assert list(victim.iterdir()) == []


@pytest.mark.root
def test_unreadable_file_as_normal_user(shared_dir: Path) -> None:
    tree = shared_dir / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/shadow").write_text("secret")
    os.chmod(tree / "etc/shadow", 0)
    line = fails(shared_dir, str(tree), "-o", str(shared_dir / "out.img"), user=65534)
    assert "etc/shadow" in line and "permission denied" in line


@pytest.mark.root
def test_unwritable_output_directory(plain_tree: Path, shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)
    tree = shared_dir / "tree"
    plain_tree.rename(tree)
    os.chmod(shared_dir, 0o777)
    line = fails(locked, str(tree), "-o", str(locked / "out.img"), user=65534)
    assert "not writable" in line


@pytest.mark.root
def test_too_little_space_is_caught_before_the_long_work(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "size=2m") as small:
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "big").write_bytes(os.urandom(8 << 20))
        line = fails(small, str(tree), "-o", str(small / "out.img"))
        assert "not enough space" in line


def test_missing_tool_is_named(plain_tree: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkfs.ext4", "debugfs"):
        os.symlink(f"/usr/sbin/{tool}", bin_dir / tool)
    probe = ("import dmoverlay.core.run as r; r.SYSTEM_PATH = ''; "
             "from dmoverlay.cli import main; main()")
    result = subprocess.run(
        [sys.executable, "-c", probe, "build", str(plain_tree), "-o", str(tmp_path / "out.img")],
        capture_output=True, text=True, env={"PATH": str(bin_dir)}, check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("error: mksquashfs not found"), result.stderr
    assert "squashfs-tools" in result.stderr


@pytest.mark.parametrize("command", ["build", "apply"])
@pytest.mark.parametrize("mtime", ["yesterday", "NaN", "Infinity"])
def test_unreadable_pax_time(tmp_path: Path, command: str, mtime: str) -> None:
    """A pax time that is not a number: one error line, for build and apply."""
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/motd")
        info.size, info.pax_headers = 2, {"mtime": mtime}
        tar.addfile(info, io.BytesIO(b"hi"))
    root = tmp_path / "root"
    root.mkdir()
    args = (["build", str(archive), "-o", str(tmp_path / "out.img")] if command == "build"
            else ["apply", str(archive), "--root", str(root), "--run-dir", str(tmp_path)])
    result = dmoverlay(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"unreadable time {mtime!r}" in errors[0], result.stderr
    assert list(root.iterdir()) == []


# ----------------------------------------------------- --from-live (bake)


@pytest.mark.parametrize(("args", "message"), [
    ([], "give SOURCE or --from-live NAME (one of them)"),
    (["{tree}", "--from-live", "live"], "give SOURCE or --from-live NAME (one of them)"),
    (["{tree}", "--freeze-limit", "5"], "--state-dir and --freeze-limit go with --from-live"),
])
def test_source_or_a_live_overlay(plain_tree: Path, tmp_path: Path, args: list[str],
                                  message: str) -> None:
    line = fails(tmp_path, *(a.format(tree=plain_tree) for a in args),
                 "-o", str(tmp_path / "out.img"))
    assert message in line


@pytest.mark.root
@pytest.mark.parametrize(("args", "message"), [
    (["--freeze-limit", "0"], "--freeze-limit 0: give more than 0 and at most 3600 seconds"),
    ([], "no overlay named 'live' is set up"),
])
def test_a_live_overlay_that_cannot_be_baked_is_one_error(tmp_path: Path, args: list[str],
                                                          message: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    line = fails(out, "--from-live", "live", "--state-dir", str(tmp_path / "state"), *args,
                 "-o", str(out / "new.img"))
    assert message in line


def test_baking_needs_root(shared_dir: Path) -> None:
    line = fails(shared_dir, "--from-live", "live", "--state-dir", str(shared_dir / "state"),
                 "-o", str(shared_dir / "new.img"), user=65534)
    assert line == "error: baking a live overlay needs root"


@pytest.mark.root
def test_an_existing_output_is_refused_before_anything(tmp_path: Path) -> None:
    (tmp_path / "new.img").write_bytes(b"precious")
    line = fails(tmp_path, "--from-live", "live", "--state-dir", str(tmp_path / "state"),
                 "-o", str(tmp_path / "new.img"))
    assert "exists" in line
