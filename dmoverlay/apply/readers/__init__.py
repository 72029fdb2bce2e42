"""Readers that turn an update, whatever it came in, into a stream of
`Member`s: a directory (directory.py), a tar (core.tarread's TarReader,
which building an image shares) or cpio archive (cpio.py), plain or
compressed, a squashfs or ext2/3/4 image (image.py), or any of these behind
an http(s) URL (download.py).  `open_update` chooses the reader.

What a thing is comes from its content, never its name (detect.py).  Every
pass reads the whole input from its start and checks all the format can
check, so a pass that ends without an error has proved the update whole."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dmoverlay.apply.readers.checksum import check_sha256, parse_sha256
from dmoverlay.apply.readers.cpio import CpioReader
from dmoverlay.apply.readers.detect import ACCEPTED, Format, identify, identify_file
from dmoverlay.apply.readers.directory import DirectoryReader
from dmoverlay.apply.readers.download import (
    DOWNLOAD_DEADLINE,
    DOWNLOAD_TIMEOUT,
    RETRY,
    Limits,
    Retry,
    download,
    url_scheme,
)
from dmoverlay.apply.readers.image import open_image
from dmoverlay.apply.readers.signed import verified_download, verified_file
from dmoverlay.core.compress import Compression
from dmoverlay.core.entries import UpdateReader
from dmoverlay.core.errors import SourceError, UsageError
from dmoverlay.core.signature import Trust
from dmoverlay.core.tarread import TarReader

__all__ = ["ACCEPTED", "DOWNLOAD_DEADLINE", "DOWNLOAD_TIMEOUT", "CpioReader",
           "DirectoryReader", "Format", "identify", "open_update"]


@contextmanager
def open_update(spec: str, *, staging: Path, sha256: str | None = None,
                mirrors: tuple[str, ...] = (), trust: Trust | None = None,
                timeout: float = DOWNLOAD_TIMEOUT, deadline: float = DOWNLOAD_DEADLINE,
                retry: Retry = RETRY) -> Iterator[UpdateReader]:
    """The update named by `spec` (a path or an http(s) URL), ready for passes.

    Downloads and image mounts live under `staging` (a directory under /run:
    /tmp may be hidden by a tmpfs at start-up) and are removed on exit.
    `sha256` is checked against the file (downloaded or local) before
    anything else reads it (a download's as it ends: a mirror may then give
    the right one).  `mirrors`: more URLs of the same download.  With
    `trust`, the update is a file or a download signed by one of its keys
    (signed.py), verified before any of it is read, and only what was
    verified is read.  File data may be `Located` in them (not read into the
    spool), so write it before leaving the block: after, a copy fails as from
    an update that changed."""
    expected = parse_sha256(sha256) if sha256 is not None else None
    with ExitStack() as stack:
        downloaded = _is_download(spec)
        if downloaded:
            for mirror in mirrors:
                if not _is_download(mirror):
                    raise UsageError(f"mirror {mirror}: not an http(s) URL",
                                     hint="a mirror serves the same file as UPDATES")
        elif mirrors:
            raise UsageError("mirrors are for a download: UPDATES is not an http(s) URL",
                             hint="give an http(s) URL, or no --mirror")
        if downloaded or trust is not None:
            os.makedirs(staging, mode=0o700, exist_ok=True)
        if downloaded:
            limits = Limits(timeout=timeout, deadline=deadline, retry=retry)
            if trust is not None:
                fetched = verified_download(spec, trust=trust, staging=staging,
                                            mirrors=mirrors, sha256=expected, limits=limits)
            else:
                fetched = download(spec, staging=staging, mirrors=mirrors, sha256=expected,
                                   limits=limits)
            path = stack.enter_context(fetched)
            expected = None  # checked as the download ended
        elif trust is not None:
            path = stack.enter_context(verified_file(Path(spec), spec, trust=trust,
                                                     staging=staging))
        else:
            path = Path(spec)
        yield _reader(path, spec, expected=expected, staging=staging, stack=stack)


def _is_download(spec: str) -> bool:
    scheme = url_scheme(spec)
    if scheme is not None and scheme not in ("http", "https"):
        raise SourceError(f"{spec}: {scheme} URLs are not supported",
                          hint="give an http(s) URL or a local path")
    return scheme is not None


def _reader(path: Path, label: str, *, expected: str | None, staging: Path,
            stack: ExitStack) -> UpdateReader:
    """Every kind of update lasts as long as `stack` (a download is removed,
    an image unmounted, when it closes): data in a plain file is `Located`."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(f"cannot read {label}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        if expected is not None:
            raise UsageError("--sha256 checks a file or a download, not a directory")
        return DirectoryReader(path, description=f"directory {label}", in_place=True)
    if expected is not None:
        check_sha256(path, label, expected)
    fmt, compression = identify_file(path, label)
    packed = "" if compression is Compression.NONE else f"{compression}-compressed "
    if fmt is Format.TAR:
        return TarReader(path, label=label, description=f"{packed}tar archive {label}",
                         in_place=compression is Compression.NONE)
    if fmt is Format.CPIO:
        return CpioReader(path, label=label, description=f"{packed}cpio archive {label}")
    os.makedirs(staging, mode=0o700, exist_ok=True)
    return stack.enter_context(open_image(path, fmt, staging=staging, label=label))
