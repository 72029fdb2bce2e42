"""The library's one way to apply an update: `apply_update` runs the steps
in their order (a staging directory, the update opened, read and spooled,
planned, written) and leaves nothing behind on any path.  `rollback` undoes
the last one.

What a caller needs is re-exported here, so that `dmoverlay.apply.update`
is the whole front of the job; the modules behind it are free to move."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing

from dmoverlay.apply.execute import (
    ApplyOptions,
    ApplyRefused,
    Result,
    Spool,
    apply_members,
    read_all,
    rollback,
    staging,
)
from dmoverlay.apply.readers import DOWNLOAD_DEADLINE, open_update
from dmoverlay.core import cow, log
from dmoverlay.core.errors import WriteFailed
from dmoverlay.core.signature import Trust

__all__ = ["DOWNLOAD_DEADLINE", "ApplyOptions", "ApplyRefused", "Result", "WriteFailed",
           "apply_update", "rollback"]


def apply_update(spec: str, options: ApplyOptions, *, sha256: str | None = None,
                 mirrors: tuple[str, ...] = (), trust: Trust | None = None,
                 deadline: float = DOWNLOAD_DEADLINE,
                 cow_free: Callable[[str], int | None] = cow.free_bytes) -> Result:
    """Apply the update `spec` (a directory, archive or image path, or an
    http(s) URL) onto `options.root`, all or nothing; what was done (with
    `options.dry_run`, only the plan).

    `sha256`: the checksum the update file or download must have.
    `mirrors`: more http(s) URLs of a download, tried when one fails.
    `trust`: the keys one of which must have signed it (a file or download
    only: core.signature), verified before any of it is read.
    `deadline`: seconds a download may take in all.  `cow_free`: the room
    left in the overlay's COW store holding a path (None: not on one).

    Raises ApplyRefused (the plan refused an entry: nothing was changed),
    or another DmoverlayError; a write that fails is undone first.  The
    staging directory under the run dir, a download and an image's mount
    are gone when it returns or raises: by an exception included, so a
    caller that may be sent SIGTERM (a boot service, say) turns it into one,
    as the CLI does (`core.errors.Terminated`), or a kill leaves them behind."""
    # applied inside open_update: an image stays mounted, a download kept,
    # while their files are copied from where they lie
    with staging(options) as place, closing(Spool(place)) as spool, \
            open_update(spec, staging=place, sha256=sha256, mirrors=mirrors, trust=trust,
                        deadline=deadline) as reader:
        with log.step(f"reading {spec}"):
            members = read_all(reader, spool)
        return apply_members(options, members, spool, cow_free)
