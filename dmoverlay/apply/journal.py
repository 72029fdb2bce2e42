"""The journal of one apply: enough to undo it exactly, from any point.

Each tree (root, live /run) keeps its journals at `.dmoverlay/journal/<txn>/`
on its own filesystem, so that every move is a rename, never a copy.  The
log is JSON lines, written and synced before the changes it announces:

  {"step": "begin", "time_ns"}                          when the first entry was made
  {"step": "mkdir", "n", "tree", "path"}                a directory we make
  {"step": "put", "n", "tree", "path", "tmp"}           a file written as tmp, renamed in
  {"step": "ready", "n", "ino", "size", "mtime_ns"}     tmp is complete: its inode, size, time
  {"step": "taken", "n"}                                n's name was there before us: not ours
  {"step": "remove", "n", "tree", "path"}               moved to <txn>/<n> (whiteout)
  {"step": "times", "tree", "path", "atime_ns", "mtime_ns"}  a directory's times before
  {"step": "done"}

A replaced inode ends at <txn>/<n> in its tree.  Undoing needs no more than
the log and what is on disk: the inode numbers tell old from new.

The log lies in the root, which an image or a person may have written: it
is input.  Every record is checked (its fields, its paths: plain relative
names that resolve beneath their tree) before anything is undone, and a log
that fails is refused whole, with the line that failed."""

from __future__ import annotations

import json
import os
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cached_property
from json.encoder import encode_basestring_ascii

from dmoverlay.apply.plan import PATH_MAX, RESERVED_TOP
from dmoverlay.core.errors import JournalError

JOURNALS = ".dmoverlay/journal"
LOG = "log"
MAX_LOG = 256 << 20  # bytes: ~1.5 million files; an apply that would write more is refused
TXN_DIGITS = 18  # a transaction's name: at most this many digits (an int64 holds them)
DONE_LINE = b'{"step":"done"}\n'
_encode = json.JSONEncoder(separators=(",", ":")).encode
_string = encode_basestring_ascii  # a JSON string, as _encode writes it

# the fields each step may have (absent ones read as the defaults, as an
# older dmoverlay left out fields that were 0 or empty)
_FIELDS: dict[str, tuple[str, ...]] = {
    "begin": ("time_ns",),
    "mkdir": ("n", "tree", "path"),
    "put": ("n", "tree", "path", "tmp"),
    "ready": ("n", "ino", "size", "mtime_ns"),
    "taken": ("n",),
    "remove": ("n", "tree", "path"),
    "times": ("tree", "path", "atime_ns", "mtime_ns"),
    "done": (),
}
_STRINGS = frozenset({"tree", "path", "tmp"})
_NATURAL = frozenset({"n", "ino", "size", "time_ns"})  # times may be before 1970
TREES = ("root", "run")
MADE = frozenset({"mkdir", "put", "remove"})  # steps that number a change: n unique



def _bad_hint(txn: str) -> str:
    return (f"nothing was changed; the journal is damaged or not dmoverlay's: look at it, "
            f"then move it aside (e.g. rename {txn} to {txn}.bad) to go on without it")


@dataclass(slots=True)
class Record:
    step: str
    n: int = 0
    tree: str = ""
    path: str = ""
    tmp: str = ""
    ino: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    size: int = -1  # "ready": -1 when not known (a log of an older dmoverlay)
    time_ns: int = 0

    def to_json(self) -> str:
        # "put" and "ready": one each per file, made cheaply (the same JSON)
        if self.step == "ready":
            return ready_line(self.n, self.ino, self.size, self.mtime_ns)
        if self.step == "put":
            return put_line(self.n, self.tree, self.path, self.tmp)
        return _encode({"step": self.step,
                        **{k: getattr(self, k) for k in _FIELDS.get(self.step, ())}})

    @classmethod
    def from_json(cls, line: str) -> Record:
        """The record of one line; ValueError naming what is wrong with it."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        step = data.get("step")
        if not isinstance(step, str) or step not in _FIELDS:
            raise ValueError(f"unknown step {step!r}")
        allowed = _FIELDS[step]
        for key, value in data.items():
            if key == "step":
                continue
            if key not in allowed:
                raise ValueError(f"unknown field {key!r} in a {step!r} record")
            if key in _STRINGS:
                if not isinstance(value, str):
                    raise ValueError(f"{key!r} is not a string")
            elif type(value) is not int:
                raise ValueError(f"{key!r} is not an integer")
            elif value < 0 and key in _NATURAL:
                raise ValueError(f"{key!r} is negative")
        return cls(**data)


def put_line(n: int, tree: str, path: str, tmp: str) -> str:
    """A "put" record's JSON, made without a Record: one per file."""
    return (f'{{"step":"put","n":{n},"tree":{_string(tree)},"path":{_string(path)},'
            f'"tmp":{_string(tmp)}}}')


def ready_line(n: int, ino: int, size: int = -1, mtime_ns: int = 0) -> str:
    """A "ready" record's JSON, made without a Record: one per file.  Its
    size and time only when known (`size` not negative)."""
    if size < 0:
        return f'{{"step":"ready","n":{n},"ino":{ino}}}'
    return f'{{"step":"ready","n":{n},"ino":{ino},"size":{size},"mtime_ns":{mtime_ns}}}'


def tmp_name(txn: str, n: int) -> str:
    """The temporary name of put `n`, beside its target."""
    return f".dmoverlay-{txn}-{n}"


@dataclass
class Log:
    """The records of one transaction, as read back (a torn last line, from
    a crash in the middle of a write, is dropped: it announced nothing that
    was then done)."""

    records: list[Record] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.records) and self.records[-1].step == "done"

    @cached_property
    def _ready(self) -> dict[int, Record]:
        return {r.n: r for r in self.records if r.step == "ready"}

    def inode_of(self, n: int) -> int:
        """The inode of put `n`'s new entry, once written; else 0."""
        r = self._ready.get(n)
        return r.ino if r is not None else 0

    def ready(self, n: int) -> Record | None:
        return self._ready.get(n)

    @cached_property
    def taken(self) -> frozenset[int]:
        """Changes whose name was there before this transaction."""
        return frozenset(r.n for r in self.records if r.step == "taken")

    @property
    def since_ns(self) -> int:
        """Entries of this transaction changed at this time or later (0: not
        known, in a log of an older dmoverlay)."""
        return next((r.time_ns for r in self.records if r.step == "begin"), 0)

    @classmethod
    def parse(cls, text: str, name: str = "journal", txn: str = "") -> Log:
        """The records of a log's text; JournalError at the first line that
        is not a record (but a last line cut short, without its newline)."""
        lines = text.split("\n")
        torn = lines.pop()  # "" when the text ends in a newline
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(Record.from_json(line))
            except (ValueError, TypeError, RecursionError) as exc:
                raise JournalError(f"{name}: line {number} is not a journal record: {exc}",
                                   hint=_bad_hint(txn or name)) from None
        if torn:
            with suppress(ValueError, TypeError, RecursionError):
                records.append(Record.from_json(torn))  # whole, its newline lost
        return cls(records)

    def check(self, name: str, txn: str, trees: tuple[str, ...]) -> None:
        """JournalError unless every record is one this transaction could
        have written: paths plain and relative, in a tree that is here, each
        change numbered once, tmp names its own."""
        numbered: dict[int, Record] = {}
        seen_ready: set[int] = set()
        for number, r in enumerate(self.records, 1):
            why = _wrong(r, txn, trees, numbered, seen_ready)
            if why is None and r.step == "done" and number != len(self.records):
                why = "records after \"done\""
            if why:
                raise JournalError(f"{name}: line {number} ({r.step!r} record): {why}",
                                   hint=_bad_hint(txn))


def _wrong(r: Record, txn: str, trees: tuple[str, ...], numbered: dict[int, Record],
           seen_ready: set[int]) -> str | None:
    """What makes one record impossible, or None."""
    if r.step in MADE or r.step == "times":
        if r.tree not in TREES:
            return f"tree {r.tree!r} is neither root nor run"
        if r.tree not in trees:
            return ("it names the live /run, where this transaction has no journal (not "
                    "given with --run-dir, or the journal came with the root)")
        if r.path or r.step != "times":
            why = _unplain(r.path)
            if why:
                return f"path {r.path!r}: {why}"
    if r.step in MADE:
        if r.n in numbered:
            return f"change {r.n} is numbered twice"
        numbered[r.n] = r
        if r.step == "put" and r.tmp != tmp_name(txn, r.n):
            return f"temporary name {r.tmp!r} is not {tmp_name(txn, r.n)!r}"
    elif r.step in ("ready", "taken"):
        made = numbered.get(r.n)
        kinds = ("put",) if r.step == "ready" else ("put", "mkdir")
        if made is None or made.step not in kinds:
            return f"change {r.n} is not an earlier {' or '.join(kinds)}"
        if r.step == "ready":
            if r.n in seen_ready:
                return f"change {r.n} is ready twice"
            seen_ready.add(r.n)
    return None


def _unplain(path: str) -> str | None:
    """What keeps a logged path from being a plain relative one beneath its
    tree, or None.  (The planner's rules for an update's names, less those
    that guard the live system rather than the tree: a real path reached
    through a link may hold any name the root holds.)"""
    if not path:
        return "empty"
    if "\0" in path:
        return "holds a NUL byte"
    if path.startswith("/"):
        return "absolute"
    try:
        raw = os.fsencode(path)  # a lone surrogate names no file
    except UnicodeEncodeError:
        return "not a file name"
    if len(raw) > PATH_MAX:
        return f"longer than {PATH_MAX} bytes"
    parts = path.split("/")
    if parts[0] == RESERVED_TOP:
        return "inside dmoverlay's own journal"
    for part in parts:
        if part in ("", ".", ".."):
            return f"holds {repr(part) if part else 'an empty'} component"
    return None


# a log is never followed through a link, never waited on (a fifo)
_READ_LOG = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_log(dir_fd: int, name: str, txn: str) -> str:
    """The text of the log in the journal directory `dir_fd` ("" if there is
    none): a regular file, never followed through a link, never waited on
    (a fifo), never larger than a log dmoverlay writes."""
    try:
        fd = os.open(LOG, _READ_LOG, dir_fd=dir_fd)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise JournalError(f"{name}/{LOG}: cannot open it: {exc.strerror}",
                           hint=_bad_hint(txn)) from None
    try:
        st = os.fstat(fd)
        why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"larger than any journal ({st.st_size} bytes)" if st.st_size > MAX_LOG else "")
        data = b"" if why else os.read(fd, MAX_LOG + 1)
        while not why and len(data) < st.st_size and (more := os.read(fd, MAX_LOG + 1)):
            data += more
        if len(data) > MAX_LOG:
            why = "larger than any journal"
        if not why:
            try:
                return data.decode("ascii")
            except UnicodeDecodeError:
                why = "not ASCII text"
    finally:
        os.close(fd)
    raise JournalError(f"{name}/{LOG}: {why}", hint=_bad_hint(txn))


def ends_done(dir_fd: int) -> bool:
    """Whether the log in `dir_fd` ends in "done" (read from its tail only:
    an apply asks this of every journal kept).  A log damaged before its end
    is found when it is rolled back."""
    try:
        fd = os.open(LOG, _READ_LOG, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < len(DONE_LINE):
            return False
        return os.pread(fd, len(DONE_LINE), st.st_size - len(DONE_LINE)) == DONE_LINE
    finally:
        os.close(fd)


class Writer:
    """Appends records to a log file, syncing at each `sync()`."""

    def __init__(self, dir_fd: int) -> None:
        self.fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                          | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        self.pending: list[str] = []

    def add(self, record: Record) -> None:
        self.pending.append(record.to_json() + "\n")

    def add_lines(self, lines: str) -> None:
        """Records already made (`to_json` lines, each ending in a newline)."""
        self.pending.append(lines)

    def write_now(self, lines: str) -> None:
        """Append lines at once, unsynced: forked writers share the log, and
        each appends its own (O_APPEND: whole, never interleaved)."""
        data = memoryview(lines.encode())
        while data:  # a short write comes near a full filesystem
            data = data[os.write(self.fd, data):]

    def sync(self) -> None:
        if self.pending:
            self.write_now("".join(self.pending))
            self.pending.clear()
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def is_txn(name: str) -> bool:
    """A transaction's directory name: digits only (a journal set aside,
    `<txn>.failed`, is not one)."""
    return 0 < len(name) <= TXN_DIGITS and name.isascii() and name.isdigit()


def txn_names(names: list[str]) -> list[str]:
    """The transactions among a journal directory's entries, oldest first."""
    return sorted((n for n in names if is_txn(n)), key=int)


def next_txn(names: list[str]) -> str:
    last = max((int(n) for n in names if is_txn(n)), default=0)
    name = f"{last + 1:06d}"
    if len(name) > TXN_DIGITS:
        raise JournalError(f"journal {last} is the last number a transaction can have",
                           hint=f"move the journals aside (rename {last} to {last}.old)")
    return name
