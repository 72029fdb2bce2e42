"""The kernel command line, read as dracut's dmsquash-live reads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmoverlay.core.errors import NotLive, UsageError
from dmoverlay.core.sizes import MiB
from dmoverlay.overlay.cmdline import (
    CMDLINE_MAX,
    KEYS,
    LiveBoot,
    parse,
    read_cmdline,
    setup_options,
    split_cmdline,
    updates_of,
)
from dmoverlay.overlay.dmtable import Mode
from dmoverlay.overlay.options import SetupOptions

FEDORA = ("BOOT_IMAGE=/images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-41-1-4 "
          "rd.live.image quiet rhgb")


def test_a_fedora_live_cd_line() -> None:
    boot = parse(FEDORA)
    assert boot == LiveBoot(root="CDLABEL=Fedora-WS-Live-41-1-4", image_flag=True)


def test_dracuts_defaults() -> None:
    boot = parse("root=live:LABEL=LIVE")
    assert (boot.live_dir, boot.squashfs_name) == ("LiveOS", "squashfs.img")
    assert boot.overlay is None and boot.overlay_size is None  # dmoverlay's: half the RAM
    assert not (boot.ram or boot.overlay_readonly or boot.overlay_reset or boot.overlay_thin)
    assert boot.updates == ()


def test_every_option() -> None:
    boot = parse("root=live:UUID=2024-05-01-10-00-00-00 rd.live.dir=/boot/LiveOS/ "
                 "rd.live.squashimg=rootfs.sqfs rd.live.ram=1 "
                 "rd.live.overlay=LABEL=STICK:/LiveOS/overlay-STICK rd.live.overlay.size=4096 "
                 "rd.live.overlay.readonly rd.live.overlay.thin=yes rd.live.debug=0 "
                 "rd.live.updates=http://10.0.2.2/a.img inst.updates=LABEL=UPD:/u.img")
    assert boot == LiveBoot(
        root="UUID=2024-05-01-10-00-00-00", live_dir="boot/LiveOS",
        squashfs_name="rootfs.sqfs", ram=True, overlay="LABEL=STICK:/LiveOS/overlay-STICK",
        overlay_size=4096 * MiB, overlay_readonly=True, overlay_thin=True,
        updates=("http://10.0.2.2/a.img", "LABEL=UPD:/u.img"))


def test_dracuts_older_spellings() -> None:
    boot = parse("root=/dev/sr0 liveimg live_dir=Live overlay=/dev/sdb1 reset_overlay live_ram")
    assert boot == LiveBoot(root="/dev/sr0", image_flag=True, live_dir="Live",
                            overlay="/dev/sdb1", overlay_reset=True, ram=True)


def test_the_last_value_wins_and_updates_are_all_kept() -> None:
    boot = parse("root=live:LABEL=A root=live:LABEL=B rd.live.overlay.size=10 "
                 "rd.live.overlay.size=20 inst.updates=/a inst.updates=/b rd.live.ram "
                 "rd.live.ram=0")
    assert boot.root == "LABEL=B" and boot.overlay_size == 20 * MiB and not boot.ram
    assert boot.updates == ("/a", "/b")


def test_quotes_and_the_end_of_the_kernels_part() -> None:
    line = 'root=live:"CDLABEL=My Live" "rd.live.dir=Live OS" -- rd.live.ram'
    assert list(split_cmdline(line)) == [("root", "live:CDLABEL=My Live"),
                                        ("rd.live.dir", "Live OS")]
    boot = parse(line)
    assert (boot.root, boot.live_dir, boot.ram) == ("CDLABEL=My Live", "Live OS", False)


def test_other_options_are_left_alone() -> None:
    boot = parse("root=live:LABEL=X console=ttyS0,115200 rd.break=pre-mount rd.luks=0 "
                 "rd.liveish=1 systemd.unit=rescue.target")
    assert boot == LiveBoot(root="LABEL=X")


@pytest.mark.parametrize("line", [
    "", "quiet", "root=/dev/sda1 ro", "root=UUID=1234 rhgb", "rd.live.ram",
])
def test_no_live_root(line: str) -> None:
    with pytest.raises(NotLive):
        parse(line)


@pytest.mark.parametrize(("line", "words"), [
    ("root=live:LABEL=X rd.live.overlay.sise=512", "unknown option rd.live.overlay.sise"),
    ("root=live:LABEL=X rd.live.rams", "unknown option rd.live.rams"),
    ("root=live:LABEL=X rd.live.overlay.overlayfs", "rd.live.overlay.overlayfs is not supported"),
    ("root=live:LABEL=X rd.live.check", "rd.live.check is not supported"),
    ("root=live:LABEL=X rd.live.overlay.size=1G", "rd.live.overlay.size=1G: not a whole number"),
    ("root=live:LABEL=X rd.live.overlay.size=0", "rd.live.overlay.size=0: not a whole number"),
    ("root=live:LABEL=X rd.live.overlay.size=-5", "rd.live.overlay.size=-5: not a whole number"),
    ("root=live:LABEL=X rd.live.overlay.size=\u0663", "not a whole number"),
    ("root=live:LABEL=X rd.live.overlay.size", "rd.live.overlay.size needs a value"),
    ("root=live:LABEL=X rd.live.ram=maybe", "rd.live.ram=maybe: not a yes or no"),
    ("root=live:LABEL=X rd.live.dir=../../etc", "rd.live.dir=../../etc: must be a path inside"),
    ("root=live:LABEL=X rd.live.dir=/", "rd.live.dir=/: must be a path inside"),
    ("root=live:LABEL=X rd.live.squashimg=a/../../b", "must be a path inside"),
    ("root=live:LABEL=X rd.live.updates=", "rd.live.updates needs a value"),
    ("root=live:", "names no device"),
    ("root=live:nfs://server/live", "a network root is not supported"),
    ("root=live:http://server/live.img", "a network root is not supported"),
    ("root=live:FOO=bar", "root=live:FOO=bar: not a device"),
    ("root=live:sda1", "root=live:sda1: not a device"),
    ('root=live:LABEL=X rd.live.dir="LiveOS', "a double quote is not closed"),
])
def test_bad_lines_name_the_option(line: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse(line)
    assert words in caught.value.message
    assert not isinstance(caught.value, NotLive)
    assert caught.value.hint


def test_every_key_is_read() -> None:
    """Each row of the table reaches its field (a row with a wrong field
    name would fail here, not at boot)."""
    for key in KEYS:
        if key.field in ("root", "updates"):
            continue
        value = {"flag": "", "text": "=x", "name": "=Dir", "MiB": "=7"}[key.value.value]
        for name in (key.name, *key.legacy):
            line = f"root=live:LABEL=L {name}{value}"
            if key.field in ("overlay_readonly", "overlay_reset"):
                line += " rd.live.overlay=LABEL=S"
            boot = parse(line)
            assert getattr(boot, key.field) != getattr(LiveBoot(), key.field), name


_VALUES = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_NAMES = st.sampled_from([n for k in KEYS for n in (k.name, *k.legacy)]
                         + ["rd.live.x", "rd.live.check", "quiet", "--"])
_WORDS = st.one_of(
    st.builds(lambda k, v: f'{k}="{v}"', _NAMES, _VALUES),
    st.builds(lambda k, v: f"{k}={v}", _NAMES, _VALUES),
    _NAMES,
    st.builds(lambda v: f"root=live:{v}", _VALUES),
    st.sampled_from(["root=live:LABEL=L", "root=live:/dev/sr0", "rd.live.overlay=LABEL=S"]),
)


@given(st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=200),
                 st.lists(_WORDS, max_size=8).map(" ".join)))
def test_any_line_is_a_boot_or_one_error(line: str) -> None:
    try:
        boot = parse(line)
    except UsageError as exc:
        assert exc.message.startswith("kernel command line: ")
        assert exc.message.isprintable(), exc.message
    else:
        assert boot.root and ".." not in boot.live_dir.split("/")
        assert ".." not in boot.squashfs_name.split("/")


def _options(line: str) -> SetupOptions:
    return setup_options(parse(line), target=Path("/sysroot"), name="live",
                         state_dir=Path("/run/dmoverlay"))


def test_what_setup_is_asked() -> None:
    opts = _options("root=live:CDLABEL=Fedora-WS-Live rd.live.dir=Live rd.live.squashimg=s.img "
                    "rd.live.overlay=LABEL=STICK:/LiveOS/overlay-STICK rd.live.overlay.size=64 "
                    "rd.live.overlay.readonly rd.live.overlay.thin")
    assert opts.image.text == "CDLABEL=Fedora-WS-Live"
    assert opts.image.spec is not None  # CDLABEL= is a LABEL= to blkid
    assert (opts.image.spec.key, opts.image.spec.value) == ("LABEL", "Fedora-WS-Live")
    assert (opts.live_dir, opts.squashfs_name, opts.overlay_size) == ("Live", "s.img", 64 * MiB)
    assert opts.overlay is not None and opts.overlay.path == "/LiveOS/overlay-STICK"
    assert opts.overlay.where is not None and opts.overlay.where.text == "LABEL=STICK"
    assert opts.mode is Mode.READONLY and opts.overlay_thin
    plain = _options("root=live:/run/initramfs/live.img")
    assert plain.image.text == "/run/initramfs/live.img" and plain.image.spec is None
    assert plain.mode is Mode.RAM and plain.overlay_size is None


@pytest.mark.parametrize(("line", "ram"), [
    ("root=live:LABEL=X rd.live.ram", True), ("root=live:LABEL=X live_ram", True),
    ("root=live:LABEL=X rd.live.ram=1", True), ("root=live:LABEL=X rd.live.ram=0", False),
    ("root=live:LABEL=X live_ram rd.live.ram=no", False), ("root=live:LABEL=X", False),
])
def test_rd_live_ram_asks_setup_to_copy_to_ram(line: str, ram: bool) -> None:
    """rd.live.ram (and dracut's older live_ram) is setup's --ram: it was
    refused as not supported yet."""
    assert _options(line).ram is ram


@pytest.mark.parametrize("line", [
    "root=live:LABEL=X rd.live.ram rd.live.overlay=LABEL=S:/o",
    "root=live:LABEL=X rd.live.ram rd.live.overlay=LABEL=S rd.live.overlay.readonly "
    "rd.live.overlay.thin",
    "root=live:LABEL=X rd.live.ram rd.live.overlay.size=512 rd.live.overlay.thin",
])
def test_rd_live_ram_goes_with_every_overlay(line: str) -> None:
    """dracut copies the image to RAM whatever the overlay, a persistent one
    included (read from RAM; the medium stays in use only if it holds the
    overlay): the same command lines are accepted here."""
    opts = _options(line)
    assert opts.ram


@pytest.mark.parametrize(("line", "words"), [
    ("root=live:LABEL=X rd.live.overlay=LABEL=S:rel",
     "kernel command line: rd.live.overlay LABEL=S:rel: the path inside the device"),
    ("root=live:LABEL=X rd.live.overlay=LABEL=:/o", "kernel command line: rd.live.overlay"),
    ("root=live:LABEL= rd.live.image", "kernel command line: root=live:LABEL=: empty device"),
    ("root=live:LABEL=X rd.live.overlay.reset",
     "kernel command line: rd.live.overlay.reset needs rd.live.overlay"),
    ("root=live:LABEL=X readonly_overlay", "readonly_overlay needs rd.live.overlay"),
    ("root=live:LABEL=X overlay=LABEL=S rd.live.overlay.reset rd.live.overlay.readonly",
     "rd.live.overlay.reset and rd.live.overlay.readonly contradict"),
    ("root=live:LABEL=X rd.live.overlay=LABEL=S rd.live.overlay.thin",
     "rd.live.overlay.thin with rd.live.overlay needs rd.live.overlay.readonly"),
])
def test_bad_values_for_setup_name_the_option(line: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        _options(line)
    assert words in caught.value.message


def test_a_command_line_file_is_read_with_care(tmp_path: Path) -> None:
    line = tmp_path / "cmdline"
    line.write_bytes(b"root=live:LABEL=\xff rd.live.image\n")
    assert parse(read_cmdline(line)).root == "LABEL=\udcff"
    os.mkfifo(tmp_path / "fifo")
    assert read_cmdline(tmp_path / "fifo") == ""  # no writer: not a hang
    (tmp_path / "huge").write_bytes(b"x" * (CMDLINE_MAX + 1))
    with pytest.raises(UsageError, match="not a command line"):
        read_cmdline(tmp_path / "huge")
    with pytest.raises(UsageError, match="cannot read the command line"):
        read_cmdline(tmp_path / "missing")


def test_only_ascii_blanks_part_words() -> None:
    """As dracut's shell and systemd read the line: a no-break space or an
    information separator inside a label is part of it (isspace() cut there)."""
    for label in ("My\u00a0Disk", "a\x1cb", "x\x85y"):
        assert parse(f"root=live:LABEL={label} rd.live.image").root == f"LABEL={label}"
    assert parse("root=live:LABEL=A\trd.live.ram=0\vrd.live.dir=D\f\r").live_dir == "D"


@pytest.mark.parametrize("digits", ["9" * 10, "1" + "0" * 5000, "0" * 20 + "7"])
def test_a_size_past_any_machine_is_one_line(digits: str) -> None:
    line = f"root=live:LABEL=X rd.live.overlay.size={digits}"
    if digits.lstrip("0") == "7":
        assert parse(line).overlay_size == 7 * MiB
        return
    with pytest.raises(UsageError, match="not a whole number of MiB"):
        parse(line)


# ---------------------------------------------------------------- updates, at boot

def test_updates_keep_their_order_across_both_keys() -> None:
    line = ("root=live:LABEL=L inst.updates=/a.img rd.live.updates=LABEL=U:/b.tar "
            "inst.updates=http://10.0.2.2/c.img rd.live.updates=/a.img")
    assert updates_of(line) == ("/a.img", "LABEL=U:/b.tar", "http://10.0.2.2/c.img", "/a.img")


def test_updates_after_the_end_of_the_kernels_part_are_inits() -> None:
    assert updates_of("rd.live.updates=/a -- rd.live.updates=/b inst.updates=/c") == ("/a",)


def test_updates_are_read_through_quotes() -> None:
    line = 'inst.updates="CDLABEL=My Disk:/u p.img" "rd.live.updates=/with space.tar"'
    assert updates_of(line) == ("CDLABEL=My Disk:/u p.img", "/with space.tar")


@pytest.mark.parametrize("line", [
    "inst.updates=http://10.0.2.2/u.img",  # anaconda's, on an installer with no live root
    "root=/dev/sda1 ro quiet inst.updates=http://10.0.2.2/u.img",
    # the rest of the line is setup's to judge: a misspelt key does not stop updates
    "root=live:LABEL=L rd.live.overlay.sise=1 inst.updates=http://10.0.2.2/u.img",
])
def test_updates_need_no_live_root(line: str) -> None:
    assert updates_of(line) == ("http://10.0.2.2/u.img",)


@pytest.mark.parametrize("line", ["", "quiet", "root=live:LABEL=L rd.live.image",
                                  "inst.updates_x=/a", "rd.live.updatesx=/a"])
def test_a_line_without_updates_has_none(line: str) -> None:
    assert updates_of(line) == ()


@pytest.mark.parametrize(("line", "words"), [
    ("inst.updates=", "inst.updates needs a value"),
    ("rd.live.updates", "rd.live.updates needs a value"),
    ('rd.live.updates="/a', "a double quote is not closed"),
])
def test_a_bad_update_value_is_one_line(line: str, words: str) -> None:
    with pytest.raises(UsageError, match=words) as caught:
        updates_of(line)
    assert caught.value.hint
