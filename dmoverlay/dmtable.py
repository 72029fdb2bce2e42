"""What an overlay is made of, decided without touching the kernel: names,
device-mapper tables, sizes, and the record that lets teardown undo it.

The snapshot store is `PO` (persistent, overflow-aware) with 4 KiB chunks,
as dracut's dmsquash-live uses for its tmpfs COW:
- PO, not N: when the COW fills up, an N snapshot turns Invalid and every
  read fails, taking the running system down with it; PO turns Overflow:
  writes fail, but reads (the whole system) keep working.  The price is a
  little metadata in the COW (one 4 KiB chunk per 256 data chunks).
- 8 sectors (4 KiB), ext4's block size: a scattered 4 KiB write copies one
  chunk; 64 KiB chunks used 16 times the COW for such writes.  The kernel
  keeps about 32 bytes of RAM per chunk in use: 8 MiB per GiB written."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dmoverlay.errors import UsageError

SECTOR = 512
STORE = "PO"
CHUNK_SECTORS = 8
DEFAULT_NAME = "live"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")


@dataclass(frozen=True)
class Names:
    """dracut's device names for an overlay called `name`: live-rw, live-base."""

    name: str = DEFAULT_NAME

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise UsageError(f"overlay name {self.name!r} is not usable as a device name",
                             hint="letters, digits, '.', '_' and '-'")

    @property
    def rw(self) -> str:
        return f"{self.name}-rw"

    @property
    def base(self) -> str:
        return f"{self.name}-base"


def snapshot_table(*, sectors: int, origin: str, cow: str, store: str = STORE,
                   chunk: int = CHUNK_SECTORS) -> str:
    return f"0 {sectors} snapshot {origin} {cow} {store} {chunk}"


def linear_table(*, sectors: int, device: str) -> str:
    return f"0 {sectors} linear {device} 0"


def cow_file_size(overlay_size: int) -> int:
    """The sparse COW file: the overlay size, in whole chunks."""
    chunk = CHUNK_SECTORS * SECTOR
    return max(chunk * 16, overlay_size // chunk * chunk)


@dataclass
class Step:
    """One thing setup attached, and what undoes it."""

    kind: str  # mount | loop | dm | dir | file
    what: str  # mount point, loop device, dm name, path
    backing: str = ""  # loop: its file


@dataclass
class State:
    """What an overlay consists of, written after every step of setup, so
    that teardown can undo even a setup that died half-way."""

    name: str
    target: str
    image: str
    overlay_size: int
    cow_file: str = ""
    steps: list[Step] = field(default_factory=list)
    complete: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> State:
        data: dict[str, Any] = json.loads(text)
        steps = [Step(**s) for s in data.pop("steps", [])]
        return cls(**data, steps=steps)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
