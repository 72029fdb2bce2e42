"""dmoverlay inspect IMAGE [--json]"""

from __future__ import annotations

import json

import click

from dmoverlay.inspect import format_report, inspect_image


@click.command("inspect")
# A plain string: missing files, directories and unreadable files get the
# library's `error:` and `hint:` lines, not click's usage message.
@click.argument("image", metavar="IMAGE")
@click.option("--json", "as_json", is_flag=True,
              help="Print the full nested report as JSON.")
def command(image: str, as_json: bool) -> None:
    """Show what IMAGE is and what it holds, without mounting it (no root
    needed).  IMAGE is recognised by its content: a squashfs (squashfs.img,
    with its LiveOS/rootfs.img), an ext2/3/4 filesystem (rootfs.img), or a
    GPT or MBR disk image (each partition, and the LiveOS/squashfs.img of an
    ext4 partition), or a persistent overlay (its chunk size and the base it
    was made over).  Damaged or truncated images are an error."""
    report = inspect_image(image)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(format_report(report)))
