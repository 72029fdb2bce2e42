"""What an update is comes from its content, never its name; what is no
update is one clear error."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from dmoverlay.apply.readers import open_update
from dmoverlay.apply.readers.detect import ACCEPTED, Format, identify
from dmoverlay.core.errors import SourceError
from tests.apply.readers.readkit import (
    compress_bytes,
)


def test_identify_by_content() -> None:
    ustar = bytearray(512)
    ustar[257:263] = b"ustar\0"
    ext = bytearray(4096)
    ext[1080:1082] = b"\x53\xef"
    assert identify(b"070701" + bytes(104)) is Format.CPIO
    assert identify(b"070702" + bytes(104)) is Format.CPIO
    assert identify(b"070707" + bytes(70)) is Format.CPIO
    assert identify(b"\xc7\x71" + bytes(24)) is Format.CPIO
    assert identify(b"\x71\xc7" + bytes(24)) is Format.CPIO
    assert identify(bytes(ustar)) is Format.TAR
    assert identify(b"hsqs" + bytes(92)) is Format.SQUASHFS
    assert identify(bytes(ext)) is Format.EXT
    assert identify(b"hello world" * 100) is None
    assert identify(bytes(4096)) is None


def test_old_v7_tar_is_recognised_by_its_header_checksum() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    raw = bytearray(buf.getvalue()[:512])
    raw[257:265] = bytes(8)
    raw[148:156] = b"%06o\0 " % (sum(raw[:148]) + 8 * 32 + sum(raw[156:512]))
    assert identify(bytes(raw)) is Format.TAR
    raw[0] ^= 1
    assert identify(bytes(raw)) is None


def not_an_update(path: Path, staging: Path, words: str) -> None:
    with pytest.raises(SourceError, match=words) as info, \
            open_update(str(path), staging=staging):
        pass
    assert info.value.hint == ACCEPTED


def test_unrecognised_content(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "update.img"  # the name says nothing
    path.write_bytes(os.urandom(5000))
    not_an_update(path, staging, r"not an update: .* \(content not recognised\)")
    path.write_bytes(b"")
    not_an_update(path, staging, r"\(empty file\)")
    path.write_bytes(compress_bytes(os.urandom(5000), "gzip"))
    not_an_update(path, staging, r"\(gzip-compressed, content not recognised\)")
    disk = bytearray(4096)
    disk[512:520] = b"EFI PART"
    path.write_bytes(bytes(disk))
    not_an_update(path, staging, "a gpt disk image")


def test_a_fifo_is_refused_without_hanging(tmp_path: Path, staging: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    not_an_update(tmp_path / "pipe", staging, "not a regular file or directory")


def test_missing_path(tmp_path: Path, staging: Path) -> None:
    with pytest.raises(SourceError, match=r"cannot read .*nope: No such file"), \
            open_update(str(tmp_path / "nope"), staging=staging):
        pass



@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_compressed_images_are_refused_with_a_hint(tmp_path: Path, staging: Path,
                                                   how: str) -> None:
    path = tmp_path / "image"
    path.write_bytes(compress_bytes(b"hsqs" + bytes(8000), how))
    with pytest.raises(SourceError, match=f"a {how}-compressed squashfs image") as info, \
            open_update(str(path), staging=staging):
        pass
    assert info.value.hint is not None and "decompress it first" in info.value.hint


def test_corrupt_compressed_head(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "u"
    path.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))
    with pytest.raises(SourceError, match="corrupt gzip data"), \
            open_update(str(path), staging=staging):
        pass
