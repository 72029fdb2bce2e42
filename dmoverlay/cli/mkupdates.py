"""dmoverlay mkupdates TREE -o OUTPUT, and --from OLD --to NEW"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dmoverlay.apply.execute import ApplyRefused
from dmoverlay.cli.options import epoch_from_env
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.make import MkupdatesOptions, make_updates


@click.command("mkupdates")
@click.argument("tree", required=False)
@click.option("--from", "old", metavar="OLD",
              help="Make only the difference from OLD (a directory or an archive) to NEW.")
@click.option("--to", "new", metavar="NEW", help="With --from: the tree to reach.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="The updates image to write.")
@click.option("--format", "fmt", default=Format.CPIO.value, show_default=True,
              type=click.Choice([f.value for f in Format]),
              help="cpio.gz: anaconda's updates.img; tar.zst: keeps xattrs; squashfs.")
@click.option("--all-root", is_flag=True, help="Make every entry owned by root.")
@click.option("--no-xattrs", is_flag=True,
              help="Leave xattrs out (cpio cannot carry them: it refuses them otherwise).")
@click.option("--allow-setuid", is_flag=True,
              help="Accept setuid/setgid files and file capabilities (apply needs it too).")
@click.option("--allow-xattr", "allow_xattrs", multiple=True, metavar="NAME",
              help="Accept xattrs NAME and NAME.* apply's policy refuses (apply needs it too).")
@click.option("--epoch", type=int, default=epoch_from_env,
              help="No time newer than this [default: SOURCE_DATE_EPOCH, else times kept].")
@click.option("-f", "--force", is_flag=True, help="Replace an existing output.")
@click.option("--sign", "key", type=click.Path(path_type=Path), metavar="KEY",
              help="Sign it with this OpenSSH key: OUTPUT.sig, which `apply --verify` checks.")
@click.option("-n", "--dry-run", is_flag=True,
              help="List what would go in (kind and path, one a line); write nothing.")
@click.option("--json", "as_json", is_flag=True, help="The members as JSON on stdout.")
def command(tree: str | None, old: str | None, new: str | None, output: Path | None,
            fmt: str, all_root: bool, no_xattrs: bool, allow_setuid: bool,
            allow_xattrs: tuple[str, ...], epoch: int | None, force: bool, key: Path | None,
            dry_run: bool, as_json: bool) -> None:
    """Make an updates image for `dmoverlay apply` (or anaconda, or dracut) from
    TREE, or from the difference between OLD and NEW (whiteouts for what NEW
    removed); the same input gives the same bytes."""
    if (tree is None) == (new is None):
        raise click.UsageError("give TREE, or --to NEW (with --from OLD)")
    if new is not None and old is None:
        raise click.UsageError("--to needs --from")
    if output is None and not dry_run:
        raise click.UsageError("give -o OUTPUT (or --dry-run)")
    opts = MkupdatesOptions(
        new=tree or new or "", output=None if dry_run else output, old=old,
        format=Format(fmt), all_root=all_root, no_xattrs=no_xattrs,
        allow_setuid=allow_setuid, allow_xattrs=allow_xattrs, epoch=epoch, force=force,
        sign=key)
    try:
        made = make_updates(opts)
    except ApplyRefused as exc:
        if dry_run and not as_json:
            for r in exc.plan.refusals:
                click.echo(f"refuse\t{r.name}: {r.reason}")
        raise
    if as_json:
        click.echo(json.dumps(made.to_dict(), indent=2))
    elif dry_run:
        for line in made.lines():
            click.echo(line)
