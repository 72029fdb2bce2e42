"""Readers that turn an update, whatever it came in, into a stream of
`Member`s: a directory, a tar or cpio archive (plain or compressed), a
squashfs or ext2/3/4 image, or any of these behind an http(s) URL.

What a thing is comes from its content, never its name.  Every pass reads
the whole input from its start and checks all the format can check, so a
pass that ends without an error has proved the update whole."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from dmoverlay.apply import cpio
from dmoverlay.core import log, superblock
from dmoverlay.core.compress import STREAM_ERRORS, Compression, Readable, open_decompressed
from dmoverlay.core.compress import detect as detect_compression
from dmoverlay.core.entries import InFile, Kind, Member, UpdateReader, file_identity, kind_of
from dmoverlay.core.errors import CommandFailed, SourceError, UsageError
from dmoverlay.core.run import run
from dmoverlay.core.sizes import KiB, format_size
from dmoverlay.core.tarread import (
    ArchiveFile,
    NotRegular,
    TarReader,
    open_regular,
    tar_header_checksum_ok,
)

if TYPE_CHECKING:  # urllib and http.client are imported by a download only: they
    import urllib.request  # take about as long as the rest of an apply's imports
    from http.client import HTTPMessage, HTTPResponse

CHUNK = 64 * KiB  # reads below glibc's mmap threshold: 1 MiB ones churn the heap
HEAD_SIZE = superblock.HEAD_SIZE
DOWNLOAD_TIMEOUT = 30.0  # seconds without progress, per connect and per read
# seconds for a whole download: a server that drips a byte now and then
# never trips the stall timeout
DOWNLOAD_DEADLINE = 600.0

ACCEPTED = ("give a directory; a cpio (newc, crc, odc) or tar archive, plain or compressed "
            "with gzip, xz, bzip2 or zstd; an uncompressed squashfs or ext2/3/4 image; "
            "or an http(s) URL of one of these")
_DAMAGED = "the update is damaged or truncated: download or re-create it"


class Format(StrEnum):
    TAR = "tar"
    CPIO = "cpio"
    SQUASHFS = "squashfs"
    EXT = "ext"


# ------------------------------------------------------------------ detection


def identify(head: bytes) -> Format | None:
    """What uncompressed content starting with `head` is (4 KiB suffice).

    Archives first: their magics sit where an image's boot block is zero;
    the old tar header checksum, the weakest sign, last."""
    if head[:6] in (b"070701", b"070702", b"070707"):
        return Format.CPIO
    if len(head) >= 512 and head[257:262] == b"ustar":
        return Format.TAR
    if cpio.detect(head) is not None:
        return Format.CPIO
    kind = superblock.detect(head)
    if kind is superblock.Kind.SQUASHFS:
        return Format.SQUASHFS
    if kind is superblock.Kind.EXT:
        return Format.EXT
    if len(head) >= 512 and tar_header_checksum_ok(head):
        return Format.TAR
    return None


def _not_an_update(label: str, what: str) -> SourceError:
    return SourceError(f"not an update: {label} ({what})", hint=ACCEPTED)


def _identify_file(path: Path, label: str) -> tuple[Format, Compression]:
    with _open_regular(path, label) as raw:
        head = raw.read(HEAD_SIZE)
        if not head:
            raise _not_an_update(label, "empty file")
        compression = detect_compression(head)
        if compression is Compression.NONE:
            plain = head
        else:
            raw.seek(0)
            plain = _decompressed_head(raw, label, compression)
        found = identify(plain)
        if found is None and compression is not Compression.NONE:
            # A damaged stream can decompress to garbage before its check
            # fails (bzip2 checks each 900 KiB block at its end): say so.
            raw.seek(0)
            _check_stream(raw, label, compression)
    if found is None:
        kind = superblock.detect(plain)
        what = (f"a {kind} disk image" if kind in (superblock.Kind.GPT, superblock.Kind.MBR)
                else "empty after decompression" if not plain
                else "content not recognised")
        raise _not_an_update(label, what if compression is Compression.NONE
                             else f"{compression}-compressed, {what}")
    if compression is not Compression.NONE and found in (Format.SQUASHFS, Format.EXT):
        raise SourceError(f"{label}: a {compression}-compressed {found} image",
                          hint="decompress it first: images are mounted, which needs "
                               "them uncompressed")
    return found, compression


def _decompressed_head(raw: BinaryIO, label: str, compression: Compression) -> bytes:
    with _damage_reported(label, compression), open_decompressed(label, raw) as stream:
        return _read_up_to(stream, HEAD_SIZE)


def _check_stream(raw: BinaryIO, label: str, compression: Compression) -> None:
    with _damage_reported(label, compression), open_decompressed(label, raw) as stream:
        stream.drain()


@contextmanager
def _damage_reported(label: str, compression: Compression) -> Iterator[None]:
    try:
        yield
    except STREAM_ERRORS as exc:
        raise SourceError(f"{label}: corrupt {compression} data ({exc})",
                          hint=_DAMAGED) from None


def _read_up_to(stream: Readable, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size and (chunk := stream.read(size - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _open_regular(path: Path, label: str) -> BinaryIO:
    """tarread.open_regular, its refusal worded for an update."""
    try:
        return open_regular(path, label)
    except NotRegular:
        raise _not_an_update(label, "not a regular file or directory") from None


# ---------------------------------------------------------------- open_update


@contextmanager
def open_update(spec: str, *, staging: Path, sha256: str | None = None,
                timeout: float = DOWNLOAD_TIMEOUT,
                deadline: float = DOWNLOAD_DEADLINE) -> Iterator[UpdateReader]:
    """The update named by `spec` (a path or an http(s) URL), ready for passes.

    Downloads and image mounts live under `staging` (a directory under /run:
    /tmp may be hidden by a tmpfs at start-up) and are removed on exit.
    `sha256` is checked against the file (downloaded or local) before
    anything else reads it.  File data may be `Located` in them (not read
    into the spool), so write it before leaving the block: after, a copy
    fails as from an update that changed."""
    expected = parse_sha256(sha256) if sha256 is not None else None
    with ExitStack() as stack:
        downloaded = _is_download(spec)
        if downloaded:
            os.makedirs(staging, mode=0o700, exist_ok=True)
            path = stack.enter_context(download(spec, staging=staging, timeout=timeout,
                                                deadline=deadline))
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
    fmt, compression = _identify_file(path, label)
    packed = "" if compression is Compression.NONE else f"{compression}-compressed "
    if fmt is Format.TAR:
        return TarReader(path, label=label, description=f"{packed}tar archive {label}",
                         in_place=compression is Compression.NONE)
    if fmt is Format.CPIO:
        return CpioReader(path, label=label, description=f"{packed}cpio archive {label}")
    os.makedirs(staging, mode=0o700, exist_ok=True)
    return stack.enter_context(open_image(path, fmt, staging=staging, label=label))


# ------------------------------------------------------------------- checksum

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
    with _open_regular(path, label) as raw:
        got = file_sha256(raw.fileno())
    if got != expected:
        raise SourceError(f"{label}: SHA-256 is {got}, not {expected}",
                          hint="the file is damaged or not the one meant; nothing was changed")


# ------------------------------------------------------------------- download


def url_scheme(spec: str) -> str | None:
    """The scheme of a URL ("http"), or None for a path."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return None if match is None else match[1].lower()


def _http_redirects() -> urllib.request.BaseHandler:
    """A handler that follows redirects to http(s) only (urllib would also
    follow ftp)."""
    import urllib.parse
    import urllib.request

    class HttpRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                             msg: str, headers: HTTPMessage,
                             newurl: str) -> urllib.request.Request | None:
            if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
                raise SourceError(f"{req.full_url}: redirected to {newurl}",
                                  hint="only http(s) URLs are followed")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return HttpRedirects()


@contextmanager
def download(url: str, *, staging: Path, timeout: float = DOWNLOAD_TIMEOUT,
             deadline: float = DOWNLOAD_DEADLINE) -> Iterator[Path]:
    """Download `url` into staging/download-XXXX, removed on exit.  No
    progress for `timeout` seconds, or no end after `deadline` seconds (give
    or take one read), is an error."""
    fd, name = tempfile.mkstemp(prefix="download-", dir=staging)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, timeout, deadline)
        yield path
    finally:
        path.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO, timeout: float, deadline: float) -> None:
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    opener = urllib.request.build_opener(_http_redirects())
    request = urllib.request.Request(url, headers={"User-Agent": "dmoverlay"})
    give_up = time.monotonic() + deadline
    try:
        with opener.open(request, timeout=min(timeout, deadline)) as response:
            total = _content_length(response.headers.get("Content-Length"))
            got = _copy_response(response, out, total, url, (give_up, deadline))
    except urllib.error.HTTPError as exc:
        raise SourceError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise _timed_out(url, timeout) from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise SourceError(f"cannot download {url}: {text}",
                          hint="check the URL and the network") from None
    except TimeoutError:
        raise _timed_out(url, timeout) from None
    except (HTTPException, ConnectionError) as exc:
        raise SourceError(f"cannot download {url}: connection broken ({exc!r})",
                          hint="try again") from None
    except OSError as exc:
        raise SourceError(f"cannot download {url}: {exc.strerror or exc}",
                          hint="check the URL and the network") from None
    if total is not None and got != total:
        raise SourceError(f"cannot download {url}: got {got} of {total} bytes",
                          hint="the connection broke: try again")


def _store(out: BinaryIO, chunk: bytes, url: str) -> None:
    """Write a chunk; an empty one flushes what is buffered."""
    try:
        if chunk:
            out.write(chunk)
        else:
            out.flush()
    except OSError as exc:
        raise SourceError(f"cannot store the download of {url}: {exc.strerror}",
                          hint="free space in the staging directory under /run") from None


def _timed_out(url: str, timeout: float) -> SourceError:
    return SourceError(f"cannot download {url}: no answer for {timeout:g} s",
                       hint="check the URL and the network")


def _content_length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _copy_response(response: HTTPResponse, out: BinaryIO, total: int | None, url: str,
                   deadline: tuple[float, float]) -> int:
    """Copy the body to `out`; `deadline`: the monotonic time to give up at,
    and the seconds that it stands for."""
    progress = log.Percent(f"downloading {url}") if total else None
    got = 0
    # read1: what one read of the socket brings, so a trickle meets the check
    while chunk := response.read1(CHUNK):  # errors here are the network's
        _store(out, chunk, url)
        got += len(chunk)
        if time.monotonic() > deadline[0]:
            raise SourceError(f"cannot download {url}: not done after {deadline[1]:g} s "
                              f"({format_size(got)} received)",
                              hint="the server or the network is too slow; give more time "
                                   "with --timeout")
        if progress is not None and total:
            progress(min(100, got * 100 // total))
    _store(out, b"", url)
    if progress is None:
        log.info(f"downloaded {url} ({format_size(got)})")
    return got


# ---------------------------------------------------------------- directories


class DirectoryReader:
    """A directory tree, walked in sorted order, parents before children.

    With `in_place` (the directory outlives the reader), file data is
    `Located`: a consumer may copy it later instead of reading it now."""

    def __init__(self, root: Path, *, description: str,
                 hide_empty_lost_found: bool = False, in_place: bool = False) -> None:
        self.root = root
        self.description = description
        # mkfs.ext4 makes lost+found in every ext image: an artifact of the
        # format, not something the update's author put there.
        self.hide_empty_lost_found = hide_empty_lost_found
        self.in_place = in_place

    def members(self) -> Iterator[tuple[Member, Readable | None]]:
        inodes: dict[tuple[int, int], str] = {}
        for name, full, st in self._walk():
            member = _dir_member(name, full, st, inodes)
            if member.kind is not Kind.FILE:
                yield member, None
                continue
            with _FileData(full, st, in_place=self.in_place) as data:
                yield member, data
                data.finish()

    def _walk(self) -> Iterator[tuple[str, str, os.stat_result]]:
        top = os.path.abspath(self.root)  # located data is found again from any directory
        try:
            st = os.stat(top)  # the directory named, even through a symlink
        except OSError as exc:
            raise _unreadable(top, exc) from None
        yield "", top, st
        yield from self._children("", top)

    def _children(self, rel: str, full_dir: str) -> Iterator[tuple[str, str, os.stat_result]]:
        try:
            names = sorted(os.listdir(full_dir))
        except OSError as exc:
            raise _unreadable(full_dir, exc) from None
        for child in names:
            name = f"{rel}/{child}" if rel else child
            full = os.path.join(full_dir, child)
            st = _lstat(full)
            if not rel and child == "lost+found" and self._hidden(full, st):
                continue
            yield name, full, st
            if stat.S_ISDIR(st.st_mode):
                yield from self._children(name, full)

    def _hidden(self, full: str, st: os.stat_result) -> bool:
        if not self.hide_empty_lost_found or not stat.S_ISDIR(st.st_mode):
            return False
        try:
            return not os.listdir(full)
        except OSError as exc:
            raise _unreadable(full, exc) from None


def _unreadable(full: str, exc: OSError) -> SourceError:
    hint = "run as root" if exc.errno in (errno.EACCES, errno.EPERM) else None
    if exc.errno == errno.EIO:
        hint = "the disk or image is damaged"
    return SourceError(f"cannot read {full}: {exc.strerror}", hint=hint)


def _lstat(full: str) -> os.stat_result:
    try:
        return os.lstat(full)
    except OSError as exc:
        raise _unreadable(full, exc) from None


def _dir_member(name: str, full: str, st: os.stat_result,
                inodes: dict[tuple[int, int], str]) -> Member:
    kind = kind_of(st.st_mode)
    if kind is None:
        raise SourceError(f"{full}: unknown file type {stat.S_IFMT(st.st_mode):#o}")
    target = ""
    if kind is Kind.FILE and st.st_nlink > 1:
        first = inodes.setdefault((st.st_dev, st.st_ino), name)
        if first != name:
            kind, target = Kind.HARDLINK, first
    elif kind is Kind.SYMLINK:
        try:
            target = os.readlink(full)
        except OSError as exc:
            raise _unreadable(full, exc) from None
    return Member(
        name=name,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        size=st.st_size if kind is Kind.FILE else 0,
        target=target,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind in (Kind.CHAR, Kind.BLOCK) else (0, 0),
        xattrs=_xattrs(full),
    )


def _xattrs(full: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise _unreadable(full, exc) from None
    found = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(full, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed since it was listed
                raise _unreadable(full, exc) from None
    return tuple(found)


class _FileData:
    """A file's data, exactly the size its lstat gave: a file that changes
    while it is read is an error, not a silently different update.  Opened
    only when read: a consumer that takes its location reads it later."""

    def __init__(self, full: str, st: os.stat_result, *, in_place: bool) -> None:
        self.full = full
        self.st = st
        self.remaining = st.st_size
        self.in_place = in_place
        self.taken = False
        self.fd = -1

    def located(self) -> InFile | None:
        if not self.in_place:
            return None
        self.taken = True
        return InFile(self.full, 0, self.st.st_size, file_identity(self.st))

    def _open(self) -> int:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(self.full, flags)
        except OSError as exc:
            raise _unreadable(self.full, exc) from None
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (self.st.st_dev, self.st.st_ino) \
                or not stat.S_ISREG(now.st_mode):
            os.close(fd)
            raise self._changed()
        self.fd = fd
        return fd

    def __enter__(self) -> _FileData:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def _changed(self) -> SourceError:
        return SourceError(f"{self.full} changed while it was read",
                           hint="leave the update alone while it is applied")

    def read(self, size: int = -1, /) -> bytes:
        want = self.remaining if size < 0 else min(size, self.remaining)
        fd = self.fd if self.fd >= 0 else self._open()
        parts: list[bytes] = []
        while want > 0:
            try:
                chunk = os.read(fd, min(want, CHUNK))
            except OSError as exc:
                raise _unreadable(self.full, exc) from None
            if not chunk:
                raise self._changed()
            parts.append(chunk)
            self.remaining -= len(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def finish(self) -> None:
        """Read what the consumer skipped, and check nothing follows (unless
        the consumer took the location: it checks the file when it copies)."""
        if self.taken:
            return
        while self.remaining:
            self.read(CHUNK)
        fd = self.fd if self.fd >= 0 else self._open()
        if os.read(fd, 1):
            raise self._changed()


# ------------------------------------------------------------------- archives


class CpioReader:
    """A cpio archive (newc, crc, odc or binary), plain or compressed."""

    def __init__(self, path: Path, *, label: str, description: str) -> None:
        self.file = ArchiveFile(path, label)
        self.description = description

    def members(self) -> Iterator[tuple[Member, Readable | None]]:
        with self.file.stream() as stream:
            yield from cpio.read_members(stream, where=self.file.label)


# --------------------------------------------------------------------- images

_MOUNT = {
    # nodev/nosuid/noexec: nothing on the image is run or opened as a device;
    # noload: a journal needing recovery is not replayed (that would write).
    Format.SQUASHFS: ("squashfs", "ro,loop,nodev,nosuid,noexec"),
    Format.EXT: ("ext4", "ro,loop,noload,nodev,nosuid,noexec"),
}


@contextmanager
def open_image(image: Path, fmt: Format, *, staging: Path,
               label: str) -> Iterator[DirectoryReader]:
    """A squashfs or ext2/3/4 image mounted read-only (through a read-only
    loop device) under `staging`, read as a directory; unmounted on exit.

    Mounting needs root, but so does applying an update; unpacking instead
    (unsquashfs, debugfs rdump) would lose owners, devices and xattrs when
    not root, and would copy the whole image into RAM under /run."""
    if os.geteuid() != 0:
        raise SourceError(f"{label}: reading a {fmt} image needs root (it is mounted "
                          "read-only)", hint="run as root, or unpack the image into a "
                                             "directory and give that")
    fstype, options = _MOUNT[fmt]
    mountpoint = Path(tempfile.mkdtemp(prefix="image-", dir=staging))
    try:
        try:
            # An absolute path: neither an option ("-...") nor a tag (LABEL=...).
            run(["mount", "-t", fstype, "-o", options, os.path.abspath(image), mountpoint])
        except CommandFailed as exc:
            raise SourceError(f"{label}: cannot mount the {fmt} image ({exc.message})",
                              hint="the image may be damaged, or the kernel lacks "
                                   f"loop or {fstype} support") from None
        try:
            yield DirectoryReader(mountpoint, description=f"{fmt} image {label}",
                                  hide_empty_lost_found=fmt is Format.EXT, in_place=True)
        finally:
            _unmount(mountpoint)
    finally:
        if not os.path.ismount(mountpoint):
            os.rmdir(mountpoint)


def _unmount(mountpoint: Path, attempts: int = 5) -> None:
    # A pass abandoned mid-file may hold a descriptor until its generator is
    # collected: retry a busy unmount a little before giving up.
    for attempt in range(attempts):
        try:
            run(["umount", mountpoint])
            return
        except CommandFailed:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
