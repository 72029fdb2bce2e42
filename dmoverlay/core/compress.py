"""Compressed streams, recognised by their first bytes rather than by name,
and read to their very end so that truncated or corrupt input is caught."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import subprocess
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import BinaryIO, Protocol

from dmoverlay.core.errors import SourceError, install_hint
from dmoverlay.core.run import clean_env, find_tool


class Compression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    XZ = "xz"
    BZIP2 = "bzip2"
    ZSTD = "zstd"


_MAGIC: tuple[tuple[bytes, Compression], ...] = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"BZh", Compression.BZIP2),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
)

# Errors the decompressors raise on damaged input.
STREAM_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, ValueError)


def detect(head: bytes) -> Compression:
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return Compression.NONE


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class CountingReader:
    """A read-only stream that counts what passed through it."""

    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.count = 0
        self.at_end = False

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        if size != 0 and not data:
            self.at_end = True
        return data

    def drain(self) -> None:
        """Read to the end: only there do decompressors check lengths and CRCs."""
        while self.read(1 << 20):
            pass


_OPENERS: dict[Compression, Callable[[BinaryIO], io.BufferedIOBase]] = {
    Compression.GZIP: lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    Compression.XZ: lzma.LZMAFile,
    Compression.BZIP2: bz2.BZ2File,
}


@contextmanager
def open_decompressed(path: str, raw: BinaryIO) -> Iterator[CountingReader]:
    """Yield the decompressed content of `raw` (an open file at offset 0).
    Leaving the block without an error means the whole stream was valid,
    provided the caller drained it."""
    kind = detect(raw.read(6))
    raw.seek(0)
    if kind is Compression.ZSTD:
        with _zstd_stream(path, raw) as stream:
            yield stream
        return
    opener = _OPENERS.get(kind)
    if opener is None:
        yield CountingReader(raw)
        return
    with opener(raw) as inner:
        yield CountingReader(inner)


@contextmanager
def _zstd_stream(path: str, raw: BinaryIO) -> Iterator[CountingReader]:
    # The standard library of Python 3.11 has no zstd: the zstd tool
    # decompresses, and its exit status says whether the stream was whole.
    tool = find_tool("zstd")
    if tool is None:
        raise SourceError(f"{path}: zstd-compressed, but zstd is not installed",
                          hint=install_hint(["zstd"]))
    # The child reads the descriptor, not Python's buffer: rewind the descriptor.
    os.lseek(raw.fileno(), 0, os.SEEK_SET)
    proc = subprocess.Popen(
        [tool, "-dc", "-q"], stdin=raw, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=clean_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    reader = CountingReader(proc.stdout)
    try:
        yield reader
    finally:
        if not reader.at_end:
            proc.kill()  # the caller stopped early (a peek at the header)
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if reader.at_end and code != 0:
        raise SourceError(f"{path}: corrupt or truncated zstd stream ({err or f'exit {code}'})")
