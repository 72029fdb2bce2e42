"""dmoverlay mkupdates TREE -o OUTPUT, --from OLD --to NEW, and --from-live NAME

--from-live composes two jobs: overlay mounts a live overlay's base and
root read-only (overlay.liveview: its state and devices are overlay's), and
mkupdates makes the difference of two directories, knowing nothing of
overlays (tests/test_layering.py keeps it over apply and core only)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from dmoverlay.apply.execute import ApplyRefused
from dmoverlay.cli.options import epoch_from_env
from dmoverlay.mkupdates.formats import Format
from dmoverlay.mkupdates.make import Made, MkupdatesOptions, make_updates
from dmoverlay.overlay.liveview import live_sides
from dmoverlay.overlay.options import STATE_DIR


@click.command("mkupdates")
@click.argument("tree", required=False)
@click.option("--from", "old", metavar="OLD",
              help="Make only the difference from OLD (a directory or an archive) to NEW.")
@click.option("--to", "new", metavar="NEW", help="With --from: the tree to reach.")
@click.option("--from-live", "live", metavar="NAME",
              help="The difference from the base of the running overlay NAME to its live "
                   "root (as root): a fix tried on a live system, as an update.")
@click.option("--state-dir", type=click.Path(path_type=Path),
              help=f"With --from-live: where overlays are recorded [default: {STATE_DIR}].")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="The updates image to write.")
@click.option("--format", "fmt", default=Format.CPIO.value, show_default=True,
              type=click.Choice([f.value for f in Format]),
              help="cpio.gz: anaconda's updates.img; tar.zst: keeps xattrs; squashfs.")
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="Leave what PATTERN names as the target has it, with all it holds: "
                   "var/log, /var/cache/*, or *.pyc at any depth (repeatable).")
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
def command(tree: str | None, old: str | None, new: str | None, live: str | None,
            state_dir: Path | None, output: Path | None, fmt: str, exclude: tuple[str, ...],
            all_root: bool,
            no_xattrs: bool, allow_setuid: bool,
            allow_xattrs: tuple[str, ...], epoch: int | None, force: bool, key: Path | None,
            dry_run: bool, as_json: bool) -> None:
    """Make an updates image for `dmoverlay apply` (or anaconda, or dracut) from
    TREE, or from the difference between OLD and NEW (whiteouts for what NEW
    removed), or between a live overlay's base and its root; the same input
    gives the same bytes."""
    if live is not None and (tree, old, new) != (None, None, None):
        raise click.UsageError("--from-live takes no TREE, --from or --to")
    if state_dir is not None and live is None:
        raise click.UsageError("--state-dir goes with --from-live")
    if live is None and (tree is None) == (new is None):
        raise click.UsageError("give TREE, or --to NEW (with --from OLD), or --from-live NAME")
    if new is not None and old is None:
        raise click.UsageError("--to needs --from")
    if output is None and not dry_run:
        raise click.UsageError("give -o OUTPUT (or --dry-run)")
    opts = MkupdatesOptions(
        new=tree or new or "", output=None if dry_run else output, old=old,
        format=Format(fmt), all_root=all_root, no_xattrs=no_xattrs,
        allow_setuid=allow_setuid, allow_xattrs=allow_xattrs, epoch=epoch, force=force,
        sign=key, exclude=exclude)
    try:
        made = make_updates(opts) if live is None else _from_live(live, state_dir, opts)
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


def _from_live(name: str, state_dir: Path | None, opts: MkupdatesOptions) -> Made:
    """The difference from the overlay's base to its live root, each side
    mounted read-only while it is read."""
    writes = [opts.output.parent] if opts.output is not None else []
    with live_sides(state_dir or STATE_DIR, name, writes=writes) as sides:
        return make_updates(dataclasses.replace(opts, old=str(sides.base), new=str(sides.live),
                                                scratch=sides.scratch))
