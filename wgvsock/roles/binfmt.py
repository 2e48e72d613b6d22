"""What Linux's execve makes of an executable file's content, read as the kernel reads it:
a `#!` script (fs/binfmt_script.c), an ELF program (fs/binfmt_elf.c), or something a
binfmt_misc entry takes. For the early check of `enclave up`'s CMD (roles/enclave.py), which
judges the file's path and permissions itself: this says only what the content makes of it.

Each function answers for what it can judge; anything else (a header it cannot make sense
of, a 32-bit program a 64-bit kernel may or may not run, a format binfmt_misc may take) is
None and left to the exec, which has the last word.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
from dataclasses import dataclass

from ..mountinfo import mounts

# The kernel reads this much of the file first (include/uapi/linux/binfmts.h), zero-padded
# when the file is shorter: the #! line, the ELF header and binfmt_misc's magic are in it.
BINPRM_BUF_SIZE = 256
# Scripts whose interpreter is a script, and so on: the kernel gives up with ELOOP when the
# file to load is the seventh (fs/exec.c, exec_binprm: depth > 5).
MAX_DEPTH = 5
PATH_MAX = 4096

ET_EXEC, ET_DYN = 2, 3
PT_INTERP = 3
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
EM_386, EM_486, EM_ARM, EM_X86_64, EM_AARCH64 = 3, 6, 40, 62, 183

# e_machine as `uname -m` and Docker's --platform say them.
_MACHINES = {
    EM_386: ("i386", "linux/386"), 8: ("mips", "linux/mips"), 20: ("ppc", "linux/ppc"),
    21: ("ppc64", "linux/ppc64le"), 22: ("s390x", "linux/s390x"), EM_ARM: ("arm", "linux/arm"),
    EM_X86_64: ("x86_64", "linux/amd64"), EM_AARCH64: ("aarch64", "linux/arm64"),
    243: ("riscv", "linux/riscv64"), 258: ("loongarch", "linux/loong64"),
}
# What the kernel of a machine may run besides its own programs, if it was built to (and,
# for i386, not booted with ia32_emulation=0): whether it will, only the exec can tell.
_COMPAT = {EM_X86_64: {EM_386, EM_486, EM_X86_64}, EM_AARCH64: {EM_ARM, EM_AARCH64}}


@dataclass(frozen=True)
class Script:
    """A `#!` line as binfmt_script parses it: the interpreter, the one optional argument."""
    interpreter: bytes
    argument: bytes | None


@dataclass(frozen=True)
class Refused:
    """What the exec would fail with: the errno, and what to say of FILE (the file read)."""
    errno: int
    why: str


def head(path: str) -> bytes | None:
    """The first BINPRM_BUF_SIZE bytes of PATH, zero-padded as the kernel has them; None
    when they cannot be read (the exec needs no read permission, the check does)."""
    try:
        with open(path, "rb") as f:
            data = f.read(BINPRM_BUF_SIZE)
    except OSError:
        return None
    return data.ljust(BINPRM_BUF_SIZE, b"\0")


def _spacetab(c: int) -> bool:
    return c in (0x20, 0x09)


def script(buf: bytes) -> Script | Refused | None:
    """BUF's `#!` line as binfmt_script's load_script parses it; None when BUF is no
    script; Refused(ENOEXEC) when it names no interpreter, or one cut short by the end of
    the buffer. The line ends at the first newline within BINPRM_BUF_SIZE; blanks and tabs
    before the interpreter are skipped, and it ends at a blank, a tab or a NUL (a carriage
    return is part of its name); what follows, blanks trimmed from its end, is one argument."""
    if buf[:2] != b"#!":
        return None
    end = buf.find(b"\n", 0, BINPRM_BUF_SIZE)
    if end < 0:
        start = next((i for i in range(2, BINPRM_BUF_SIZE) if not _spacetab(buf[i])), None)
        if start is None:
            return Refused(errno.ENOEXEC, "its #! line is blanks only")
        if not any(_spacetab(c) or c == 0 for c in buf[start:BINPRM_BUF_SIZE]):
            return Refused(errno.ENOEXEC, f"its #! line is longer than {BINPRM_BUF_SIZE} "
                                          "bytes with no end to the interpreter's name in them")
        end = BINPRM_BUF_SIZE - 1  # the kernel puts its NUL on the last byte
    while _spacetab(buf[end - 1]):
        end -= 1
    name = next((i for i in range(2, end + 1) if not _spacetab(buf[i])), None)
    if name is None or name == end:
        return Refused(errno.ENOEXEC, "its #! line names no interpreter")
    sep = next((i for i in range(name, end + 1) if _spacetab(buf[i]) or buf[i] == 0), None)
    argument = None
    if sep is not None and sep < end and buf[sep] != 0:
        arg = next((i for i in range(sep, end + 1) if not _spacetab(buf[i])), None)
        if arg is not None:
            argument = buf[arg:end].split(b"\0", 1)[0]
    stop = sep if sep is not None else end
    return Script(buf[name:stop].split(b"\0", 1)[0], argument)


@dataclass(frozen=True)
class Elf:
    """An ELF file's header as the kernel reads it: e_type and e_machine in this machine's
    byte order (a program of the other order has a machine no kernel here knows), and as the
    file says them, for naming the machine it is for."""
    klass: int
    data: int
    e_type: int
    e_machine: int
    machine: int

    @property
    def describe(self) -> str:
        name = _MACHINES.get(self.machine, (f"e_machine {self.machine}",))[0]
        bits = {ELFCLASS32: "32-bit", ELFCLASS64: "64-bit"}.get(self.klass, "?-bit")
        order = {ELFDATA2LSB: "little-endian", ELFDATA2MSB: "big-endian"}.get(self.data, "")
        return f"{name} ({bits}{' ' + order if order else ''})"


def elf(buf: bytes) -> Elf | None:
    """BUF's ELF header, None when BUF is not ELF."""
    if buf[:4] != b"\x7fELF":
        return None
    klass, data = buf[4], buf[5]
    e_type, e_machine = struct.unpack_from("=HH", buf, 16)
    order = "<" if data == ELFDATA2LSB else ">"
    return Elf(klass, data, e_type, e_machine, struct.unpack_from(order + "H", buf, 18)[0])


def _self() -> Elf | None:
    return elf(head("/proc/self/exe") or head(sys.executable) or b"")


def native() -> tuple[Elf, str] | None:
    """The ELF header this machine's kernel runs, taken from the program running this one
    (which runs), and the machine's name (uname -m); None when they disagree (this program
    is emulated, through binfmt_misc and qemu or Rosetta: the kernel runs more than its own
    programs then, which only the exec can tell) or cannot be read."""
    own = _self()
    machine = os.uname().machine
    if own is None:
        return None
    named = next((em for em, (n, _) in _MACHINES.items() if n == machine), None)
    if named is not None and named != own.machine:
        return None
    return own, machine


def foreign(header: Elf) -> Refused | None:
    """Refused(ENOEXEC) when no ELF loader of this kernel takes HEADER: a program for another
    machine (binfmt_elf's elf_check_arch), or an ELF file that is no program; else None
    (this machine's, or one only the exec can judge). binfmt_misc is asked apart
    (misc_takes)."""
    ours = native()
    if ours is None:
        return None
    own, machine = ours
    if header.e_machine == own.e_machine:
        if header.e_type in (ET_EXEC, ET_DYN):
            return None
        kinds = {0: "of no type", 1: "a relocatable object (.o)", 4: "a core dump"}
        kind = kinds.get(header.e_type, f"of type {header.e_type}")
        return Refused(errno.ENOEXEC, f"is an ELF file {kind}, not a program: Exec format "
                                      "error; give the program it was linked into")
    if header.e_machine in _COMPAT.get(own.e_machine, ()):
        return None
    platform = _MACHINES.get(own.e_machine, ("", machine))[1]
    if header.machine == own.e_machine:  # this machine's, in the other byte order
        order = {ELFDATA2LSB: "little-endian", ELFDATA2MSB: "big-endian"}.get(own.data, "")
        return Refused(errno.ENOEXEC, f"is a program for {header.describe}, and this machine "
                                      f"runs {order} {machine} programs only: Exec format "
                                      f"error; build it {order} (docker build --platform "
                                      f"{platform})")
    theirs = _MACHINES.get(header.machine, (None, None))[0]
    instance = f"an {theirs} instance" if theirs else "a machine of its kind"
    return Refused(errno.ENOEXEC, f"is a program for {header.describe}, and this machine is "
                                  f"{machine}: Exec format error; build the image for "
                                  f"{machine} (docker build --platform {platform}), or run "
                                  f"it on {instance}")


def interpreter(path: str, header: Elf) -> bytes | None:
    """The program interpreter (PT_INTERP: the dynamic loader, /lib64/ld-linux-x86-64.so.2)
    the kernel opens for PATH, a program for this machine whose header is HEADER: the
    first such entry's, as load_elf_binary reads it. None when it has none (statically
    linked) or its headers are not what the kernel takes (then it says ENOEXEC itself)."""
    ours = native()
    if ours is None or (header.klass, header.data, header.e_machine) != (
            ours[0].klass, ours[0].data, ours[0].e_machine):
        return None
    wide = header.klass == ELFCLASS64
    order = "<" if header.data == ELFDATA2LSB else ">"
    try:
        with open(path, "rb") as f:
            ehdr = f.read(64 if wide else 52)
            phoff, = struct.unpack_from(order + ("Q" if wide else "I"), ehdr, 32 if wide else 28)
            phentsize, phnum = struct.unpack_from(order + "HH", ehdr, 54 if wide else 42)
            size = 56 if wide else 32
            # load_elf_phdrs's limits
            if phentsize != size or not 0 < size * phnum <= min(65536, os.sysconf("SC_PAGE_SIZE")):
                return None
            f.seek(phoff)
            table = f.read(size * phnum)
            if len(table) != size * phnum:
                return None
            for i in range(phnum):
                if wide:
                    p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
                        order + "IIQQQQ", table, i * size)
                else:
                    p_type, p_offset, _, _, p_filesz = struct.unpack_from(
                        order + "IIIII", table, i * size)
                if p_type != PT_INTERP:
                    continue
                if not 2 <= p_filesz <= PATH_MAX:
                    return None
                f.seek(p_offset)
                name = f.read(p_filesz)
                if len(name) != p_filesz or name[-1] != 0:
                    return None
                return name.split(b"\0", 1)[0]
    except (OSError, struct.error, ValueError):
        return None
    return None


def _misc_dir() -> str | None:
    """Where binfmt_misc is mounted, if anywhere here."""
    if os.path.exists("/proc/sys/fs/binfmt_misc/status"):
        return "/proc/sys/fs/binfmt_misc"
    try:
        return next((m.point for m in mounts() if m.fstype == "binfmt_misc"), None)
    except OSError:
        return None


# The Nitro Secure Module's device: there only in an enclave.
NSM_DEVICE = "/dev/nsm"


def _misc_unseen() -> bool:
    """Whether binfmt_misc entries this process cannot see may take what it execs: the kernel
    has binfmt_misc, none is mounted where this process sees it, and this is no enclave. A
    container sees none of its host's mounts, yet the host's entries (qemu-user-static's,
    Docker Desktop's qemu or Rosetta) run its programs. Entries are registered only through
    a mount of binfmt_misc, and in an enclave no one makes one: its kernel is its own and
    its init mounts none. A kernel without binfmt_misc has none either."""
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["binfmt_misc"] for line in f):
                return False
    except OSError:
        return True
    try:
        return not stat.S_ISCHR(os.stat(NSM_DEVICE).st_mode)
    except OSError:
        return True


def misc_takes(path: str, buf: bytes) -> bool | None:
    """Whether a binfmt_misc entry may take PATH, whose first bytes are BUF: an enabled
    entry whose magic (under its mask, at its offset) or extension matches, as
    binfmt_misc's check_file matches; or entries that cannot be read. None when entries
    may apply that cannot be seen from here (_misc_unseen): only the exec can tell whether
    one takes PATH. Not mounted here and none unseen (an enclave, a kernel without
    binfmt_misc), no entry takes it."""
    where = _misc_dir()
    if where is None:
        return None if _misc_unseen() else False
    try:
        with open(os.path.join(where, "status")) as f:
            if f.read().strip() == "disabled":
                return False
        names = [n for n in os.listdir(where) if n not in ("status", "register")]
    except OSError:
        return True
    # The extension is what follows the last dot of the whole name the exec was given.
    name = os.fsencode(path)
    for n in names:
        try:
            with open(os.path.join(where, n)) as f:
                fields = dict(line.rstrip("\n").partition(" ")[::2] for line in f)
        except OSError:
            return True
        if "enabled" not in fields:
            continue
        if "extension" in fields:
            dot = name.rfind(b".")
            if dot >= 0 and name[dot + 1:] == fields["extension"].lstrip(".").encode():
                return True
            continue
        try:
            offset = int(fields.get("offset", "0"))
            magic = bytes.fromhex(fields["magic"])
            mask = bytes.fromhex(fields["mask"]) if "mask" in fields else b"\xff" * len(magic)
        except (KeyError, ValueError):
            return True
        window = buf[offset:offset + len(magic)]
        if len(window) == len(magic) and all(
                (a ^ b) & m == 0 for a, b, m in zip(window, magic, mask, strict=False)):
            return True
    return False
