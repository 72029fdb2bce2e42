"""The mksquashfs command line and the options it is made from.  No tools
run here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmoverlay.build.squashfs import Compressor, SquashOptions, mksquashfs_argv
from dmoverlay.core.errors import UsageError
from dmoverlay.core.sizes import KiB, MiB


def test_mksquashfs_command() -> None:
    argv = mksquashfs_argv(Path("/w/sq"), Path("/w/o.img"), SquashOptions(), epoch=7,
                           machine="x86_64")
    assert argv[:3] == ["mksquashfs", "/w/sq", "/w/o.img"]
    joined = " ".join(argv)
    assert "-mkfs-time 7 -all-time 7" in joined
    assert "-comp xz" in joined and "-Xbcj x86" in joined and "-b 131072" in joined
    arm = mksquashfs_argv(Path("s"), Path("o"), SquashOptions(), epoch=7, machine="aarch64")
    assert "-Xbcj" not in arm
    zstd = mksquashfs_argv(Path("s"), Path("o"), SquashOptions(Compressor.ZSTD, 19), epoch=7)
    assert re.search(r"-comp zstd .*-Xcompression-level 19", " ".join(zstd))


@pytest.mark.parametrize(("kw", "words"), [
    ({"compressor": Compressor.XZ, "level": 3}, "no compression level"),
    ({"compressor": Compressor.LZ4, "level": 3}, "no compression level"),
    ({"compressor": Compressor.GZIP, "level": 10}, "1 to 9"),
    ({"block_size": 2 * MiB}, "power of two"),
    ({"block_size": 3 * KiB}, "power of two"),
    ({"block_size": 96 * KiB}, "power of two"),
])
def test_squash_options_refused(kw: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        SquashOptions(**kw)  # type: ignore[arg-type]
