"""Trees deeper than Python recurses and than a path can name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmoverlay.core.tree import remove_tree


def make_chain(top: Path, levels: int, *, name: str = "d", leaf: str | None = None) -> None:
    """`levels` directories called `name`, each in the last, under the
    existing directory `top`, and an empty file `leaf` at the bottom; each
    made relative to the one above, so no path is ever as long as theirs."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        if leaf is not None:
            os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@contextmanager
def chain(top: Path, levels: int, *, name: str = "d", leaf: str | None = None) -> Iterator[Path]:
    """make_chain's tree under `top`, removed afterwards: not left to
    pytest, whose cleanup (shutil.rmtree) recurses and fails as deep."""
    try:
        make_chain(top, levels, name=name, leaf=leaf)
        yield top
    finally:
        remove_tree(top / name)
