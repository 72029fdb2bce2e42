"""One error hierarchy: every expected failure carries a message and a hint;
and one table of where what a job needs is installed from, for those hints.

Every exception class of the package is declared here, so that what a
caller may catch is read in one place, but two: ApplyRefused, which carries
the refused plan (apply's type) and is declared beside it, and the
planner's Refused, which never leaves the planner."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PROVISION = "or run scripts/provision"

# What a job may find missing -> (Debian packages, Fedora packages).  Tools by
# name; Python modules as "python:<module>".
PACKAGES: Mapping[str, tuple[str, str]] = {
    "mkfs.ext4": ("e2fsprogs", "e2fsprogs"),
    "mke2fs": ("e2fsprogs", "e2fsprogs"),
    "debugfs": ("e2fsprogs", "e2fsprogs"),
    "dumpe2fs": ("e2fsprogs", "e2fsprogs"),
    "e2fsck": ("e2fsprogs", "e2fsprogs"),
    "mksquashfs": ("squashfs-tools", "squashfs-tools"),
    "unsquashfs": ("squashfs-tools", "squashfs-tools"),
    "fuse2fs": ("fuse2fs", "e2fsprogs"),  # Fedora's spec ships it with e2fsprogs
    "fusermount3": ("fuse3", "fuse3"),
    "dmsetup": ("dmsetup", "device-mapper"),
    "losetup": ("mount", "util-linux"),
    "mount": ("mount", "util-linux"),
    "umount": ("mount", "util-linux"),
    "blkid": ("util-linux", "util-linux"),
    "modprobe": ("kmod", "kmod"),
    "zstd": ("zstd", "zstd"),
    "ssh-keygen": ("openssh-client", "openssh-clients"),
    "python:click": ("python3-click", "python3-click"),
    "python:parted": ("python3-parted", "python3-pyparted"),
    "python:gi.repository.BlockDev": ("python3-gi gir1.2-blockdev-2.0 python3-blockdev",
                                      "python3-blockdev"),
}
# A Python module from the distribution reaches a virtualenv only through this.
VENV_NOTE = "a virtualenv needs --system-site-packages to see it"


def packages_hint(debian: Iterable[str], fedora: Iterable[str], *, note: str = "") -> str:
    """`install it: apt-get install ... (Debian), dnf install ... (Fedora), ...`"""
    extra = f"; {note}" if note else ""
    return (f"install it: apt-get install {' '.join(sorted(set(debian)))} (Debian), "
            f"dnf install {' '.join(sorted(set(fedora)))} (Fedora), {PROVISION}{extra}")


def install_hint(needs: Iterable[str]) -> str:
    """The hint for missing tools or "python:" modules, by PACKAGES (a name
    it does not know is taken for its own package)."""
    found = [PACKAGES.get(n, (n, n)) for n in needs]
    python = any(n.startswith("python:") for n in needs)
    return packages_hint([d for d, _ in found], [f for _, f in found],
                         note=VENV_NOTE if python else "")


class DmoverlayError(Exception):
    """An expected failure: the CLI prints it as one `error:` line and a `hint:`."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ToolMissing(DmoverlayError):
    """A command the job needs is not installed."""


class CommandFailed(DmoverlayError):
    """An external command exited non-zero."""

    def __init__(self, message: str, *, hint: str | None = None, stderr: str = "") -> None:
        super().__init__(message, hint=hint)
        self.stderr = stderr


class SourceError(DmoverlayError):
    """The tree or archive to build from is missing, unreadable or malformed."""


class ImageError(DmoverlayError):
    """An image is not what it claims to be, or cannot be written."""


class UsageError(DmoverlayError):
    """Options that contradict each other or cannot be honoured."""


# ---------------------------------------------------------------- images and archives


class Unscriptable(ImageError):
    """A string that no debugfs argument can carry."""


class DebugfsFailed(ImageError):
    """debugfs said it could not do what it was asked; `problem` is what it said."""

    def __init__(self, message: str, *, problem: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problem = problem


class NotRegular(SourceError):
    """A path that should name a regular file names something else."""


class HeaderRefused(SourceError):
    """A header we do not let tarfile read; the reader names the archive."""


# ---------------------------------------------------------------- setting up an overlay


class OverlayError(DmoverlayError):
    """Setup, status or teardown could not be done."""


class NoOverlay(OverlayError):
    """Nothing is recorded under that name."""


class OverlayGone(OverlayError):
    """Recorded, but its devices (or its RAM layer's tmpfs) are not there
    to ask: removed by hand, or never all made."""


class NotLive(UsageError):
    """The command line does not ask for a live boot at all (no root=live:)."""


class UpdatesLeftOut(DmoverlayError):
    """Some of the command line's updates were left out at boot (the others
    were applied): each is said on its own line before."""


class BlockDevError(DmoverlayError):
    """libblockdev is missing, a plugin cannot be loaded, or a call failed."""


# ---------------------------------------------------------------- applying an update


class JournalError(DmoverlayError):
    """A journal that cannot be trusted: nothing of it is undone."""


class InRootError(DmoverlayError):
    """A place inside the root could not be reached or changed."""


class WriteFailed(DmoverlayError):
    """A system call failed while the update was written; it was undone."""


class WorkerDied(DmoverlayError):
    """A worker process ended without reporting."""


class RollbackRefused(DmoverlayError):
    """Entries changed since the apply: undoing it would lose those changes."""


class Terminated(BaseException):
    """SIGTERM, raised wherever the process is (core.exits.on_sigterm), so
    that every cleanup on the way out runs (staging removed, an apply undone,
    a setup unwound): the default action would end the process on the spot.
    Not a DmoverlayError: nothing may catch it as an expected failure."""


# ---------------------------------------------------------------- signed updates


class SignatureError(DmoverlayError):
    """An update whose signature is missing, wrong, or made by a key not
    trusted (unknown, expired, revoked): nothing of it is read."""


class KeysError(UsageError):
    """The trusted keys or revoked keys given cannot be used."""

