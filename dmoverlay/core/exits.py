"""How a command ends, said the same way by both of its entries: the click
command line (dmoverlay.cli) and the initramfs hooks' (dmoverlay.boot.hooks).

An expected failure is one `error:` line and a `hint:` line on stderr and
exit 1; Ctrl-C exit 130; SIGTERM exit 143, once the cleanups on the way out
have run.  Anything else is a bug, left to raise with its traceback."""

from __future__ import annotations

import signal
from collections.abc import Callable

from dmoverlay.core.errors import DmoverlayError, Terminated

# What a command's entry turns into lines and an exit code.
ENDINGS = (DmoverlayError, KeyboardInterrupt, Terminated)
# A line longer than this (a path thousands of bytes long: a hostile tree's)
# keeps its two ends, which say what failed and why, and the count of the rest.
LINE_MOST = 1000


def on_sigterm(signum: int, frame: object) -> None:
    """The SIGTERM handler: Terminated raised where the process is."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
    raise Terminated


def report(exc: BaseException, say: Callable[[str], object]) -> int:
    """Says how the command ended by `exc` (one of ENDINGS) through `say`
    (a line to stderr), and returns the exit code; with --debug (or
    DMOVERLAY_DEBUG), an expected failure's traceback first."""
    if isinstance(exc, DmoverlayError):
        from dmoverlay.core import run  # subprocess and friends: not for every error

        if run.debug:
            import traceback

            traceback.print_exception(exc)
        say(_within(f"error: {exc.message}"))
        if exc.hint:
            say(_within(f"hint: {exc.hint}"))
        return 1
    if isinstance(exc, KeyboardInterrupt):
        say("error: interrupted")
        return 130
    say("error: terminated (SIGTERM); what was under way was undone")
    return 143


def _within(line: str) -> str:
    if len(line) <= LINE_MOST:
        return line
    end = LINE_MOST // 2 - 30
    return f"{line[:end]}...({len(line) - 2 * end} characters)...{line[-end:]}"
