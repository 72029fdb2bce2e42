"""debugfs, the one tool that writes ext4 fields without privilege: the
scripts we give it, how every string in them is encoded, and how its answers
are read.  Nothing else writes a debugfs command.

Its request parser (e2fsprogs 1.47.0, lib/ss, found by experiment and pinned
by tests/build/test_debugfs.py against the real program):

- `debugfs -f` reads its script with fgets into 8 KiB: a longer line is cut
  there and its rest read as a new command; a NUL or a carriage return ends
  the line early; a newline starts the next command.
- A line is split into arguments at spaces and tabs outside double quotes;
  inside them `""` is one quote; a backslash is an ordinary byte; quoted and
  unquoted parts of one argument join (`"a"b` is `ab`).  `#` starts a
  comment only as a line's first byte.

So any bytes but NUL, CR and LF make one argument: in double quotes, with
their quotes doubled.  Names that hold those bytes never go into a script:
commands address inodes by number (`<12>`), found with `ls -p`, whose
output cannot be forged by a name (a name cannot hold the `/` that ends
its field)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from dmoverlay.core.errors import DebugfsFailed, ImageError, Unscriptable
from dmoverlay.core.run import Result, run, run_exact

# fgets(buf, BUFSIZ): a line and its newline in 8191 bytes
MAX_LINE = 8190
_UNSCRIPTABLE = re.compile(rb"[\0\r\n]")
ROOT_INODE = 2
TIME_FIELDS = (b"mtime", b"atime", b"ctime", b"crtime")



def argument(text: str | bytes | os.PathLike[str]) -> bytes:
    """`text` as one debugfs argument, read back exactly; Unscriptable for
    what it cannot carry (NUL, CR, LF)."""
    raw = os.fsencode(text)
    bad = _UNSCRIPTABLE.search(raw)
    if bad is not None:
        raise Unscriptable(f"{os.fsdecode(raw)!r} holds a {_NAMES[bad.group()]}, which "
                           "debugfs cannot be given", hint="rename it in the source")
    return b'"' + raw.replace(b'"', b'""') + b'"'


_NAMES = {b"\0": "NUL byte", b"\r": "carriage return", b"\n": "newline"}


def scriptable(text: str | bytes | os.PathLike[str]) -> bool:
    return _UNSCRIPTABLE.search(os.fsencode(text)) is None


def inode(number: int) -> bytes:
    """An inode as a debugfs argument, by number: no name to look up."""
    return b"<%d>" % number


def command(*words: bytes) -> bytes:
    """One script line of words already encoded (by argument(), inode() or
    as our own constants), checked to fit debugfs's line buffer."""
    line = b" ".join(words)
    if len(line) > MAX_LINE or _UNSCRIPTABLE.search(line):
        raise Unscriptable(f"a debugfs command of {len(line)} bytes is too long for it",
                           hint="shorten the names in the source")
    return line


def script(lines: Iterable[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


# ---------------------------------------------------------------------- times


def time_fields(ns: int) -> tuple[int, int]:
    """ext4's (seconds low 32 bits, extra) for a time in nanoseconds since
    1970: the extra word holds the nanoseconds and two epoch bits added to
    the signed low word, which covers 1901-12-13 to 2446-05-10."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    low = seconds & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    epoch_bits = (seconds - signed_low) >> 32
    if not 0 <= epoch_bits <= 3:
        raise ImageError(f"time {seconds} s is outside what ext4 holds (1901 to 2446)",
                         hint="fix the time in the source")
    return low, (nanos << 2) | epoch_bits


def set_times(target: bytes, times: Mapping[bytes, int]) -> list[bytes]:
    """Commands setting the times (field name -> ns) of one inode."""
    lines = []
    for field, ns in times.items():
        low, extra = time_fields(ns)
        lines.append(command(b"sif", target, field + b"_lo", b"%d" % low))
        lines.append(command(b"sif", target, field + b"_extra", b"%d" % extra))
    return lines


def set_all_times(target: bytes, ns: int) -> list[bytes]:
    """Commands giving one inode the same time in each of its four fields."""
    return set_times(target, dict.fromkeys(TIME_FIELDS, ns))


# ----------------------------------------------------------- modes and owners


def set_mode(target: bytes, mode: int) -> bytes:
    """The command setting an inode's whole mode (type bits included)."""
    return command(b"sif", target, b"mode", b"0%o" % mode)


def set_owner(target: bytes, uid: int, gid: int) -> list[bytes]:
    return [command(b"sif", target, b"uid", b"%d" % uid),
            command(b"sif", target, b"gid", b"%d" % gid)]


# ---------------------------------------------------------------- its answers

_BANNER = re.compile(r"debugfs \d+\.\d+")
# What it says of a path that is not there: an answer to "is it there?"
_ABSENT = ("File not found by ext2_lookup", "Ext2 inode is not a directory")



def problems(stderr: str) -> list[str]:
    """debugfs exits 0 whatever its commands do: every line of its stderr
    but the version banner is a failure (the echo of each command goes to
    stdout; "debugfs: Command not found" and its like go to stderr)."""
    return [line.strip() for line in stderr.splitlines()
            if line.strip() and not _BANNER.match(line)]


def device(path: str | os.PathLike[str], offset: int = 0) -> str:
    """How debugfs is told of a filesystem at byte `offset` of `path`: its
    unix I/O manager reads "NAME?offset=N", so a path holding a "?" cannot
    be given at all (callers link it under a name of their own)."""
    name = os.fspath(path)
    if "?" in name:
        raise Unscriptable(f"{name!r} holds a '?', which debugfs reads as the start of "
                           "its options", hint="report this as a bug")
    return f"{name}?offset={offset}" if offset else name


def request(image: str | os.PathLike[str], *words: bytes, offset: int = 0) -> str:
    """Run one read-only request (`debugfs -R`, words encoded here) on the
    filesystem at `offset` of `image`; its stdout.  A path that is not there
    is no failure (the answer is empty); anything else debugfs complains of
    is DebugfsFailed."""
    with _named_plainly(image) as name:
        result = run(["debugfs", "-R", os.fsdecode(command(*words)), device(name, offset)],
                     check=False)
    found = _failures(result)
    if found and not any(text in found[0] for text in _ABSENT):
        raise DebugfsFailed(f"debugfs cannot read {os.path.basename(image)}: {found[0]}",
                     problem=found[0])
    return result.stdout


@contextmanager
def _named_plainly(image: str | os.PathLike[str]) -> Iterator[str]:
    """The image under a name debugfs reads as a name: itself, or, when its
    path holds a "?", a link of ours in a private directory made for it."""
    path = os.fspath(image)
    if "?" not in path:
        yield path
        return
    import tempfile  # for such a name only: not at setup's start-up

    with tempfile.TemporaryDirectory(prefix="dmoverlay-debugfs-") as scratch:
        link = os.path.join(scratch, "image")
        os.symlink(os.path.abspath(path), link)
        yield link


def _failures(result: Result) -> list[str]:
    """What went wrong, from its stderr; its exit code is only the last
    command's, so it counts when stderr says nothing."""
    return problems(result.stderr) or ([f"exit {result.returncode}"] if result.returncode
                                       else [])


def run_script(image: str | os.PathLike[str], text: bytes, *, scratch: Path, name: str,
               write: bool, offset: int = 0, epoch: int | None = None) -> bytes:
    """Run a script on the filesystem at `offset` of `image`; its stdout, or
    ImageError naming the first failure.  debugfs runs in `scratch` (which
    must be private to us): the script is `name` there, `image` is reached by
    a link of a name of ours, whatever its path holds, and any file the
    script names by a relative path is found there.  `epoch` (seconds) is
    the time debugfs stamps on the superblock, else it writes "now"."""
    (scratch / name).write_bytes(text)
    link = scratch / f"{name}.image"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(image).absolute())
    argv = ["debugfs", *(["-w"] if write else []), "-f", name, device(link.name, offset)]
    env = None if epoch is None else {"E2FSPROGS_FAKE_TIME": str(epoch)}
    result = run_exact(argv, env=env, cwd=scratch)
    found = _failures(result)
    if found:
        raise DebugfsFailed(f"debugfs could not finish {os.path.basename(image)}: {found[0]}",
                     problem=found[0],
                     hint=f"{len(found)} debugfs message(s); rerun with --debug")
    return result.stdout.encode(errors="surrogateescape")  # as run() decoded it


# --------------------------------------------------------------- inode numbers

# `ls -p`: /INODE/MODE/UID/GID/NAME/SIZE/ per entry (SIZE empty for a
# directory); the name is raw bytes, any but "/" and NUL, newlines included
_ENTRY = re.compile(rb"/(\d+)/[0-7]+/\d+/\d+/([^/]*)/\d*/\n")
_ECHO = re.compile(rb"debugfs: ls -p <(\d+)>\n")


def parse_listings(out: bytes) -> dict[int, dict[bytes, int]]:
    """The output of a script of `ls -p <N>` commands: for each directory
    inode, its names and their inodes ("." and ".." left out)."""
    found: dict[int, dict[bytes, int]] = {}
    current: dict[bytes, int] | None = None
    pos = 0
    while pos < len(out):
        if (entry := _ENTRY.match(out, pos)) is not None and current is not None:
            if entry.group(2) not in (b".", b".."):
                current[entry.group(2)] = int(entry.group(1))
            pos = entry.end()
        elif (echo := _ECHO.match(out, pos)) is not None:
            current = found.setdefault(int(echo.group(1)), {})
            pos = echo.end()
        elif out[pos:pos + 1] == b"\n":
            pos += 1
        else:
            raise ImageError(f"unexpected debugfs listing at byte {pos}: "
                             f"{out[pos:pos + 40]!r}", hint="report this as a bug")
    return found


def inode_numbers(image: Path, paths: Iterable[str], directories: set[str], *,
                  scratch: Path) -> dict[str, int]:
    """The inode of each of `paths` ("" the root) in the ext4 `image`,
    listed a directory level at a time."""
    wanted = set(paths)
    numbers = {"": ROOT_INODE}
    level = [""]
    while level:
        text = script(command(b"ls -p", inode(numbers[d])) for d in level)
        listings = parse_listings(run_script(image, text, scratch=scratch, name="ls.debugfs",
                                             write=False))
        following = []
        for directory in level:
            names = listings.get(numbers[directory], {})
            for name, number in names.items():
                path = f"{directory}/{os.fsdecode(name)}" if directory else os.fsdecode(name)
                if path in wanted:
                    numbers[path] = number
                    if path in directories:
                        following.append(path)
        level = following
    missing = sorted(wanted - numbers.keys())
    if missing:
        raise ImageError(f"{missing[0]!r} is not in the image mkfs.ext4 made",
                         hint="report this as a bug")
    return numbers
