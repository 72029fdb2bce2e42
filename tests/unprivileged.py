"""dmoverlay run as a user, by a test that runs as root, with a /dev/fuse
that user may open (as udev makes it, mode 0666) or not (0600, as on a
machine without udev): the node is made in a private mount namespace and
bound over /dev/fuse there, so the host's own node is left as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# $1: a directory for the node, $2: its mode, the rest: the command.
# FUSE's device is always misc 10:229 (the kernel's devices.txt).
_SCRIPT = """set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs "$1"
mknod -m "$2" "$1/fuse" c 10 229
mount --bind "$1/fuse" /dev/fuse
shift 2
exec "$@"
"""


def as_user(*args: str | os.PathLike[str], shared: Path, fuse: bool = True,
            user: int = 65534) -> subprocess.CompletedProcess[str]:
    """`dmoverlay ARGS` as `user`, in `shared` (a directory the user may
    write: the shared_dir fixture), with FUSE open to the user or not."""
    dev = shared / ".dev"
    dev.mkdir(exist_ok=True)
    argv = ["unshare", "--mount", "sh", "-c", _SCRIPT, "sh", os.fspath(dev),
            "0666" if fuse else "0600",
            "setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
            sys.executable, "-m", "dmoverlay", *(os.fspath(a) for a in args)]
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=shared,
                          timeout=600, check=False)
