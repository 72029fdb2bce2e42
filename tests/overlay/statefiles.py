"""State files as setup writes them, for the tests of reading and undoing them."""

from __future__ import annotations

import os
from pathlib import Path

from dmoverlay.overlay.state import State, Step


def make_state(top: Path, *steps: Step, name: str = "live", complete: bool = True) -> State:
    return State(name, os.fspath(top / "sysroot"), "LABEL=LIVE", 1 << 30, steps=list(steps),
                 complete=complete)


def plant(state_dir: Path, text: str, name: str = "live") -> Path:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    path = state_dir / f"{name}.json"
    path.write_text(text)
    return path
