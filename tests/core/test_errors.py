"""The one table of install hints."""

from __future__ import annotations

from dmoverlay.core.errors import PACKAGES, install_hint, packages_hint


def test_a_tool_is_named_by_its_package_on_each_distribution() -> None:
    hint = install_hint(["dmsetup", "losetup"])
    assert "apt-get install dmsetup mount (Debian)" in hint
    assert "dnf install device-mapper util-linux (Fedora)" in hint
    assert hint.endswith("or run scripts/provision")


def test_a_python_module_says_how_a_virtualenv_sees_it() -> None:
    hint = install_hint(["python:parted"])
    assert "apt-get install python3-parted (Debian)" in hint
    assert "dnf install python3-pyparted (Fedora)" in hint
    assert "--system-site-packages" in hint
    assert "--system-site-packages" not in install_hint(["mksquashfs"])


def test_an_unknown_need_is_its_own_package() -> None:
    assert "apt-get install pigz (Debian), dnf install pigz (Fedora)" in install_hint(["pigz"])


def test_packages_are_listed_once_and_sorted() -> None:
    assert "apt-get install e2fsprogs (Debian)" in install_hint(["debugfs", "mkfs.ext4"])
    assert "apt-get install a b (Debian)" in packages_hint(["b", "a", "b"], ["x"])


def test_every_entry_names_both_distributions() -> None:
    for need, (debian, fedora) in PACKAGES.items():
        assert debian.strip() and fedora.strip(), need
