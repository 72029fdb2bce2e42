"""How full an overlay's COW is: of the RAM layer when there is one, else
of the persistent overlay; for a read-only persistent overlay, the fill of
the store shown under it as well.  `Status.layers()` says it layer by
layer, bottom up: what each holds and how full it is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dmoverlay.core import cow
from dmoverlay.core.cow import parse_pool_status
from dmoverlay.core.errors import CommandFailed, OverlayGone
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
    image: str = ""  # the base: the image (or device) setup was given
    base_size: int | None = None  # its size as the kernel maps it (None: not read)
    cow_file: str = ""  # the RAM layer's file, in a tmpfs

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
                "ram_copy": self.ram_copy,
                "layers": [layer.to_dict() for layer in self.layers()]}

    def layers(self) -> list[Layer]:
        """Bottom up: the base, the persistent store (if any), the RAM
        layer (if any); each with what it holds and its fill."""
        found = [Layer("base", "the image, read-only" + (", copied to RAM" if self.ram_copy
                                                        else ""),
                       self.image, None, self.base_size)]
        if self.overlay:
            if self.mode == Mode.READONLY.value:
                found.append(Layer("store", "changes of earlier boots, shown read-only",
                                   self.overlay, self.kept_used, self.kept_total))
            else:
                found.append(Layer("store", "changes, kept across boots", self.overlay,
                                   self.used, self.total, self.state))
        if self.mode != Mode.PERSISTENT.value:
            what = "thin pool" if self.thin else "RAM"
            found.append(Layer("ram", f"changes until shutdown ({what})", self.cow_file,
                               self.used, self.total, self.state, self.ram_free))
        return found


@dataclass(frozen=True)
class Layer:
    """One layer of an overlay: `used` and `size` in bytes (None: not
    known, or a base, which nothing fills)."""

    kind: str  # "base", "store", "ram"
    holds: str
    path: str
    used: int | None
    size: int | None
    state: str | None = None  # the snapshot's (active, overflow, invalid): where writes go
    ram_free: int | None = None  # room left in the tmpfs holding its file

    @property
    def percent(self) -> float | None:
        if self.used is None or not self.size:
            return None
        return 100.0 * self.used / self.size

    def to_dict(self) -> dict[str, object]:
        percent = self.percent
        return {"layer": self.kind, "holds": self.holds, "path": self.path or None,
                "used": self.used, "size": self.size, "state": self.state,
                "percent": None if percent is None else round(percent, 2),
                "ram_free": self.ram_free}


def status(state_dir: Path, name: str) -> Status:
    """The COW's fill: of the RAM layer when there is one (a read-only
    persistent overlay's too), else of the persistent overlay."""
    state, _ = load_state(state_dir, name)
    names = Names(name)
    ram_free = None
    if state.cow_file:
        try:
            st = os.statvfs(os.path.dirname(state.cow_file))
        except OSError as exc:
            raise OverlayGone(f"{name}: the RAM layer's directory "
                              f"{os.path.dirname(state.cow_file)} is gone ({exc.strerror})",
                              hint=f"tear it down: dmoverlay teardown --name {name}") from None
        ram_free = st.f_bavail * st.f_frsize
    if state.thin:
        pool = parse_pool_status(_dm_status(name, names.pool))
        state_word, used, total = pool.state, pool.used, pool.total
    else:
        snap = cow.parse_status(_dm_status(name, names.rw))
        state_word, used, total = snap.state.value, snap.used_bytes, snap.total_bytes
    kept_used = kept_total = None
    if state.mode == Mode.READONLY.value:  # the store shown under the RAM layer
        kept = cow.parse_status(_dm_status(name, names.ro))
        kept_used, kept_total = kept.used_bytes, kept.total_bytes
    return Status(name, state.target, state_word, used, total, ram_free, mode=state.mode,
                  overlay=state.overlay, thin=state.thin, kept_used=kept_used,
                  kept_total=kept_total, ram_copy=state.ram_copy, image=state.image,
                  base_size=_base_size(names), cow_file=state.cow_file)


def _dm_status(name: str, device: str) -> str:
    try:
        return run(["dmsetup", "status", device]).stdout
    except CommandFailed as exc:
        raise OverlayGone(f"{name}: device {device} cannot be asked ({exc.message})",
                          hint=f"it was removed by hand? tear the rest down: dmoverlay "
                               f"teardown --name {name}") from None


def _base_size(names: Names) -> int | None:
    table = run(["dmsetup", "table", names.base], check=False)
    return table_size(table.stdout) if table.returncode == 0 else None


def table_size(table: str) -> int | None:
    """The bytes a device-mapper table maps (`START LENGTH TARGET ...` in
    512-byte sectors, one line per segment), or None if it is not one."""
    end = 0
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit() \
                or int(fields[0]) != end:
            return None
        end += int(fields[1])
    return end * 512 if end else None
