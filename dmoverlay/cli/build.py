"""dmoverlay build SOURCE -o OUTPUT, or build --from-live NAME -o OUTPUT"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dmoverlay.build import image as builder
from dmoverlay.build.squashfs import Compressor, SquashOptions
from dmoverlay.cli.options import SIZE, epoch_from_env


@click.command("build")
@click.argument("source", type=click.Path(path_type=Path), required=False)
@click.option("--from-live", "live", metavar="NAME",
              help="(root) Instead of SOURCE: the running overlay NAME's merged view (its "
                   "base with the changes made since), taken at one instant.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="With --from-live: where overlays are recorded [default: /run/dmoverlay].")
@click.option("--freeze-limit", type=float, default=None, metavar="SECONDS",
              help="With --from-live: the longest the live root may stay frozen while the "
                   "changes are copied [default: 30].")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="The squashfs.img to write (holds LiveOS/rootfs.img).")
@click.option("-L", "--label", default=builder.DEFAULT_LABEL, show_default=True,
              help="Label of the ext4 rootfs.img.")
@click.option("--size", type=SIZE, help="Size of rootfs.img (e.g. 4G); sparse.")
@click.option("--free", type=SIZE,
              help="Room to leave in rootfs.img beyond the tree [default: 2G]; sparse, "
                   "so it costs almost nothing compressed.")
@click.option("--compression", "compressor", default="xz", show_default=True,
              type=click.Choice([c.value for c in Compressor]))
@click.option("--level", type=int, help="Compression level (zstd 1-22, gzip/lzo 1-9).")
@click.option("--block-size", type=SIZE, default="128K", show_default=True,
              help="squashfs block size, a power of two from 4K to 1M.")
@click.option("--all-root", is_flag=True,
              help="Make every file owned by root (for a tree unpacked by a normal user).")
@click.option("--uuid", "fs_uuid", help="UUID of rootfs.img [default: derived from the tree].")
@click.option("--epoch", type=int, default=epoch_from_env,
              help="Build time in seconds [default: SOURCE_DATE_EPOCH, else the newest mtime].")
@click.option("--disk", type=click.Path(path_type=Path),
              help="Also write a GPT disk image holding LiveOS/squashfs.img.")
@click.option("--disk-label", default="LIVE", show_default=True,
              help="Label (and partition name) of the disk's live partition.")
@click.option("--overlay-size", type=SIZE,
              help="With --disk: add an empty partition of this size for a persistent overlay.")
@click.option("-f", "--force", is_flag=True, help="Replace existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def command(source: Path | None, live: str | None, state_dir: Path | None,
            freeze_limit: float | None, output: Path, label: str, size: int | None,
            free: int | None, compressor: str, level: int | None, block_size: int, all_root: bool,
            fs_uuid: str | None, epoch: int | None, disk: Path | None, disk_label: str,
            overlay_size: int | None, force: bool, as_json: bool) -> None:
    """Build a live runtime image from SOURCE, a root directory or a tar archive
    (plain, gzip, xz, bzip2 or zstd), without root privileges; or, as root,
    from a running overlay's merged view (--from-live NAME)."""
    if overlay_size is not None and disk is None:
        raise click.UsageError("--overlay-size needs --disk")
    if (source is None) == (live is None):
        raise click.UsageError("give SOURCE or --from-live NAME (one of them)")
    if live is None and (state_dir is not None or freeze_limit is not None):
        raise click.UsageError("--state-dir and --freeze-limit go with --from-live")
    opts = builder.BuildOptions(
        source=source or Path(), output=output, label=label, size=size, free=free,
        squash=SquashOptions(compressor=Compressor(compressor), level=level,
                             block_size=block_size),
        all_root=all_root, force=force, fs_uuid=fs_uuid, epoch=epoch,
        disk=builder.DiskOptions(disk, disk_label, overlay_size) if disk else None,
    )
    if live is not None:
        from dmoverlay.fold import bake
        from dmoverlay.overlay.options import STATE_DIR

        result = bake.bake(state_dir or STATE_DIR, live, opts,
                           freeze_limit=bake.FREEZE_LIMIT if freeze_limit is None
                           else freeze_limit).result
    else:
        result = builder.build(opts)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
