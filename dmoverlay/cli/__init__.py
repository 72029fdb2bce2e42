"""The `dmoverlay` command. click lives in this package only; each command is
a thin wrapper over the library in its own module.

A command's module is imported only when that command runs (or shows its
help): `setup` at boot should not pay for `apply`'s archive readers and
downloader, and `dmoverlay --version` for none of them.  COMMANDS names each
module, and carries the summary line `dmoverlay --help` lists.
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import click

from dmoverlay import __version__
from dmoverlay.core import exits, log


class LazyCommand(NamedTuple):
    """Where a command is defined, and the first sentence of its help (kept
    equal to the docstring's by tests/test_cli_imports.py)."""

    module: str
    attr: str
    summary: str


COMMANDS: Mapping[str, LazyCommand] = {
    "build": LazyCommand(
        "dmoverlay.cli.build", "command",
        "Build a live runtime image from SOURCE, a root directory or a tar archive "
        "(plain, gzip, xz, bzip2 or zstd), without root privileges; or, as root, "
        "from a running overlay's merged view (--from-live NAME)."),
    "inspect": LazyCommand(
        "dmoverlay.cli.inspect", "command",
        "Show what IMAGE is and what it holds, without mounting it (no root needed)."),
    "doctor": LazyCommand(
        "dmoverlay.cli.doctor", "command",
        "Show what this machine can do for dmoverlay and what is missing: tools, Python "
        "modules, libblockdev plugins, kernel features (loop, squashfs, ext4, "
        "device-mapper...) and privileges, each with a hint naming the fix."),
    "setup": LazyCommand(
        "dmoverlay.cli.overlay", "setup_command",
        "Make IMAGE writable at TARGET: IMAGE is a squashfs.img, a rootfs.img, a disk image "
        "or device holding LiveOS/squashfs.img, or LABEL=, UUID=, PARTUUID=, PARTLABEL=, "
        "CDLABEL=."),
    "status": LazyCommand(
        "dmoverlay.cli.overlay", "status_command",
        "How full the overlay is, layer by layer."),
    "watch": LazyCommand(
        "dmoverlay.cli.overlay", "watch_command",
        "Watch how full the overlay's COW store gets: one line on stderr as the fill passes "
        "each threshold, and when the snapshot fails (to the journal with its priority under "
        "systemd); ends when the overlay is gone."),
    "teardown": LazyCommand(
        "dmoverlay.cli.overlay", "teardown_command",
        "Unmount and remove the overlay, in reverse order; safe to repeat."),
    "merge": LazyCommand(
        "dmoverlay.cli.overlay", "merge_command",
        "Fold the persistent overlay STORE into its writable BASE (an ext4 partition or "
        "image file) with the kernel's snapshot-merge, offline; resumable."),
    "apply": LazyCommand(
        "dmoverlay.cli.apply", "command",
        "Apply UPDATES (a directory, cpio or tar archive, filesystem image, or http(s) URL) "
        "onto ROOT: links kept, nothing written outside ROOT, every file replaced "
        "atomically, all or nothing."),
    "initramfs": LazyCommand(
        "dmoverlay.cli.initramfs", "group",
        "Boot with dmoverlay: the dracut module that sets up root=live:... and applies "
        "rd.live.updates= in the initramfs, in place of dmsquash-live."),
    "mkupdates": LazyCommand(
        "dmoverlay.cli.mkupdates", "command",
        "Make an updates image for `dmoverlay apply` (or anaconda, or dracut) from TREE, or "
        "from the difference between OLD and NEW (whiteouts for what NEW removed), or between "
        "a live overlay's base and its root; the same input gives the same bytes."),
    "sign": LazyCommand(
        "dmoverlay.cli.sign", "command",
        "Sign the updates FILE with an OpenSSH key: FILE.sig, which `dmoverlay apply "
        "--verify KEYS` checks."),
    "rollback": LazyCommand(
        "dmoverlay.cli.apply", "rollback_command",
        "Undo the last apply on ROOT (or finish undoing one a crash cut short)."),
}


def summary_cut(summary: str, limit: int) -> str:
    """A summary cut to `limit` columns as click cuts a command's help in
    the listing (through its public API: the helper behind it is private
    and deprecated in newer click)."""
    return click.Command(None, help=summary).get_short_help_str(limit)


class Group(click.Group):
    """Turns expected failures into `error:` / `hint:` lines and exit code 1;
    a traceback only with --debug.  Commands in `lazy` are imported when
    first asked for."""

    def __init__(self, *args: Any, lazy: Mapping[str, LazyCommand] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: Mapping[str, LazyCommand] = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            where = self.lazy[cmd_name]
            command = getattr(importlib.import_module(where.module), where.attr)
            assert isinstance(command, click.Command), where
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def summary_line(self, cmd_name: str, limit: int) -> str:
        """A command's line in the listing, cut as click cuts it, without
        importing a command not yet loaded."""
        if cmd_name in self.commands:
            return self.commands[cmd_name].get_short_help_str(limit)
        return summary_cut(self.lazy[cmd_name].summary, limit)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = [name for name in self.list_commands(ctx)
                 if name not in self.commands or not self.commands[name].hidden]
        if not names:
            return
        # click's spacing: the widest name and three times the default gap
        limit = formatter.width - 6 - max(len(name) for name in names)
        with formatter.section("Commands"):
            formatter.write_dl([(name, self.summary_line(name, limit)) for name in names])

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except exits.ENDINGS as exc:
            sys.exit(exits.report(exc, lambda line: click.echo(line, err=True)))


@click.group(cls=Group, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmoverlay")
@click.option("--debug", is_flag=True, help="Echo commands; show tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def cli(debug: bool, quiet: bool) -> None:
    """Build, set up and update ext4-in-squashfs live runtimes."""
    from dmoverlay.core import run  # subprocess and friends: not for --version or --help

    run.debug = run.debug or debug
    log.quiet = quiet


def main() -> None:
    signal.signal(signal.SIGTERM, exits.on_sigterm)
    try:
        code = cli.main(prog_name="dmoverlay", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # Usage mistakes get the same one-line form as every other error.
        click.echo(f"error: {exc.format_message()}", err=True)
        click.echo("hint: see dmoverlay --help", err=True)
        sys.exit(exc.exit_code)
    # Without standalone mode click hands back what ctx.exit() asked for.
    sys.exit(code if isinstance(code, int) else 0)
