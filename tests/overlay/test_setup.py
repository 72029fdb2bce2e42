"""Setup on a host without device-mapper: refused before anything is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmoverlay.core.errors import DmoverlayError
from dmoverlay.overlay.options import SetupOptions, parse_image
from dmoverlay.overlay.setup import setup


def test_setup_refuses_without_root_or_snapshot(tmp_path: Path) -> None:
    opts = SetupOptions(image=parse_image(str(tmp_path / "x.img")), target=tmp_path,
                        state_dir=tmp_path / "state")
    with pytest.raises(DmoverlayError):
        setup(opts)  # here: root, but no device-mapper (or not root elsewhere)
    assert not (tmp_path / "state").exists()
