"""Attaching things for setup, each recorded in the state file before it is
attached: the state on disk always covers what exists."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dmoverlay.core.errors import OverlayError
from dmoverlay.core.run import run
from dmoverlay.overlay import blockdev
from dmoverlay.overlay.dmtable import Device
from dmoverlay.overlay.kernel import require_filesystem, require_loop
from dmoverlay.overlay.state import State, Step, StepKind


class Recorder:
    """Attach things, each recorded (and saved) before it is attached: a setup
    killed at any point leaves nothing that teardown does not know of."""

    def __init__(self, state: State, path: Path) -> None:
        self.state = state
        self.path = path
        self.state.save(path)

    def add(self, step: Step) -> Step:
        self.state.steps.append(step)
        self.state.save(self.path)
        return step

    def mkdir(self, path: Path) -> Path:
        # made first, noted after: never remove a directory that was not ours
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise OverlayError(f"{path} exists already", hint="a setup under this name "
                               "died before it noted it, or something planted it: look at "
                               "it, remove it, try again") from None
        self.add(Step(StepKind.DIR, os.fspath(path)))
        return path

    def loop(self, file: str, *, read_only: bool, offset: int = 0, size: int = 0) -> str:
        # the device is known only once attached: until then its backing file
        # is what teardown looks for
        require_loop()
        step = self.add(Step(StepKind.LOOP, "", backing=os.path.realpath(file)))
        step.what = blockdev.loop_setup(file, read_only=read_only, offset=offset, size=size)
        self.state.save(self.path)
        return step.what

    def mount(self, device: str, where: Path, *, fstype: str, options: str) -> Path:
        require_filesystem(fstype)
        self.add(Step(StepKind.MOUNT, os.fspath(where)))
        blockdev.mount(device, where, fstype=fstype, options=options)
        return where

    def dm(self, device: Device) -> str:
        self.add(Step(StepKind.DM, device.name))
        argv = ["dmsetup", "create", device.name, "--table", device.table]
        run([*argv, "--readonly"] if device.read_only else argv)
        node = Path("/dev/mapper") / device.name
        for _ in range(100):  # udev, where it runs, makes the node a moment later
            if node.exists():
                break
            time.sleep(0.05)
        else:
            raise OverlayError(f"{node} did not appear")
        for message in device.messages:
            run(["dmsetup", "message", device.name, "0", message])
        return os.fspath(node)

    def new_file(self, path: Path, size: int) -> Path:
        """A persistent overlay made by this setup: removed if the setup fails,
        kept by a teardown after it succeeded."""
        try:
            with open(path, "xb") as f:  # never someone else's file
                self.add(Step(StepKind.NEWFILE, os.fspath(path)))
                # allocated now: a store that finds its disk full halfway is
                # marked invalid by the kernel, and everything in it is lost
                os.posix_fallocate(f.fileno(), 0, size)
                os.fsync(f.fileno())
        except OSError as exc:
            raise OverlayError(f"cannot make the overlay file {path}: {exc.strerror}",
                               hint="give a smaller --overlay-size, or another place") from None
        return path
