"""Setup's options: combinations refused before anything is touched, the
mode they ask for, the RAM layer's size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmoverlay.core.errors import OverlayError, UsageError
from dmoverlay.core.sizes import GiB, MiB
from dmoverlay.overlay import devspec, persistent
from dmoverlay.overlay.dmtable import Mode
from dmoverlay.overlay.options import (
    RAM_MARGIN,
    SMALLEST_COW,
    SetupOptions,
    check_options,
    mem_available,
    overlay_size,
    parse_image,
    parse_overlay,
    ram_bytes,
    ram_copy_cow,
)


def options(image: str = "x", *, overlay: str | None = None, **kwargs: Any) -> SetupOptions:
    """Options as the command line makes them: IMAGE and --overlay parsed."""
    return SetupOptions(parse_image(image), Path("/t"), overlay=parse_overlay(overlay), **kwargs)


def test_overlay_size_defaults_to_half_the_ram_and_warns_past_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert ram_bytes("MemTotal:       24000000 kB\nMemFree: 1 kB\n") == 24000000 * 1024
    opts = options()
    assert overlay_size(opts, 8 * GiB) == 4 * GiB
    big = options(overlay_size=16 * GiB)
    assert overlay_size(big, 8 * GiB) == 16 * GiB
    assert "more than this machine's RAM" in capsys.readouterr().err
    with pytest.raises(UsageError):
        overlay_size(options(overlay_size=10), GiB)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"overlay_reset": True}, "--overlay-reset needs --overlay"),
    ({"overlay_readonly": True}, "--overlay-readonly needs --overlay"),
    ({"overlay": "/o", "overlay_reset": True, "overlay_readonly": True}, "contradict"),
    ({"overlay": "/o", "overlay_thin": True}, "--overlay-thin with --overlay needs"),
    ({"overlay": "/o", "tmpfs_dir": Path("/t")}, "--tmpfs-dir means nothing"),
    ({"overlay": "LABEL=:/x"}, "empty device spec"),
])
def test_option_combinations_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        check_options(options(**kwargs))


def test_modes_and_accepted_combinations() -> None:
    def opts(**kwargs: Any) -> SetupOptions:
        return options(**kwargs)
    assert opts().mode is Mode.RAM
    assert opts(overlay="/o").mode is Mode.PERSISTENT
    assert opts(overlay="/o", overlay_readonly=True).mode is Mode.READONLY
    for ok in (opts(overlay_thin=True), opts(overlay="/o", overlay_readonly=True,
                                             overlay_thin=True),
               opts(overlay="/o", overlay_reset=True), opts(overlay="LABEL=A:/o")):
        check_options(ok)


def test_the_overlay_text_is_parsed_once_per_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """IMAGE and --overlay are parsed where the options are made; what checks
    and uses them gets the parsed values (parse_spec ran three times, and the
    overlay's device spec twice more, along one setup)."""
    calls: list[str] = []

    def counted(text: str) -> persistent.OverlaySpec:
        calls.append(text)
        return real(text)
    real = persistent.parse_spec
    monkeypatch.setattr(persistent, "parse_spec", counted)
    opts = options("CDLABEL=Fedora-Live", overlay="LABEL=LIVE:/LiveOS/overlay-LIVE",
                   overlay_readonly=True, overlay_thin=True)
    check_options(opts)
    assert calls == ["LABEL=LIVE:/LiveOS/overlay-LIVE"]
    assert opts.image == devspec.Location("CDLABEL=Fedora-Live", devspec.Spec(
        "LABEL", "Fedora-Live", "CDLABEL=Fedora-Live"))
    assert opts.overlay is not None and opts.overlay.where is not None
    assert opts.overlay.where.spec == devspec.Spec("LABEL", "LIVE", "LABEL=LIVE")
    assert (opts.overlay.device, opts.overlay.path) == ("LABEL=LIVE", "/LiveOS/overlay-LIVE")
    assert opts.mode is Mode.READONLY


@pytest.mark.parametrize(("image", "overlay", "words"), [
    ("LABEL=", None, "IMAGE LABEL=: empty device spec 'LABEL='"),
    ("SERIAL=12", None, "IMAGE SERIAL=12: unknown device spec SERIAL="),
    ("x", "LABEL=:/x", "--overlay LABEL=:/x: empty device spec 'LABEL='"),
    ("x", "UUID=", "--overlay UUID=: empty device spec 'UUID='"),
    ("x", "SERIAL=12:/o", "--overlay SERIAL=12:/o: unknown device spec SERIAL="),
    ("x", "LABEL=LIVE:o", "--overlay LABEL=LIVE:o: the path inside the device must be"),
    ("x", " ", "empty --overlay"),
])
def test_bad_text_is_one_line_naming_the_option(image: str, overlay: str | None,
                                                words: str) -> None:
    with pytest.raises(UsageError) as exc:
        options(image, overlay=overlay)
    assert exc.value.message.startswith(words)
    assert "\n" not in exc.value.message and exc.value.hint


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"live_dir": "Live\nOS"}, "--live-dir 'Live\\nOS': must be a path inside the medium"),
    ({"live_dir": "../etc"}, "--live-dir '../etc': must be a path inside the medium"),
    ({"live_dir": "/"}, "--live-dir '/': must be a path"),
    ({"squashfs_name": "a/../../b"}, "--squashfs-name 'a/../../b': must be a path"),
    ({"squashfs_name": "s\x1b[31m.img"}, "--squashfs-name 's\\x1b[31m.img': must be"),
])
def test_names_inside_the_medium_are_checked_first(kwargs: dict[str, Any], words: str) -> None:
    """Before anything is recorded: such a name used to reach debugfs' request
    late (a newline failed there, with a hint about renaming the source)."""
    with pytest.raises(UsageError) as caught:
        check_options(options(**kwargs))
    assert words in caught.value.message
    check_options(options(live_dir="/boot/LiveOS/", squashfs_name="squashfs.img"))


# ------------------------------------------------------------------ copy to RAM


def test_mem_available_is_read_from_meminfo() -> None:
    text = "MemTotal:  8000000 kB\nMemFree:  100 kB\nMemAvailable:  6000000 kB\n"
    assert mem_available(text) == 6000000 * 1024
    with pytest.raises(OverlayError, match="MemAvailable"):
        mem_available("MemTotal:  8000000 kB\nMemFree:  100 kB\n")


@pytest.mark.parametrize(("image", "cow", "available", "given", "kept"), [
    (GiB, 2 * GiB, 4 * GiB, True, 2 * GiB),  # fits, the margin to spare
    (GiB, 2 * GiB, 3 * GiB + RAM_MARGIN, True, 2 * GiB),  # exactly
    (GiB, 4 * GiB, 4 * GiB, False, 4 * GiB - GiB - RAM_MARGIN),  # the default makes room
    (GiB, 512 * MiB, 8 * GiB, False, 512 * MiB),  # the default, where it fits, kept
    (GiB, 0, GiB + RAM_MARGIN, False, 0),  # persistent: no COW in RAM
    (GiB, 0, GiB + RAM_MARGIN, True, 0),
])
def test_a_copy_that_fits_beside_the_cow(image: int, cow: int, available: int, given: bool,
                                         kept: int) -> None:
    assert ram_copy_cow(image, cow, available, cow_given=given) == kept


@pytest.mark.parametrize(("image", "cow", "available", "given", "words", "hint"), [
    (GiB, 2 * GiB, 3 * GiB + RAM_MARGIN - 1, True,
     "1024 MiB for it, 2048 MiB for the COW and 256 MiB for the rest of the boot need "
     "3328 MiB, and 3327 MiB is available", "smaller --overlay-size"),
    (3 * GiB, 2 * GiB, 3 * GiB, False, "64 MiB for the COW", "leave out --ram"),
    (GiB, 0, GiB, True, "1024 MiB for it and 256 MiB for the rest of the boot need 1280 MiB, "
     "and 1024 MiB is available", "leave out --ram"),
    (8 * GiB + 1, 0, -5, False, "8193 MiB for it and", "leave out --ram"),
])
def test_a_copy_that_does_not_fit_is_refused_naming_the_sizes(
        image: int, cow: int, available: int, given: bool, words: str, hint: str) -> None:
    """dracut copies whatever the sizes, fills the RAM and the boot hangs:
    here one line says what does not fit, before anything is copied."""
    with pytest.raises(OverlayError) as caught:
        ram_copy_cow(image, cow, available, cow_given=given)
    message = caught.value.message
    assert message.startswith("not enough RAM to copy the image: ") and words in message
    assert "\n" not in message and hint in (caught.value.hint or "")
    if not (cow and given):
        assert "--overlay-size" not in (caught.value.hint or "")


def test_the_default_cow_shrinks_no_further_than_the_smallest() -> None:
    room = GiB + RAM_MARGIN + SMALLEST_COW
    assert ram_copy_cow(GiB, 4 * GiB, room, cow_given=False) == SMALLEST_COW
    with pytest.raises(OverlayError):
        ram_copy_cow(GiB, 4 * GiB, room - 1, cow_given=False)


def test_ram_goes_with_every_overlay_mode() -> None:
    """--ram with a persistent overlay is what dracut's rd.live.ram does too:
    the image is read from RAM, the overlay stays on its device."""
    for opts in (options(ram=True), options(ram=True, overlay="/o"),
                 options(ram=True, overlay="/o", overlay_readonly=True, overlay_thin=True),
                 options(ram=True, overlay_thin=True, tmpfs_dir=Path("/t"))):
        check_options(opts)
