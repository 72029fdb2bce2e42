"""The journal of one apply: enough to undo it exactly, from any point.

Each tree (root, live /run) keeps its journals at `.dmoverlay/journal/<txn>/`
on its own filesystem, so that every move is a rename, never a copy.  The
log is JSON lines, written and synced before the changes it announces:

  {"step": "mkdir", "n", "tree", "path"}                a directory we make
  {"step": "put", "n", "tree", "path", "tmp"}           a file written as tmp, renamed in
  {"step": "ready", "n", "ino"}                         tmp is complete: its inode
  {"step": "remove", "n", "tree", "path"}               moved to <txn>/<n> (whiteout)
  {"step": "times", "tree", "path", "atime_ns", "mtime_ns"}  a directory's times before
  {"step": "done"}

A replaced inode ends at <txn>/<n> in its tree.  Undoing needs no more than
the log and what is on disk: the inode numbers tell old from new."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

JOURNALS = ".dmoverlay/journal"
_encode = json.JSONEncoder(separators=(",", ":")).encode
_string = encode_basestring_ascii  # a JSON string, as _encode writes it


@dataclass
class Record:
    step: str
    n: int = 0
    tree: str = ""
    path: str = ""
    tmp: str = ""
    ino: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0

    def to_json(self) -> str:
        # "put" and "ready": one each per file, made cheaply (the same JSON)
        if self.step == "ready":
            return ready_line(self.n, self.ino)
        if self.step == "put" and self.n and self.tree and self.path and self.tmp:
            return put_line(self.n, self.tree, self.path, self.tmp)
        return _encode({k: v for k, v in self.__dict__.items() if v or k == "step"})

    @classmethod
    def from_json(cls, line: str) -> Record:
        data: dict[str, Any] = json.loads(line)
        return cls(**data)


def put_line(n: int, tree: str, path: str, tmp: str) -> str:
    """A "put" record's JSON (n, tree, path and tmp not empty), made without
    a Record: one per file."""
    return (f'{{"step":"put","n":{n},"tree":{_string(tree)},"path":{_string(path)},'
            f'"tmp":{_string(tmp)}}}')


def ready_line(n: int, ino: int) -> str:
    """A "ready" record's JSON, made without a Record: one per file."""
    return f'{{"step":"ready","n":{n},"ino":{ino}}}'


@dataclass
class Log:
    """The records of one transaction, as read back (a torn last line, from
    a crash in the middle of a write, is dropped: it announced nothing that
    was then done)."""

    records: list[Record] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return any(r.step == "done" for r in self.records)

    @cached_property
    def _inodes(self) -> dict[int, int]:
        return {r.n: r.ino for r in self.records if r.step == "ready"}

    def inode_of(self, n: int) -> int:
        """The inode of put `n`'s new entry, once written; else 0."""
        return self._inodes.get(n, 0)

    @classmethod
    def parse(cls, text: str) -> Log:
        records = []
        for line in text.splitlines():
            try:
                records.append(Record.from_json(line))
            except (ValueError, TypeError):
                break
        return cls(records)


class Writer:
    """Appends records to a log file, syncing at each `sync()`."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                          | os.O_CLOEXEC, 0o600)
        self.pending: list[str] = []

    def add(self, record: Record) -> None:
        self.pending.append(record.to_json() + "\n")

    def add_lines(self, lines: str) -> None:
        """Records already made (`to_json` lines, each ending in a newline)."""
        self.pending.append(lines)

    def sync(self) -> None:
        if self.pending:
            data = memoryview("".join(self.pending).encode())
            while data:  # a short write comes near a full filesystem
                data = data[os.write(self.fd, data):]
            self.pending.clear()
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def txn_names(top: Path) -> list[str]:
    """Transactions in one tree, oldest first."""
    try:
        return sorted(n for n in os.listdir(top / JOURNALS) if n.isdigit())
    except FileNotFoundError:
        return []


def next_txn(tops: list[Path]) -> str:
    last = max((int(n) for top in tops for n in txn_names(top)), default=0)
    return f"{last + 1:06d}"
