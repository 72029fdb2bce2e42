"""What the initramfs's dracut hooks run, without click: `dmoverlay setup
--from-cmdline FILE --target DIR` and `dmoverlay -q apply --from-cmdline
FILE --root DIR`, with nothing else to parse.

The boot waits for them, and click with what it imports was a fifth of
setup's start-up there (bench/SETUP.md).  So the hooks run the staged
`dmoverlay-boot`:

    dmoverlay-boot setup FILE TARGET     setup --from-cmdline FILE --target TARGET
    dmoverlay-boot apply FILE ROOT       -q apply --from-cmdline FILE --root ROOT

TARGET and ROOT are absolute paths ($NEWROOT); every other option at its
default, as the hooks left them.  Both entries go through the functions
here and core.exits, so they say the same lines and end with the same exit
codes (tests/boot/test_hooks.py holds them to it); the full command line
stays `dmoverlay`, in the initramfs too.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dmoverlay.core import exits, log, run
from dmoverlay.core.errors import DmoverlayError, UpdatesLeftOut
from dmoverlay.core.sizes import format_size
from dmoverlay.overlay.dmtable import DEFAULT_NAME, Mode
from dmoverlay.overlay.options import STATE_DIR

# for the type checker only: typing (ms of the boot's start-up), and apply's modules
TYPE_CHECKING = False
if TYPE_CHECKING:
    from dmoverlay.apply.update import ApplyOptions
    from dmoverlay.core.signature import Trust
    from dmoverlay.overlay.options import SetupOptions
    from dmoverlay.overlay.state import State

# A line for stdout (False) or stderr (True): click.echo in the CLI.
Echo = Callable[[str, bool], object]

USAGE = "dmoverlay-boot setup CMDLINE TARGET | dmoverlay-boot apply CMDLINE ROOT"


def echo(text: str, err: bool = False) -> None:
    """A line, flushed at once as click.echo does: the hooks interleave
    stdout and stderr on one console or in one capture."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


# ------------------------------------------------------------------ setup


def setup_options(path: str, *, target: Path, name: str, state_dir: Path,
                  tmpfs_dir: Path | None = None) -> SetupOptions:
    """What setup is asked to do by the command line in the file `path`."""
    from dmoverlay.overlay import cmdline

    boot = cmdline.parse(cmdline.read_cmdline(path))
    if boot.debug:
        run.debug = True
    if boot.updates:
        log.info(f"note: {len(boot.updates)} update(s) on the command line: setup does not "
                 "apply them")
    return cmdline.setup_options(boot, target=target, name=name, state_dir=state_dir,
                                 tmpfs_dir=tmpfs_dir)


def setup_line(opts: SetupOptions, state: State) -> str:
    """The line setup ends with: what is writable where, and where writes go."""
    return f"{opts.name}: {opts.image.text} writable at {state.target} ({_where_writes_go(state)})"


def _where_writes_go(state: State) -> str:
    copied = f"; the image copied to RAM ({format_size(state.ram_copy)})" if state.ram_copy else ""
    ram = f"{format_size(state.overlay_size)} {'thin pool' if state.thin else 'COW'} in RAM"
    if state.mode == Mode.PERSISTENT:
        return f"changes kept in {state.overlay}{copied}"
    if state.mode == Mode.READONLY:
        return f"{state.overlay} read-only under a {ram}{copied}"
    return ram + copied


def boot_setup(cmdline_file: str, target: str) -> None:
    """`dmoverlay setup --from-cmdline FILE --target TARGET`."""
    # all that setup runs on, imported before its first step, as the CLI does
    from dmoverlay.overlay.setup import setup

    opts = setup_options(cmdline_file, target=Path(target), name=DEFAULT_NAME,
                         state_dir=STATE_DIR)
    echo(setup_line(opts, setup(opts)))


# ------------------------------------------------------------------ apply


def apply_from_cmdline(path: str, opts: ApplyOptions, *, name: str, state_dir: Path,
                       deadline: float, as_json: bool = False, say: Echo = echo,
                       trust: Trust | None = None) -> None:
    """The updates the command line in the file `path` names, each applied
    or left out with the reason said; UpdatesLeftOut if any was.  `trust`:
    the keys given to apply (--verify), else those of the command line or
    the initramfs (boot.updates.boot_trust)."""
    import json

    from dmoverlay.boot import updates as boot_updates

    wanted = boot_updates.cmdline_updates(path)
    if not wanted:
        log.info("no updates on the command line")
        return
    try:
        trust = boot_updates.boot_trust(path, given=trust)
    except DmoverlayError as exc:  # fail closed: no update without the keys it needs
        raise UpdatesLeftOut(f"all {len(wanted)} updates left out: {exc.message}",
                             hint=exc.hint) from None
    mounts, medium = boot_updates.where_setup_left(state_dir, name)
    outcomes = boot_updates.apply_all(wanted, opts, mounts=mounts, medium=medium,
                                      deadline=deadline, trust=trust)
    if as_json:
        say(json.dumps([o.to_dict() for o in outcomes], indent=2), False)
    for outcome in outcomes:
        if outcome.applied:
            log.info(outcome.line())
        else:
            say(f"warning: {outcome.line()}", True)
    left = [o for o in outcomes if not o.applied]
    if left:
        raise UpdatesLeftOut(f"{len(left)} of {len(outcomes)} updates left out; the root "
                             "has the others", hint="the lines above say why")


def boot_apply(cmdline_file: str, root: str) -> None:
    """`dmoverlay -q apply --from-cmdline FILE --root ROOT`."""
    from dmoverlay.apply.update import DOWNLOAD_DEADLINE, ApplyOptions

    log.quiet = True
    apply_from_cmdline(cmdline_file, ApplyOptions(root=Path(root)), name=DEFAULT_NAME,
                       state_dir=STATE_DIR, deadline=DOWNLOAD_DEADLINE)


# ------------------------------------------------------------------ the entry

COMMANDS: dict[str, Callable[[str, str], None]] = {"setup": boot_setup, "apply": boot_apply}


def main(argv: Sequence[str] | None = None) -> None:
    """The entry: `dmoverlay-boot setup|apply CMDLINE DIR`; exits."""
    signal.signal(signal.SIGTERM, exits.on_sigterm)
    args = list(sys.argv[1:] if argv is None else argv)
    # the hooks give $NEWROOT: "" or a relative DIR would be the initramfs's cwd
    if len(args) != 3 or args[0] not in COMMANDS or not args[2].startswith("/"):
        echo(f"error: usage: {USAGE}", err=True)
        echo("hint: it runs the dracut hooks' two commands; `dmoverlay` is the whole command "
             "line", err=True)
        sys.exit(2)
    try:
        COMMANDS[args[0]](args[1], args[2])
    except exits.ENDINGS as exc:
        sys.exit(exits.report(exc, lambda line: echo(line, err=True)))
    sys.exit(0)
