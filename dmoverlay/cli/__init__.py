"""The `dmoverlay` command. click lives in this package only; each command is
a thin wrapper over the library in its own module."""

from __future__ import annotations

import sys
import traceback

import click

from dmoverlay import __version__, log, run
from dmoverlay.errors import DmoverlayError


class Group(click.Group):
    """Turns expected failures into `error:` / `hint:` lines and exit code 1;
    a traceback only with --debug."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DmoverlayError as exc:
            if run.debug:
                traceback.print_exc()
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmoverlay")
@click.option("--debug", is_flag=True, help="Echo commands; show tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def cli(debug: bool, quiet: bool) -> None:
    """Build, set up and update ext4-in-squashfs live runtimes."""
    run.debug = run.debug or debug
    log.quiet = quiet


def _register() -> None:
    from dmoverlay.cli import apply, build, doctor, inspect, overlay

    for command in (build.command, inspect.command, doctor.command, overlay.setup_command,
                    overlay.status_command, overlay.teardown_command, apply.command,
                    apply.rollback_command):
        cli.add_command(command)


_register()


def main() -> None:
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
