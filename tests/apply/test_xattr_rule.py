"""One rule on xattr names (core.entries.xattr_name_problem), judged alike
by the tar reader and by apply's policy: a name one lets through, the other
does too, and the reason is the same words."""

from __future__ import annotations

import pytest

from dmoverlay.apply import xattrpolicy
from dmoverlay.core.entries import Kind, xattr_name_problem
from dmoverlay.core.errors import SourceError
from dmoverlay.core.tarread import check_xattr_name

NAMES = {
    "user.fine": None,
    "security.selinux": None,
    "trusted.overlay.opaque": None,
    "system.posix_acl_access": None,
    "user.a\0b": "NUL",
    "user." + "n" * 250: None,  # 255 bytes: the most
    "user." + "n" * 251: "longer than 255",
    "user." + "é" * 126: "longer than 255",  # 257 bytes in 131 characters
    "user.": "no namespace",
    "trusted.": "no namespace",
    "plain": "no namespace",
    "os2.name": "no namespace",
    "": "no namespace",
}


@pytest.mark.parametrize("name", sorted(NAMES), ids=repr)
def test_one_rule_for_xattr_names(name: str) -> None:
    problem = xattr_name_problem(name)
    words = NAMES[name]
    assert (problem is None) == (words is None)
    if problem is None:
        check_xattr_name("f", name)  # the reader lets it through
        return
    assert words is not None and words in problem
    with pytest.raises(SourceError) as caught:
        check_xattr_name("f", name)
    assert problem in caught.value.message
    verdict = xattrpolicy.refusal(name, b"", Kind.FILE, allow_setuid=True, allowed=(name,))
    assert verdict is not None and problem in verdict[0]  # --allow-xattr never lets it through


def test_the_reader_keeps_of_system_only_acls() -> None:
    """Beyond the kernel's rule: ext4 and tmpfs keep no other system.* name.
    The policy refuses one too, unless let through by name."""
    assert xattr_name_problem("system.nfs4_acl") is None
    with pytest.raises(SourceError, match="only POSIX ACLs"):
        check_xattr_name("f", "system.nfs4_acl")
    assert xattrpolicy.refusal("system.nfs4_acl", b"", Kind.FILE, allow_setuid=False,
                               allowed=()) is not None
