"""The checks setup makes without starting a program (sysfs read instead of
dmsetup, which costs more than the check itself at boot), on a made-up sysfs."""

from __future__ import annotations

from pathlib import Path

from dmoverlay.overlay import _dm_exists, _module_present


def _dm(sysfs: Path, index: int, name: str) -> None:
    (sysfs / f"block/dm-{index}/dm").mkdir(parents=True)
    (sysfs / f"block/dm-{index}/dm/name").write_text(f"{name}\n")


def test_dm_exists_by_name(tmp_path: Path) -> None:
    _dm(tmp_path, 0, "live-rw")
    _dm(tmp_path, 3, "live-base")
    (tmp_path / "block/loop0").mkdir()
    assert _dm_exists("live-rw", tmp_path)
    assert _dm_exists("live-base", tmp_path)
    assert not _dm_exists("live", tmp_path)  # a prefix is not the name
    assert not _dm_exists("live-ro", tmp_path)


def test_module_present(tmp_path: Path) -> None:
    (tmp_path / "module/dm_snapshot").mkdir(parents=True)
    control = tmp_path / "control"
    assert not _module_present("dm-snapshot", tmp_path, control)  # no device-mapper at all
    control.touch()
    assert _module_present("dm-snapshot", tmp_path, control)
    assert not _module_present("dm-thin-pool", tmp_path, control)  # then dmsetup decides
