"""Plain tar headers read by dmoverlay.core.tarheader agree with Python's tarfile,
the reference: on generated archives of every format, and on damaged ones."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmoverlay.core.entries import Member
from dmoverlay.core.errors import SourceError
from dmoverlay.core.tarheader import checksum, plain_header
from dmoverlay.core.tarread import TarReader

KINDS = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE]
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]

segment = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="/"),
                  min_size=1, max_size=40)
entry = st.tuples(
    st.lists(segment, min_size=1, max_size=5).map("/".join),  # names past 100 bytes too
    st.sampled_from(KINDS),
    st.integers(0, 0o7777),
    st.sampled_from([0, 1000, 65534, 8**7 - 1, 8**7, 2**21 + 3]),  # 8**7: base-256 in GNU
    st.sampled_from([0, 1, 1_700_000_000, 8**11 - 1, 8**11]),
    st.binary(max_size=1200),
    st.sampled_from(["", "target", "a/b/c", "x" * 120]),
    st.sampled_from([(0, 0), (8, 1), (259, 70000)]),
)


Read = list[tuple[Member, object]] | str
Entry = tuple[str, bytes, int, int, int, bytes, str, tuple[int, int]]
ONE_DIR = [HealthCheck.function_scoped_fixture]  # each example writes the same one file


def make_tar(entries: list[Entry], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, kind, mode, uid, mtime, data, link, (major, minor) in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, uid, mtime
            info.linkname = link if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.devmajor, info.devminor = major, minor
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()




def read(path: Path, *, fast: bool) -> Read:
    reader = TarReader(path, label="t.tar", description="", in_place=True, fast=fast)
    try:
        found = []
        for member, stream in reader.members():
            located = getattr(stream, "located", None)
            found.append((member, located() if located else None))
        return found
    except SourceError as exc:
        return f"{exc.message} / {exc.hint}"


def agree(tmp_path: Path, data: bytes) -> Read:
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    fast, reference = read(path, fast=True), read(path, fast=False)
    assert fast == reference
    return fast


@settings(max_examples=200, deadline=None, suppress_health_check=ONE_DIR)
@given(st.lists(entry, max_size=8), st.sampled_from(FORMATS))
def test_generated_archives_read_alike(tmp_path: Path, entries: list[Entry], fmt: int) -> None:
    try:
        data = make_tar(entries, fmt)
    except ValueError:
        return  # not writable in this format (tarfile says so): nothing to read
    agree(tmp_path, data)


@settings(max_examples=300, deadline=None, suppress_health_check=ONE_DIR)
@given(st.lists(entry, min_size=1, max_size=4), st.sampled_from(FORMATS),
       st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=4),
       st.booleans())
def test_damaged_archives_read_alike(tmp_path: Path, entries: list[Entry],
                                     fmt: int, flips: list[tuple[int, int]],
                                     fix_checksum: bool) -> None:
    """Bytes changed anywhere (in a header, a checksum made to match again or
    not, so that its fields are read): both readers accept the same members or
    fail with the same message."""
    try:
        data = bytearray(make_tar(entries, fmt))
    except ValueError:
        return
    for at, value in flips:
        if at < len(data):
            data[at] = value
            if fix_checksum:
                head = at - at % 512
                data[head + 148:head + 156] = b"%06o\0 " % checksum(bytes(data[head:head + 512]))
    agree(tmp_path, bytes(data))


def test_the_fast_reader_reads_plain_headers_itself(tmp_path: Path) -> None:
    """Not a fallback to tarfile in disguise: a GNU tar header is read here."""
    data = make_tar([("lib/libfoo.so", tarfile.REGTYPE, 0o755, 0, 5, b"abc", "", (0, 0))],
                    tarfile.GNU_FORMAT)
    member = plain_header(data[:512])
    assert member is not None
    assert (member.name, member.mode, member.size, member.mtime_ns) == \
        ("lib/libfoo.so", 0o755, 3, 5_000_000_000)
    assert plain_header(data[512 * 2:512 * 3]) is None  # the end: zeros


@pytest.mark.parametrize("field", [slice(100, 108), slice(124, 136), slice(148, 156)])
def test_a_header_not_plain_is_left_to_tarfile(field: slice) -> None:
    data = bytearray(make_tar([("f", tarfile.REGTYPE, 0o644, 0, 5, b"abc", "", (0, 0))],
                              tarfile.USTAR_FORMAT)[:512])
    data[field.start] = 0x80  # base-256, or not a number: tarfile decides
    assert plain_header(bytes(data)) is None


def test_checksum_counts_every_byte() -> None:
    head = bytes(range(256)) * 2
    assert checksum(head) == sum(head[:148]) + 256 + sum(head[156:])
    assert checksum(b"\xff" * 512) == 504 * 255 + 256
