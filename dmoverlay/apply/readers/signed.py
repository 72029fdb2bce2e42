"""A signed update, verified before any of it is read (core.signature).

What is verified must be what is then read, byte for byte.  A download is
verified where it was staged, a private directory of root's nobody else can
write in.  A local file could change between the check and the reads (it
is read several times, and an image's blocks whenever the kernel wants
them): someone who can write to it, or a device that answers a second read
differently.  So it is copied once into the staging directory, and the copy
is verified and read: a copy of the update's size, in RAM at boot, the price
of knowing that what was applied is what was signed.  The signature comes
from FILE.sig beside it, or URL.sig, fetched the same way."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmoverlay.apply.readers.detect import open_file
from dmoverlay.apply.readers.download import LIMITS, Limits, check_url, download
from dmoverlay.core import log
from dmoverlay.core.errors import SignatureError, SourceError, UsageError
from dmoverlay.core.signature import (
    SIG_MAX,
    SUFFIX,
    Signer,
    Trust,
    read_signature,
    signature_path,
    signature_url,
    verify,
)
from dmoverlay.core.sizes import format_size

_COPY_CHUNK = 16 * 1024 * 1024


@contextmanager
def verified_download(url: str, *, trust: Trust, staging: Path, mirrors: tuple[str, ...] = (),
                      sha256: str | None = None, limits: Limits = LIMITS) -> Iterator[Path]:
    """`url` (or one of its `mirrors`) downloaded into `staging` and verified
    against URL.sig, fetched first from the same places (an update without
    one is not downloaded at all).  Both share `limits.deadline`."""
    for each in (url, *mirrors):  # before their .sig URLs are made of them
        check_url(each)
    sig_url = signature_url(url)
    start = time.monotonic()
    try:
        with download(sig_url, staging=staging, limits=dataclasses.replace(limits, most=SIG_MAX),
                      mirrors=tuple(signature_url(m) for m in mirrors)) as sig:
            signature = read_signature(sig, label=sig_url, update=url)
    except SourceError as exc:
        raise SignatureError(f"{url}: not signed: {exc.message}",
                             hint=f"serve its signature at {sig_url}") from None
    left = max(limits.deadline - (time.monotonic() - start), 1.0)
    with download(url, staging=staging, mirrors=mirrors, sha256=sha256,
                  limits=dataclasses.replace(limits, deadline=left)) as path:
        _said(url, verify(path, signature, trust, label=url, work=staging))
        yield path


@contextmanager
def verified_file(path: Path, label: str, *, trust: Trust, staging: Path) -> Iterator[Path]:
    """A private copy of the file `path` in `staging`, verified against
    FILE.sig: the only thing read of the update from then on."""
    if path.is_dir():
        raise UsageError(f"{label}: a directory cannot be signed, so --verify refuses it",
                         hint="pack it into an archive, sign that (dmoverlay sign), "
                              "and apply the archive")
    sig = signature_path(path)
    signature = read_signature(sig, label=f"{label}{SUFFIX}", update=label)
    with _private_copy(path, label, staging) as copy:
        _said(label, verify(copy, signature, trust, label=label, work=staging))
        yield copy


def _said(label: str, signer: Signer) -> None:
    log.info(f"{label}: signature good, by {signer.principal} ({signer.key})")


@contextmanager
def _private_copy(path: Path, label: str, staging: Path) -> Iterator[Path]:
    """The bytes `path` holds now (at most its size when opened), in a new
    file in `staging`, removed on exit."""
    fd, name = tempfile.mkstemp(prefix="signed-", dir=staging)
    copy = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open_file(path, label) as src:
            size = os.fstat(src.fileno()).st_size
            _check_room(staging, size, label)
            _copy(src.fileno(), out.fileno(), size, label)
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _check_room(staging: Path, size: int, label: str) -> None:
    st = os.statvfs(staging)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise SourceError(f"{label}: {format_size(size)}, more than the {format_size(free)} "
                          f"free in {staging} to verify it in",
                          hint="a signed file is verified and read from a copy under the "
                               "run directory: free space there")


def _copy(src: int, dst: int, size: int, label: str) -> None:
    """The first `size` bytes of `src` into `dst`, by the kernel."""
    offset = 0
    try:
        while offset < size:
            sent = os.sendfile(dst, src, offset, min(_COPY_CHUNK, size - offset))
            if sent == 0:  # it shrank: the copy is what it holds, verified as such
                break
            offset += sent
    except OSError as exc:
        raise SourceError(f"cannot copy {label} to verify it: {exc.strerror}",
                          hint="free space under the run directory") from None
