"""Fixtures of the reader tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.apply.readers.readkit import small_tree


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "run-staging"
    path.mkdir()
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return small_tree(tmp_path / "tree")
