"""The debugfs encoder against the real debugfs: whatever bytes a name
holds, the script carries exactly that name, or refuses it; nothing in a
name starts a command of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmoverlay.core import debugfs
from dmoverlay.core.errors import DebugfsFailed, ImageError, Unscriptable

NS = 1_000_000_000
FILE_INODE = 12  # the first inode mkfs gives: the only file of the template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ext4 image holding one file, "f" (inode 12)."""
    where = tmp_path_factory.mktemp("debugfs")
    (where / "src").mkdir()
    (where / "src/f").write_bytes(b"data")
    image = where / "template.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", where / "src", image], check=True,
                   env={"PATH": os.environ["PATH"], "E2FSPROGS_FAKE_TIME": "1"})
    return image


def fresh(template: Path, where: Path) -> Path:
    image = where / "img"
    shutil.copyfile(template, image)
    return image


# Bytes a file name can hold (no "/" or NUL), biased to what a parser may
# take for syntax: quotes, blanks, backslashes, comment signs, control bytes.
_TRICKY = st.sampled_from([b'"', b'""', b" ", b"\t", b"\\", b"#", b"<12>", b"'", b"\x01",
                           b"\x7f", b"\xff", b"\r", b"\n", b";", b"|"])
_TAKEN = (b".", b"..", b"f", b"lost+found")  # in the image already: ln would fail
_NAME = st.lists(st.one_of(_TRICKY, st.binary(min_size=1, max_size=4)), min_size=1,
                 max_size=12).map(b"".join).map(lambda b: b.replace(b"/", b"_").replace(
                     b"\0", b"_")[:255]).filter(lambda b: b not in _TAKEN)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_NAME, min_size=1, max_size=6, unique=True))
def test_names_reach_debugfs_exactly(template: Path, tmp_path: Path,
                                     names: list[bytes]) -> None:
    """Each name, linked into the root directory by a script the encoder
    wrote, is listed back byte for byte; no other entry appears.  A name
    the encoder refuses is one debugfs cannot be given (CR, LF)."""
    image = fresh(template, tmp_path)
    lines, kept = [], []
    for name in names:
        try:
            encoded = debugfs.argument(name)
        except Unscriptable:
            assert b"\r" in name or b"\n" in name
            continue
        kept.append(name)
        lines.append(debugfs.command(b"ln", debugfs.inode(FILE_INODE), encoded))
    debugfs.run_script(image, debugfs.script(lines), scratch=tmp_path, name="s", write=True)
    listing = debugfs.run_script(image, debugfs.script([debugfs.command(
        b"ls -p", debugfs.inode(debugfs.ROOT_INODE))]), scratch=tmp_path, name="l", write=False)
    found = debugfs.parse_listings(listing)[debugfs.ROOT_INODE]
    assert set(found) == {b"lost+found", b"f", *kept}
    assert all(found[name] == FILE_INODE for name in kept)


@given(st.binary(max_size=40))
def test_argument_refuses_exactly_what_ends_a_line(raw: bytes) -> None:
    if any(b in raw for b in b"\0\r\n"):
        with pytest.raises(Unscriptable):
            debugfs.argument(raw)
    else:
        encoded = debugfs.argument(raw)
        assert encoded[0] == encoded[-1] == ord('"')
        assert encoded[1:-1].replace(b'""', b'"') == raw


def test_an_injected_command_is_refused_not_run(template: Path, tmp_path: Path) -> None:
    """The attack of issue 8: a newline in a name ends the command and
    starts one of the attacker's (here: copy a host file out of reach)."""
    victim = tmp_path / "victim"
    with pytest.raises(Unscriptable, match="newline"):
        debugfs.argument(f'user.x\ndump <12> "{victim}"')
    assert not victim.exists()


def test_a_line_longer_than_debugfs_reads_is_refused(template: Path, tmp_path: Path) -> None:
    """debugfs cuts a line at 8191 bytes and runs the rest as a command."""
    image = fresh(template, tmp_path)
    prefix = b'sif <12> uid "'
    digits = b"0" * (debugfs.MAX_LINE - len(prefix) - 2) + b"7"
    longest = debugfs.command(b"sif", debugfs.inode(FILE_INODE), b"uid",
                              debugfs.argument(digits))
    assert len(longest) == debugfs.MAX_LINE
    debugfs.run_script(image, debugfs.script([longest]), scratch=tmp_path, name="s", write=True)
    out = subprocess.run(["debugfs", "-R", "stat <12>", image], capture_output=True,
                         text=True, check=True).stdout
    assert "User:     7" in out
    with pytest.raises(Unscriptable, match="too long"):
        debugfs.command(b"ln", debugfs.inode(FILE_INODE), debugfs.argument(b"x" * 8200))


def test_script_errors_are_caught(template: Path, tmp_path: Path) -> None:
    """debugfs exits 0 whatever happens; "Command not found" and
    "Unbalanced quotes" (on stderr, prefixed "debugfs: ") are failures."""
    image = fresh(template, tmp_path)
    for text in (b"bogus\n", b'sif "/f\n', b'sif "/nothing" uid 1\n'):
        with pytest.raises(ImageError, match="debugfs could not finish"):
            debugfs.run_script(image, text, scratch=tmp_path, name="s", write=True)
    assert debugfs.problems("debugfs 1.47.0 (5-Feb-2023)\n") == []


def test_a_listing_cannot_be_forged_by_a_name() -> None:
    """A name holding a newline and what looks like records and echoes is
    one name: the field ends only at a "/", which a name cannot hold."""
    forged = b"x\ndebugfs: ls -p <99>\n"
    out = (b"debugfs: ls -p <2>\n/2/040755/0/0/.//\n/2/040755/0/0/..//\n"
           b"/12/100644/0/0/" + forged + b"/3/\n/13/040755/0/0/d//\n\n")
    assert debugfs.parse_listings(out) == {2: {forged: 12, b"d": 13}}


def test_inode_numbers_of_a_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a\nb/c d").mkdir(parents=True)
    (src / "a\nb/c d/f\r").write_bytes(b"")
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", src, image], check=True)
    numbers = debugfs.inode_numbers(image, ["", "a\nb", "a\nb/c d", "a\nb/c d/f\r"],
                                    {"", "a\nb", "a\nb/c d"}, scratch=tmp_path)
    number = numbers["a\nb/c d/f\r"]
    out = subprocess.run(["debugfs", "-R", f"stat <{number}>", image],
                         capture_output=True, text=True, check=True).stdout
    assert "Type: regular" in out
    with pytest.raises(ImageError, match="not in the image"):
        debugfs.inode_numbers(image, ["", "gone"], {""}, scratch=tmp_path)


@pytest.mark.parametrize(("ns", "words"), [
    (-(2**31 + 1) * 10**9, "1901"),
    (2**34 * 10**9, "2446"),
])
def test_times_ext4_cannot_hold(ns: int, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        debugfs.time_fields(ns)


def test_an_image_whose_path_reads_as_options(template: Path, tmp_path: Path) -> None:
    """A "?" in the image's path would start debugfs's options: scripts and
    requests reach the image through a link of their own."""
    where = tmp_path / "x?offset=1024"
    where.mkdir()
    image = fresh(template, where)
    debugfs.run_script(image, debugfs.script([debugfs.command(
        b"sif", debugfs.inode(FILE_INODE), b"uid", b"7")]), scratch=tmp_path, name="s",
        write=True)
    out = subprocess.run(["debugfs", "-R", f"stat <{FILE_INODE}>", "img"], cwd=where,
                         capture_output=True, text=True, check=True).stdout
    assert "User:     7" in out
    assert "User:     7" in debugfs.request(image, b"stat", debugfs.inode(FILE_INODE))
    with pytest.raises(Unscriptable, match="'\\?'"):
        debugfs.device(image)  # what the link is for


def test_a_request_answers_or_names_what_failed(template: Path, tmp_path: Path) -> None:
    image = fresh(template, tmp_path)
    assert "Type: regular" in debugfs.request(image, b"stat", debugfs.argument("/f"))
    assert "Inode:" not in debugfs.request(image, b"stat", debugfs.argument("/gone"))
    with pytest.raises(DebugfsFailed, match="Command not found"):
        debugfs.request(image, b"bogus")


def test_device_names_an_offset() -> None:
    assert debugfs.device("disk", 1 << 20) == "disk?offset=1048576"
    assert debugfs.device("disk") == "disk"


@pytest.mark.parametrize(("ns", "low", "extra"), [
    (0, 0, 0),
    (1_600_000_000 * NS + 123_456_789, 1_600_000_000, 123_456_789 << 2),
    (-1 * NS, 0xFFFFFFFF, 0),  # 1969: a negative 32-bit value, epoch bits 0
    (-(2**31) * NS, 0x80000000, 0),
    (2**31 * NS, 0x80000000, 1),  # 2038: past the signed 32-bit line
    (4_102_444_800 * NS, 4_102_444_800 - 2**32, 1),  # 2100
    ((2**32 + 5) * NS + 7, 5, (7 << 2) | 1),
])
def test_time_fields(ns: int, low: int, extra: int) -> None:
    assert debugfs.time_fields(ns) == (low & 0xFFFFFFFF, extra)


@given(st.integers(min_value=-(2**31), max_value=2**34 - 2**31 - 1),
       st.integers(min_value=0, max_value=NS - 1))
def test_time_fields_round_trip(seconds: int, nanos: int) -> None:
    """Decoding as the kernel does gives back the time we encoded."""
    low, extra = debugfs.time_fields(seconds * NS + nanos)
    signed = low - 2**32 if low & 0x80000000 else low
    assert signed + ((extra & 3) << 32) == seconds
    assert extra >> 2 == nanos
