"""Copying the image into RAM: every way of copying gives the same bytes, a
way the kernel refuses gives way to the next, a source that ends early or
fails is one error line, and progress is a few lines off a terminal."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverlay.core import log
from dmoverlay.core.errors import OverlayError
from dmoverlay.core.sizes import KiB, MiB
from dmoverlay.overlay import ramcopy
from dmoverlay.overlay.ramcopy import METHODS, Method, copy_image


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Crosses chunks (of 1 MiB here) and ends in the middle of a page."""
    path = tmp_path / "squashfs.img"
    path.write_bytes(os.urandom(5 * MiB + 1234))
    return path


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ramcopy, "CHUNK", MiB)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_each_way_copies_the_same_bytes(tmp_path: Path, source: Path, method: Method) -> None:
    copy_image(str(source), tmp_path / "copy", source.stat().st_size, methods=(method,))
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()


def test_only_the_size_asked_is_copied(tmp_path: Path, source: Path) -> None:
    """A filesystem on a larger partition: its own bytes, not the partition's."""
    copy_image(str(source), tmp_path / "copy", 3 * MiB + 4 * KiB)
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()[:3 * MiB + 4 * KiB]


def _refusing(err: int, calls: list[str]) -> Method:
    def method(src: int, dst: int, offset: int, count: int) -> int:
        calls.append("refused")
        raise OSError(err, os.strerror(err))
    return method


def _copying_nothing(calls: list[str]) -> Method:
    def method(src: int, dst: int, offset: int, count: int) -> int:
        calls.append("nothing")
        return 0
    return method


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_way_the_kernel_refuses_gives_way_to_the_next_once(tmp_path: Path, source: Path,
                                                             err: int) -> None:
    calls: list[str] = []
    methods = (_refusing(err, calls), _copying_nothing(calls), ramcopy._by_sendfile)
    copy_image(str(source), tmp_path / "copy", source.stat().st_size, methods=methods)
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert calls == ["refused", "nothing"]  # found on the first chunk, kept after


def test_a_source_that_ends_early_is_one_line(tmp_path: Path, source: Path) -> None:
    """The size was read before the copy; a medium pulled out (or an image
    cut) ends sooner."""
    size = source.stat().st_size
    with pytest.raises(OverlayError) as caught:
        copy_image(str(source), tmp_path / "copy", size + MiB)
    assert caught.value.message == (f"cannot copy {source} to RAM: it ends after {size} of "
                                    f"{size + MiB} bytes")
    assert caught.value.hint


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_a_read_or_write_error_is_one_line(tmp_path: Path, source: Path, err: int) -> None:
    calls: list[str] = []
    with pytest.raises(OverlayError) as caught:
        copy_image(str(source), tmp_path / "copy", source.stat().st_size,
                   methods=(_refusing(err, calls), ramcopy._by_read_write))
    assert caught.value.message == (f"cannot copy {source} to RAM: {os.strerror(err)} "
                                    f"(after 0 of {source.stat().st_size} bytes)")
    assert calls == ["refused"]  # an error, not a way refused: no other way tried


def test_the_copy_is_a_new_file(tmp_path: Path, source: Path) -> None:
    (tmp_path / "copy").write_text("someone's")
    with pytest.raises(OverlayError, match="File exists"):
        copy_image(str(source), tmp_path / "copy", source.stat().st_size)
    assert (tmp_path / "copy").read_text() == "someone's"


@pytest.fixture
def loud() -> Iterator[None]:
    quiet, log.quiet = log.quiet, False
    yield
    log.quiet = quiet


def test_progress_off_a_terminal_is_a_line_a_quarter(tmp_path: Path, source: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    loud: None) -> None:
    """At boot the console is no terminal: a redrawn percentage would be a
    line per chunk there."""
    copy_image(str(source), tmp_path / "copy", source.stat().st_size)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1].split("%")[0] for line in lines[:-1]] == ["39", "59", "79"]
    assert lines[-1].startswith("copied 5.0 MiB in ")
    log.quiet = True
    copy_image(str(source), tmp_path / "again", source.stat().st_size)
    assert capsys.readouterr().err == ""


@pytest.mark.root
def test_a_block_device_is_copied(tmp_path: Path, source: Path) -> None:
    """The medium may be a device (a squashfs partition): copy_file_range does
    not read one, the next way does."""
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(source)],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        copy_image(dev, tmp_path / "copy", 5 * MiB)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()[:5 * MiB]
