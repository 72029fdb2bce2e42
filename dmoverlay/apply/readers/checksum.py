"""The SHA-256 an update file (local or downloaded) must have: checked
before anything else reads it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dmoverlay.apply.readers.detect import open_file
from dmoverlay.core.errors import SourceError, UsageError
from dmoverlay.core.sizes import KiB

CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap

_SHA256 = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


def parse_sha256(text: str) -> str:
    match = _SHA256.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"not a SHA-256 checksum: {text!r}",
                         hint="give the 64 hexadecimal digits sha256sum prints")
    return match[1]


def file_sha256(fd: int) -> str:
    import hashlib  # here: only an update with --sha256 needs it

    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, label: str, expected: str) -> None:
    with open_file(path, label) as raw:
        got = file_sha256(raw.fileno())
    if got != expected:
        raise SourceError(f"{label}: SHA-256 is {got}, not {expected}",
                          hint="the file is damaged or not the one meant; nothing was changed")
