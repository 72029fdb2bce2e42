"""dmoverlay setup / status / watch / teardown"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dmoverlay.boot.hooks import setup_line, setup_options
from dmoverlay.cli.options import SIZE
from dmoverlay.core.errors import NoOverlay, OverlayError, OverlayGone, Terminated, UsageError
from dmoverlay.core.exits import report
from dmoverlay.core.sizes import format_size
from dmoverlay.overlay.dmtable import DEFAULT_NAME, Mode
from dmoverlay.overlay.metrics import exposition
from dmoverlay.overlay.options import STATE_DIR as DEFAULT_STATE_DIR
from dmoverlay.overlay.options import SetupOptions, parse_image, parse_overlay
from dmoverlay.overlay.setup import setup
from dmoverlay.overlay.status import Layer, status
from dmoverlay.overlay.teardown import teardown
from dmoverlay.overlay.watch import (
    REARM_POINTS,
    Event,
    Levels,
    Priority,
    line,
    parse_thresholds,
    read_fill,
    to_journal,
    watch,
)

STATE_DIR = click.option("--state-dir", type=click.Path(path_type=Path),
                         default=DEFAULT_STATE_DIR, show_default=True,
                         help="Where overlays are recorded (and their work directories).")
NAME = click.option("--name", default=DEFAULT_NAME, show_default=True,
                    help="Overlay name: devices NAME-rw and NAME-base (and NAME-ro, "
                         "NAME-overlay-pool).")

# status exit codes, for monitors
EXIT_ABOVE_THRESHOLD = 3
EXIT_FULL = 4
EXIT_ABSENT = 5  # nothing set up under the name
EXIT_STATE_REFUSED = 6  # a state file status will not act on
EXIT_GONE = 7  # recorded, but its devices are gone


@click.command("setup")
@click.argument("image", required=False)
@click.option("--target", required=True, type=click.Path(path_type=Path),
              help="Empty directory to mount the writable root on.")
@click.option("--from-cmdline", "cmdline_file", is_flag=False, flag_value="/proc/cmdline",
              metavar="[FILE]",
              help="Take IMAGE and the overlay options from a kernel command line as dracut's "
                   "dmsquash-live reads it (root=live:..., rd.live.*): /proc/cmdline, or FILE.")
@NAME
@click.option("--overlay-size", type=SIZE,
              help="COW store size, kept in RAM (rd.live.overlay.size) [default: half the RAM]; "
                   "with --overlay, the size of the overlay file to create if it is missing.")
@click.option("--overlay", "overlay_spec", metavar="DEVICE:PATH",
              help="Persistent overlay (rd.live.overlay): the file PATH on DEVICE (LABEL=, "
                   "UUID=, PARTUUID=, PARTLABEL=, CDLABEL=, /dev/..., a block device, or a "
                   "file holding a filesystem), mounted read-write; DEVICE alone or DEVICE:auto: "
                   "the raw device, or dracut's /LiveOS/overlay-<label>-<uuid> on it; or a "
                   "plain FILE.  The text splits at the first ':/' after a DEVICE (KEY=VALUE: "
                   "its first ':'); a path that exists as a whole is a FILE (or a block "
                   "DEVICE).")
@click.option("--overlay-reset", is_flag=True,
              help="Start the persistent overlay afresh (rd.live.overlay.reset).")
@click.option("--overlay-readonly", is_flag=True,
              help="Show the persistent overlay read-only; new writes go to RAM and are lost "
                   "at teardown (rd.live.overlay.readonly).")
@click.option("--overlay-thin", is_flag=True,
              help="Keep RAM writes in a thin pool, so deleting files and fstrim give the RAM "
                   "back (rd.live.overlay.thin).")
@click.option("--ram", is_flag=True,
              help="Copy the squashfs.img (or rootfs.img) into RAM, checked first to fit beside "
                   "the COW, then let the medium go so it can be removed (rd.live.ram).")
@click.option("--live-dir", default="LiveOS", show_default=True, help="rd.live.dir")
@click.option("--squashfs-name", default="squashfs.img", show_default=True,
              help="rd.live.squashimg")
@click.option("--tmpfs-dir", type=click.Path(path_type=Path),
              help="Put the COW file in this existing tmpfs instead of a new one.")
@STATE_DIR
def setup_command(image: str | None, target: Path, cmdline_file: str | None, name: str,
                  overlay_size: int | None, overlay_spec: str | None, overlay_reset: bool,
                  overlay_readonly: bool, overlay_thin: bool, ram: bool, live_dir: str,
                  squashfs_name: str, tmpfs_dir: Path | None, state_dir: Path) -> None:
    """Make IMAGE writable at TARGET: IMAGE is a squashfs.img, a rootfs.img, a disk
    image or device holding LiveOS/squashfs.img, or LABEL=, UUID=, PARTUUID=,
    PARTLABEL=, CDLABEL=.

    With --from-cmdline, IMAGE and the overlay options are read from a kernel
    command line instead, as dracut's dmsquash-live reads them."""
    ctx = click.get_current_context()
    if cmdline_file is not None:
        given = [flag for param, flag in SETUP_FROM_CMDLINE.items()
                 if ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT]
        if image is not None or given:
            raise UsageError(f"--from-cmdline takes IMAGE and the overlay options from the "
                             f"command line: {' '.join([*(['IMAGE'] if image else []), *given])} "
                             f"too", hint="give either --from-cmdline or IMAGE and its options")
        # as dmoverlay-boot does in the initramfs (boot.hooks)
        opts = setup_options(cmdline_file, target=target, name=name, state_dir=state_dir,
                             tmpfs_dir=tmpfs_dir)
    elif image is None:
        raise UsageError("IMAGE is missing", hint="name the image, or give --from-cmdline")
    else:
        # the texts are parsed here, once: setup's steps get the parsed values
        opts = SetupOptions(
            image=parse_image(image), target=target, name=name, overlay_size=overlay_size,
            live_dir=live_dir, squashfs_name=squashfs_name, tmpfs_dir=tmpfs_dir,
            state_dir=state_dir, overlay=parse_overlay(overlay_spec),
            overlay_reset=overlay_reset, overlay_readonly=overlay_readonly,
            overlay_thin=overlay_thin, ram=ram)
    click.echo(setup_line(opts, setup(opts)))


# What the command line says when setup reads it: not to be given beside it.
SETUP_FROM_CMDLINE = {
    "overlay_size": "--overlay-size", "overlay_spec": "--overlay", "overlay_reset":
    "--overlay-reset", "overlay_readonly": "--overlay-readonly", "overlay_thin":
    "--overlay-thin", "live_dir": "--live-dir", "squashfs_name": "--squashfs-name",
    "ram": "--ram",
}


@click.command("status")
@NAME
@STATE_DIR
@click.option("--threshold", type=click.FloatRange(0, 100),
              help=f"Exit {EXIT_ABOVE_THRESHOLD} when the COW is at least this % full.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (its layers too).")
@click.option("--prometheus", is_flag=True,
              help="Prometheus' text exposition format (node_exporter's textfile collector); "
                   "exit 0 whenever it is printed: dmoverlay_up says if the overlay was read.")
def status_command(name: str, state_dir: Path, threshold: float | None, as_json: bool,
                   prometheus: bool) -> None:
    """How full the overlay is, layer by layer.  Exit 0; 3 above
    --threshold; 4 when the snapshot is full (overflow: writes fail) or
    invalid; 5 when nothing is set up under NAME; 6 when its state file is
    refused; 7 when its devices are gone."""
    if as_json and prometheus:
        raise UsageError("--json and --prometheus are two answers: give one")
    if prometheus and threshold is not None:
        raise UsageError("--threshold sets the exit code, which --prometheus leaves 0",
                         hint="alert on dmoverlay_fill_ratio instead")
    try:
        st = status(state_dir, name)
    except OverlayError as exc:
        if prometheus:  # the metrics say it; the line is for the log
            click.echo(f"note: {exc.message}", err=True)
            click.echo(exposition([(name, None)]), nl=False)
            return
        report(exc, lambda text: click.echo(text, err=True))
        sys.exit(EXIT_ABSENT if isinstance(exc, NoOverlay)
                 else EXIT_GONE if isinstance(exc, OverlayGone) else EXIT_STATE_REFUSED)
    if prometheus:
        click.echo(exposition([(name, st)]), nl=False)
        return
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
    else:
        ram = f", {format_size(st.ram_free)} of RAM left for it" if st.ram_free is not None else ""
        kept = f"; changes kept in {st.overlay}" if st.mode == Mode.PERSISTENT else ""
        shown = ""
        if st.mode == Mode.READONLY:
            fill = (f" ({format_size(st.kept_used)} of {format_size(st.kept_total)} used)"
                    if st.kept_used is not None and st.kept_total is not None else "")
            shown = f"; {st.overlay} shown read-only{fill}"
        copied = f"; image in RAM ({format_size(st.ram_copy)})" if st.ram_copy else ""
        click.echo(f"{name}: {st.state}, {'thin pool' if st.thin else 'COW'} "
                   f"{format_size(st.used)} of {format_size(st.total)} used "
                   f"({st.percent:.1f}%){ram}; at {st.target}{kept}{shown}{copied}")
        for layer in st.layers():
            click.echo(f"  {layer.kind:<5} {layer_line(layer)}")
    if st.state != "active":
        sys.exit(EXIT_FULL)
    if threshold is not None and st.percent >= threshold:
        sys.exit(EXIT_ABOVE_THRESHOLD)


@click.command("merge")
@click.argument("base")
@click.argument("store")
@NAME
@click.option("--force", is_flag=True,
              help="Merge a store that records no base (made by dracut): you vouch that it "
                   "was made over BASE.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this long (what was merged stays merged; run again to go on).")
@click.option("--stall", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, metavar="SECONDS",
              help="Stop when no chunk was merged for this long.")
def merge_command(base: str, store: str, name: str, force: bool, timeout: float | None,
                  stall: float) -> None:
    """Fold the persistent overlay STORE into its writable BASE (an ext4 partition or
    image file) with the kernel's snapshot-merge, offline; resumable.

    Checked before (STORE valid, recorded as BASE's; neither in use) and after (STORE
    empty, every chunk it held in BASE); STORE is then a new empty overlay of the merged
    BASE.  Device NAME-merge while it runs."""
    from dmoverlay.overlay.merge import merge

    done = merge(base, store, name=name, force=force, timeout=timeout, stall=stall)
    went_on = " (a merge cut short, gone on with)" if done.resumed else ""
    click.echo(f"{store}: {done.chunks} chunks merged into {base} in {done.seconds:.1f} s"
               f"{went_on}")


def layer_line(layer: Layer) -> str:
    """`PATH: what it holds, USED of SIZE (P%)` as far as known."""
    fill = ""
    percent = layer.percent
    if layer.used is not None and layer.size and percent is not None:
        fill = f", {format_size(layer.used)} of {format_size(layer.size)} ({percent:.1f}%)"
    elif layer.size:
        fill = f", {format_size(layer.size)}"
    state = f", {layer.state}" if layer.state not in (None, "active") else ""
    ram = (f", {format_size(layer.ram_free)} of RAM left" if layer.ram_free is not None
           else "")
    return f"{layer.path or '-'}: {layer.holds}{fill}{state}{ram}"


@click.command("teardown")
@NAME
@STATE_DIR
@click.option("--moved-under", metavar="DIR", default="",
              help="Look for the overlay's mounts under DIR too: where they were moved since "
                   "setup (dracut's shutdown hook: /oldsys).")
def teardown_command(name: str, state_dir: Path, moved_under: str) -> None:
    """Unmount and remove the overlay, in reverse order; safe to repeat."""
    state = teardown(state_dir, name, moved_under=moved_under)
    click.echo(f"{name}: torn down" if state else f"{name}: nothing to tear down")


if TYPE_CHECKING:  # generic from click 8.2 on; Debian 12's 8.1 is not
    _ThresholdsParam = click.ParamType[tuple[float, ...]]
else:
    _ThresholdsParam = click.ParamType


class ThresholdsType(_ThresholdsParam):
    name = "thresholds"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_thresholds(str(value))
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


@click.command("watch")
@NAME
@STATE_DIR
@click.option("--thresholds", type=ThresholdsType(), default="80,90,95", show_default=True,
              metavar="PERCENT,...",
              help="Warn as the fill passes each of these (increasing, 1..100); the last "
                   f"one is critical.  A passed one warns again after the fill fell "
                   f"{REARM_POINTS:g} points below it.")
@click.option("--interval", type=click.FloatRange(min=0.1, max=86400), default=10.0,
              show_default=True, metavar="SECONDS",
              callback=lambda ctx, param, value: _a_number(value),
              help="Seconds between looks.")
def watch_command(name: str, state_dir: Path, thresholds: tuple[float, ...],
                  interval: float) -> None:
    """Watch how full the overlay's COW store gets: one line on stderr as the fill
    passes each threshold, and when the snapshot fails (to the journal with its
    priority under systemd); ends when the overlay is gone."""
    journal = to_journal(os.environ, _stat(sys.stderr))

    def emit(event: Event) -> None:
        click.echo(line(event, journal=journal), err=True)

    try:
        watch(lambda: read_fill(state_dir, name), emit, name=name, levels=Levels(thresholds),
              interval=interval)
    except Terminated:  # systemd stopping it: nothing under way to undo
        emit(Event(Priority.NOTICE, f"{name}: the watch stops (SIGTERM)"))


def _a_number(value: float) -> float:
    # FloatRange lets NaN through (no comparison with it is true), and time.sleep refuses it
    if math.isnan(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


def _stat(stream: Any) -> os.stat_result | None:
    try:
        return os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no descriptor: not the journal's
        return None
