"""Which extended attributes an update may set, judged before anything is
written.

Metadata carries privilege as surely as a mode does: a file capability
(`security.capability`) is setuid by another name, `trusted.overlay.*`
steers overlayfs, IMA/EVM values pin what the kernel will agree to run.
So each name is judged by its namespace, and a value whose format the
kernel checks is checked here first (a bad one would otherwise fail at
write time, halfway through an apply).

| name                        | by default                      | let through by       |
| --------------------------- | ------------------------------- | -------------------- |
| `user.*`                    | allowed (not on symlinks)       |                      |
| `system.posix_acl_access`   | allowed if a valid POSIX ACL    |                      |
| `system.posix_acl_default`  | the same, on directories only   |                      |
| `security.selinux`          | allowed if it reads as a label  |                      |
| `security.capability`       | refused (valid v2/v3 data only) | `--allow-setuid`     |
| `security.ima`, `.evm`      | refused                         | `--allow-xattr NAME` |
| other `security.*`          | refused                         | `--allow-xattr NAME` |
| other `system.*`            | refused                         | `--allow-xattr NAME` |
| `trusted.*`                 | refused                         | `--allow-xattr NAME` |
| any other namespace         | refused (the kernel has none)   |                      |

Every name: at most 255 bytes, no NUL, something after its namespace;
every value at most 64 KiB (the kernel's limits).  `--allow-xattr P`
lets through P itself and the names below it (`trusted.overlay` lets
through `trusted.overlay.opaque`, not `trusted.other`); it never lets
through a malformed name or value.  SELinux labels are allowed because a
root for an SELinux system carries them on every file; a kernel that
enforces SELinux still judges each label itself when it is written."""

from __future__ import annotations

import struct

from dmoverlay.core.entries import Kind, xattr_name_problem

SIZE_MAX = 65536  # XATTR_SIZE_MAX
CAPABILITY = "security.capability"
ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
SELINUX = "security.selinux"

_PRIVILEGED_HINT = "pass --allow-xattr {name} if it is meant to be"
_WHY = {  # by name, else by the longest prefix first
    "security.ima": "an IMA measurement pins what the kernel will run",
    "security.evm": "an EVM value pins a file's security metadata",
    "trusted.overlay.": "overlayfs metadata (redirects, opaque directories)",
    "trusted.": "the privileged trusted namespace",
    "security.": "a security module's attribute dmoverlay does not know",
    "system.": "a system attribute dmoverlay does not know",
}

Verdict = tuple[str, str]  # the reason of a refusal, and its hint


def refusal(name: str, value: bytes, kind: Kind, *, allow_setuid: bool,
            allowed: tuple[str, ...]) -> Verdict | None:
    """Why the xattr `name` = `value` may not be set on a new entry of
    `kind`, or None when it may."""
    bad = xattr_name_problem(name) or _malformed_value(name, value, kind)
    if bad is not None:
        return f"xattr {name!r}: {bad}", "the update is malformed or hostile"
    if name.startswith("user.") and kind is Kind.SYMLINK:
        return (f"xattr {name} on a symlink: the kernel keeps user.* xattrs on files and "
                "directories only", "drop it from the update")
    if name.startswith("user.") or name in (ACL_ACCESS, ACL_DEFAULT, SELINUX):
        return None
    if name == CAPABILITY:
        if allow_setuid or _let_through(name, allowed):
            return None
        return (f"xattr {name}: file capabilities are privilege, as setuid is",
                "pass --allow-setuid if it is meant to be")
    if _let_through(name, allowed):
        return None
    why = _WHY.get(name) or next(w for prefix, w in _WHY.items()
                                 if prefix.endswith(".") and name.startswith(prefix))
    return f"xattr {name}: {why}", _PRIVILEGED_HINT.format(name=name)


def _let_through(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".")
               for p in (a.rstrip(".") for a in allowed))


def _malformed_value(name: str, value: bytes, kind: Kind) -> str | None:
    if len(value) > SIZE_MAX:
        return f"a value of {len(value)} bytes, more than the kernel's {SIZE_MAX}"
    if name == ACL_DEFAULT and kind is not Kind.DIR:
        return "a default ACL on something else than a directory"
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return acl_problem(value)
    if name == CAPABILITY:
        return capability_problem(value)
    if name == SELINUX:
        return selinux_problem(value)
    return None


# ------------------------------------------------------------------ formats

ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: no user, no group
# the order the kernel insists on (posix_acl_valid): what may follow what
_ACL_NEXT = {
    None: {ACL_USER_OBJ},
    ACL_USER_OBJ: {ACL_USER, ACL_GROUP_OBJ},
    ACL_USER: {ACL_USER, ACL_GROUP_OBJ},
    ACL_GROUP_OBJ: {ACL_GROUP, ACL_MASK, ACL_OTHER},
    ACL_GROUP: {ACL_GROUP, ACL_MASK},
    ACL_MASK: {ACL_OTHER},
    ACL_OTHER: set(),
}


def acl_problem(value: bytes) -> str | None:
    """What is wrong with a POSIX ACL in its xattr form (a version-2 header,
    then 8-byte entries: tag, permissions, id), or None.  As strict as the
    kernel, and stricter where it is lenient: named entries in ascending
    order of id, as setfacl writes them."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return "not a POSIX ACL (a 4-byte header and 8-byte entries)"
    if struct.unpack_from("<I", value)[0] != ACL_VERSION:
        return f"a POSIX ACL of another version than {ACL_VERSION}"
    last: int | None = None
    last_id = -1
    named = False
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag not in _ACL_NEXT[last]:
            return "a POSIX ACL with an unknown entry or entries out of order"
        if tag == ACL_OTHER and named and last != ACL_MASK:
            return "a POSIX ACL with named entries and no mask"
        if perm & ~7:
            return "a POSIX ACL entry with permissions beyond rwx"
        if tag in (ACL_USER, ACL_GROUP):
            if ident == _NO_ID or (tag == last and ident <= last_id):
                return "a POSIX ACL with a bad or repeated user or group id"
            named, last_id = True, ident
        last = tag
    if last != ACL_OTHER:
        return "a POSIX ACL without its owner, group and other entries"
    return None


_CAP_REVISION_MASK = 0xFF000000
_CAP_EFFECTIVE = 0x000001
_CAP_SIZES = {0x02000000: 20, 0x03000000: 24}  # revision 2, and 3 (with a root id)


def capability_problem(value: bytes) -> str | None:
    """What is wrong with a vfs_cap_data, or None: the kernel takes
    revisions 2 and 3, each of its own size."""
    if len(value) < 4:
        return "not file capabilities"
    magic = struct.unpack_from("<I", value)[0]
    size = _CAP_SIZES.get(magic & _CAP_REVISION_MASK)
    if size is None or size != len(value) or magic & ~_CAP_REVISION_MASK & ~_CAP_EFFECTIVE:
        return "not file capabilities of revision 2 or 3"
    if size == 24 and struct.unpack_from("<I", value, 20)[0] == _NO_ID:
        return "file capabilities for a root user that does not exist"
    return None


def selinux_problem(value: bytes) -> str | None:
    """A label is printable text (user:role:type...), NUL-terminated or not."""
    text = value.removesuffix(b"\0")
    if not text or b":" not in text or any(c < 0x21 or c > 0x7E for c in text):
        return "not an SELinux label"
    return None
