"""dmoverlay initramfs install: the dracut module, for stock dracut."""

from __future__ import annotations

from pathlib import Path

import click

from dmoverlay.boot import initramfs


@click.group("initramfs")
def group() -> None:
    """Boot with dmoverlay: the dracut module that sets up root=live:... and
    applies rd.live.updates= in the initramfs, in place of dmsquash-live."""


@group.command("install")
@click.option("--moddir", type=click.Path(path_type=Path), default=initramfs.DRACUT_MODULES,
              show_default=True, help="dracut's modules directory.")
@click.option("--confdir", type=click.Path(path_type=Path), default=initramfs.DRACUT_CONF,
              show_default=True,
              help="Where the snippet adding the module to every initramfs goes.")
@click.option("--no-conf", is_flag=True,
              help="Install the module only: add it with dracut --add dmoverlay.")
def install_command(moddir: Path, confdir: Path, no_conf: bool) -> None:
    """Install the dracut module; with its dracut.conf.d snippet (unless
    --no-conf), the next initramfs dracut makes boots live roots with
    dmoverlay instead of dmsquash-live."""
    for path in initramfs.install_module(moddir, None if no_conf else confdir):
        click.echo(f"wrote {path}")
    click.echo("now make the initramfs again, e.g. dracut -f (or dracut --add dmoverlay -f)")


@group.command("stage")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--without-https", is_flag=True,
              help="Leave TLS out (and OpenSSL with it): updates by http:// only.")
def stage_command(dest: Path, without_https: bool) -> None:
    """Write the Python the initramfs carries into DEST (a zip of the boot
    path's bytecode, /usr/bin/dmoverlay, and dmoverlay-boot for the hooks);
    print the interpreter and extension modules to install beside it."""
    closure = initramfs.stage(dest, without_https=without_https)
    click.echo("\n".join([closure.python, *closure.extensions]))
