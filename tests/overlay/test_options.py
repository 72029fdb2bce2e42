"""Setup's options: combinations refused before anything is touched, the
mode they ask for, the RAM layer's size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import GiB
from dmoverlay.overlay.dmtable import (
    Mode,
)
from dmoverlay.overlay.options import SetupOptions, check_options, overlay_size, ram_bytes


def test_overlay_size_defaults_to_half_the_ram_and_warns_past_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert ram_bytes("MemTotal:       24000000 kB\nMemFree: 1 kB\n") == 24000000 * 1024
    opts = SetupOptions(image="x", target=Path("/t"))
    assert overlay_size(opts, 8 * GiB) == 4 * GiB
    big = SetupOptions(image="x", target=Path("/t"), overlay_size=16 * GiB)
    assert overlay_size(big, 8 * GiB) == 16 * GiB
    assert "more than this machine's RAM" in capsys.readouterr().err
    with pytest.raises(UsageError):
        overlay_size(SetupOptions("x", Path("/t"), overlay_size=10), GiB)


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
        check_options(SetupOptions("x", Path("/t"), **kwargs))


def test_modes_and_accepted_combinations() -> None:
    def opts(**kwargs: Any) -> SetupOptions:
        return SetupOptions("x", Path("/t"), **kwargs)
    assert opts().mode is Mode.RAM
    assert opts(overlay="/o").mode is Mode.PERSISTENT
    assert opts(overlay="/o", overlay_readonly=True).mode is Mode.READONLY
    for ok in (opts(overlay_thin=True), opts(overlay="/o", overlay_readonly=True,
                                             overlay_thin=True),
               opts(overlay="/o", overlay_reset=True), opts(overlay="LABEL=A:/o")):
        check_options(ok)
