"""A file's POSIX access ACL as the kernel keeps it, for the checks that must judge a file as
the kernel will: the early check that enclave.user may run CMD (roles/cmd.py) and the check
that no one but its owner may write the daemon's log (daemon.py)."""

from __future__ import annotations

import errno
import os
import struct

# The extended attribute and its tags (include/uapi/linux/posix_acl.h).
ACL_XATTR = "system.posix_acl_access"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_READ, ACL_WRITE, ACL_EXECUTE = 4, 2, 1

AclEntry = tuple[int, int, int]  # tag, perm (ACL_READ | ACL_WRITE | ACL_EXECUTE), id


def read_acl(target: str | int) -> list[AclEntry]:
    """The access ACL of TARGET (a path, not followed past its last link, or an open
    descriptor), its entries in the order the kernel keeps them; [] when it has none (its
    mode bits are all there is). OSError when it cannot be read, or is in a form other than
    include/uapi/linux/posix_acl_xattr.h gives (version 2, then 8-byte entries,
    little-endian)."""
    try:
        blob = os.getxattr(target, ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return []
        raise
    if len(blob) < 4 or (len(blob) - 4) % 8 or struct.unpack_from("<I", blob) != (2,):
        raise OSError(errno.EINVAL, f"an access ACL in an unknown form ({len(blob)} bytes)")
    return list(struct.iter_unpack("<HHI", blob[4:]))
