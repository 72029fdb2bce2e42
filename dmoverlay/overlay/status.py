"""How full an overlay's COW is: of the RAM layer when there is one, else
of the persistent overlay; for a read-only persistent overlay, the fill of
the store shown under it as well."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import cow
from dmoverlay.core.cow import parse_pool_status
from dmoverlay.core.run import run
from dmoverlay.overlay.dmtable import Mode, Names
from dmoverlay.overlay.state import load_state


@dataclass(frozen=True)
class Status:
    name: str
    target: str
    state: str
    used: int
    total: int
    ram_free: int | None  # room left in the tmpfs holding the COW file
    mode: str = Mode.RAM.value
    overlay: str = ""  # the persistent overlay
    thin: bool = False
    kept_used: int | None = None  # read-only mode: the persistent store shown, its fill
    kept_total: int | None = None
    ram_copy: int = 0  # bytes of the image copied into RAM (rd.live.ram)

    @property
    def free(self) -> int:
        free = max(0, self.total - self.used) if self.state == "active" else 0
        return min(free, self.ram_free) if self.ram_free is not None else free

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 100.0

    @property
    def fill(self) -> float:
        """How full, counting the room writes really have: the COW's, or
        less when the tmpfs holding its file has less RAM left (writes
        fail then, before the COW is full)."""
        room = self.used + self.free if self.state == "active" else self.total
        return 100.0 * self.used / room if room else 100.0

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "target": self.target, "state": self.state,
                "used": self.used, "total": self.total, "free": self.free,
                "percent": round(self.percent, 2), "ram_free": self.ram_free,
                "mode": self.mode, "overlay": self.overlay or None, "thin": self.thin,
                "overlay_used": self.kept_used, "overlay_total": self.kept_total,
                "ram_copy": self.ram_copy}


def status(state_dir: Path, name: str) -> Status:
    """The COW's fill: of the RAM layer when there is one (a read-only
    persistent overlay's too), else of the persistent overlay."""
    state, _ = load_state(state_dir, name)
    names = Names(name)
    ram_free = None
    if state.cow_file:
        st = os.statvfs(os.path.dirname(state.cow_file))
        ram_free = st.f_bavail * st.f_frsize
    if state.thin:
        pool = parse_pool_status(run(["dmsetup", "status", names.pool]).stdout)
        state_word, used, total = pool.state, pool.used, pool.total
    else:
        snap = cow.parse_status(run(["dmsetup", "status", names.rw]).stdout)
        state_word, used, total = snap.state.value, snap.used_bytes, snap.total_bytes
    kept_used = kept_total = None
    if state.mode == Mode.READONLY.value:  # the store shown under the RAM layer
        kept = cow.parse_status(run(["dmsetup", "status", names.ro]).stdout)
        kept_used, kept_total = kept.used_bytes, kept.total_bytes
    return Status(name, state.target, state_word, used, total, ram_free, mode=state.mode,
                  overlay=state.overlay, thin=state.thin, kept_used=kept_used,
                  kept_total=kept_total, ram_copy=state.ram_copy)
