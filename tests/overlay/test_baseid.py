"""The record of the base a persistent store belongs to: what identifies a
base (real ext4 images made by mkfs.ext4), the record's bytes, and the
checks setup makes on a store file before the kernel sees it."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmoverlay.core.errors import DmoverlayError, ImageError, OverlayError
from dmoverlay.overlay import baseid, persistent, store
from dmoverlay.overlay.baseid import RECORD_OFFSET, RECORD_SIZE, BaseIdentity, Verdict

UUID_A = "0b1e4c36-8d7f-4e0e-9a51-1f7f1d2c3a4b"
UUID_B = "5d2a9f10-7c3e-4b8a-8e6f-2a1b3c4d5e6f"


def ext4(tmp_path: Path, name: str, files: dict[str, bytes], *, uuid: str = UUID_A,
         label: str = "LIVE", size: str = "8M") -> Path:
    tree = tmp_path / f"{name}-tree"
    tree.mkdir()
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    image = tmp_path / f"{name}.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", uuid, "-L", label, "-E",
                    f"hash_seed={uuid}", "-d", str(tree), str(image), size],
                   check=True, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
    return image


def identity_of(image: Path) -> BaseIdentity:
    data = image.read_bytes()
    return baseid.identify(data[:baseid.HEAD_BYTES], len(data) // 512, where=str(image))


# ------------------------------------------------------------- identity


def test_a_base_is_known_by_its_uuid_label_size_and_first_blocks(tmp_path: Path) -> None:
    image = ext4(tmp_path, "a", {"etc.conf": b"one\n"})
    found = identity_of(image)
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(image)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert (found.uuid, found.label, found.sectors) == (blkid, "LIVE", 8 * 2048)
    assert found == identity_of(image)  # the same bytes, the same identity


def test_a_rebuilt_image_is_another_base_even_with_the_same_uuid(tmp_path: Path) -> None:
    a = identity_of(ext4(tmp_path, "a", {"etc.conf": b"one\n"}))
    same = identity_of(ext4(tmp_path, "same", {"etc.conf": b"one\n"}))
    more = identity_of(ext4(tmp_path, "more", {"etc.conf": b"one\n", "new": b"x" * 10000}))
    other = identity_of(ext4(tmp_path, "other", {"etc.conf": b"one\n"}, uuid=UUID_B))
    assert same.key == a.key  # made the same way: the same base
    assert more.uuid == a.uuid and more.key != a.key
    assert other.key != a.key


def test_a_base_that_is_not_ext4_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^/x/rootfs.img: not an ext2/3/4 filesystem"):
        baseid.identify(bytes(65536), 128, where="/x/rootfs.img")


# ------------------------------------------------------------- the record


BASE = BaseIdentity(UUID_A, "LIVE", 16384, hashlib.sha256(b"a").digest())


def chunk0(record: bytes) -> bytes:
    return b"SnAp".ljust(RECORD_OFFSET, b"\0") + record + bytes(4096 - RECORD_OFFSET - len(record))


def test_the_record_reads_back() -> None:
    assert baseid.decode(chunk0(baseid.encode(BASE)), where="s") == BASE
    assert len(baseid.encode(BASE)) == RECORD_SIZE


def test_no_record_is_zero_bytes_as_the_kernel_leaves_them() -> None:
    assert baseid.decode(chunk0(b""), where="s") is None


@pytest.mark.parametrize(("spoil", "words"), [
    (lambda r: b"junk" + r[4:], r"damaged \(unknown bytes after the store's header\)"),
    (lambda r: r[:20] + bytes([r[20] ^ 1]) + r[21:], r"damaged \(its checksum does not match\)"),
    (lambda r: r[:8] + struct.pack("<I", 2) + r[12:], r"of version 2, unknown to this dmoverlay"),
    (lambda r: r[:12] + struct.pack("<I", 1 << 31) + r[16:], r"of version 1, unknown"),
])
def test_a_spoiled_record_is_refused(spoil: object, words: str) -> None:
    assert callable(spoil)
    with pytest.raises(ImageError, match=words) as info:
        baseid.decode(chunk0(spoil(baseid.encode(BASE))), where="/m/overlay")
    assert info.value.message.startswith("/m/overlay: ") and info.value.hint


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(min_size=0, max_size=RECORD_SIZE + 8), st.integers(0, RECORD_SIZE))
def test_any_bytes_are_a_record_none_or_one_error(noise: bytes, at: int) -> None:
    good = bytearray(chunk0(baseid.encode(BASE)))
    good[RECORD_OFFSET + at:RECORD_OFFSET + at + len(noise)] = noise
    try:
        got = baseid.decode(bytes(good[:4096]), where="s")
    except ImageError:
        return
    assert got is None or got == BASE or isinstance(got, BaseIdentity)


def test_a_store_records_its_base_the_same_base_is_taken() -> None:
    assert baseid.judge(BASE, BASE, where="s") is Verdict.SAME
    assert baseid.judge(None, BASE, where="s") is Verdict.UNRECORDED
    relabelled = BaseIdentity(BASE.uuid, "OTHER", BASE.sectors, BASE.digest)
    assert baseid.judge(relabelled, BASE, where="s") is Verdict.SAME


def test_another_base_is_refused_naming_the_one_it_belongs_to() -> None:
    other = BaseIdentity(UUID_B, "OLD\nLIVE", 8192, hashlib.sha256(b"b").digest())
    with pytest.raises(OverlayError) as info:
        baseid.judge(other, BASE, where="LABEL=STICK:/LiveOS/overlay")
    message = info.value.message
    assert message.startswith("LABEL=STICK:/LiveOS/overlay: this overlay was made over "
                              f"another base: ext4 UUID {UUID_B} (label 'OLD\\nLIVE', 4.0 MiB)")
    assert f"not this image's ext4 UUID {UUID_A}" in message and "\n" not in message
    hint = info.value.hint or ""
    assert "--overlay-reset" in hint and "merge" in hint


def test_a_rebuilt_base_of_the_same_uuid_is_refused_as_rebuilt() -> None:
    rebuilt = BaseIdentity(BASE.uuid, BASE.label, BASE.sectors, hashlib.sha256(b"c").digest())
    with pytest.raises(OverlayError, match=f"same UUID {UUID_A} but other content "
                                           r"\(its superblock and group descriptors differ\)"):
        baseid.judge(rebuilt, BASE, where="s")


def test_a_new_store_is_a_valid_empty_store_with_the_record() -> None:
    made = baseid.new_store(BASE)
    assert len(made) == 2 * 4096
    header = persistent.read_header(made, where="s")
    assert header == persistent.StoreHeader(persistent.Store.VALID, 8)
    assert made[16:RECORD_OFFSET] == bytes(RECORD_OFFSET - 16)
    assert baseid.decode(made, where="s") == BASE
    assert made[4096:] == bytes(4096)  # the first exception area: nothing held yet


def test_a_one_sector_chunk_has_no_room() -> None:
    assert not baseid.has_room(1) and baseid.has_room(2) and baseid.has_room(8)
    with pytest.raises(ValueError):
        baseid.new_store(BASE, 1)


# ------------------------------------------------------------- setup's check on a store file


def check(path: Path, base: BaseIdentity = BASE, *, read_only: bool = False) -> None:
    head = path.read_bytes()[:65536]
    header = persistent.read_header(head, where=str(path))
    store.check_base(str(path), head, header, base, shown=str(path), read_only=read_only)


def dracut_store(path: Path) -> None:
    """A store as the kernel leaves it (dracut made it): the header, zeros after."""
    path.write_bytes(struct.pack("<4sIII", b"SnAp", 1, 1, 8).ljust(8192, b"\0") + b"d" * 4096)


def test_a_new_overlay_file_gets_a_header_and_the_record(tmp_path: Path) -> None:
    path = tmp_path / "overlay"
    path.write_bytes(bytes(1 << 20))
    check(path)
    data = path.read_bytes()
    assert data[:16] == struct.pack("<4sIII", b"SnAp", 1, 1, 8)
    assert baseid.decode(data, where="s") == BASE
    assert data[4096:] == bytes(len(data) - 4096)
    check(path)  # and it is taken the next time


def test_a_dracut_store_is_taken_with_a_warning_and_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "overlay"
    dracut_store(path)
    before = path.read_bytes()
    check(path)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path}: no record of the base it belongs to (made by "
                          f"dracut?): taken as ext4 UUID {UUID_A}") and "and recorded" in err
    after = path.read_bytes()
    assert after[:RECORD_OFFSET] == before[:RECORD_OFFSET]  # the header the kernel reads
    assert after[RECORD_OFFSET + RECORD_SIZE:] == before[RECORD_OFFSET + RECORD_SIZE:]
    check(path)
    assert capsys.readouterr().err == ""  # recorded: no warning the second time


def test_a_dracut_store_shown_read_only_is_not_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "overlay"
    dracut_store(path)
    before = path.read_bytes()
    check(path, read_only=True)
    assert "not recorded (read-only)" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("read_only", [False, True])
def test_a_store_of_another_base_is_refused_and_left_as_it_was(tmp_path: Path,
                                                               read_only: bool) -> None:
    path = tmp_path / "overlay"
    path.write_bytes(bytes(1 << 20))
    check(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    other = BaseIdentity(UUID_B, "B", BASE.sectors, hashlib.sha256(b"b").digest())
    with pytest.raises(OverlayError, match="this overlay was made over another base"):
        check(path, other, read_only=read_only)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_store_of_one_sector_chunks_is_used_unchecked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "overlay"
    path.write_bytes(struct.pack("<4sIII", b"SnAp", 1, 1, 1).ljust(8192, b"\0"))
    before = path.read_bytes()
    check(path)
    assert "leave no room to record the base" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_a_store_that_cannot_be_written_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "overlay"
    dracut_store(path)
    head = path.read_bytes()
    header = persistent.read_header(head, where="s")
    with pytest.raises(DmoverlayError, match="cannot write the record of its base into s"):
        store.check_base(str(tmp_path / "gone" / "overlay"), head, header, BASE, shown="s",
                          read_only=False)
