"""A throw-away QEMU guest for the tests that need real vsock or the kernel's WireGuard.

This machine must never connect an AF_VSOCK socket itself (there is no loopback transport; a
connect would reach the hypervisor host). Debian's kernel booted under QEMU has
``vsock_loopback``: inside that guest CID 1 loops back, across network namespaces too, and the
guest has no network device, so nothing it does can leave it.

The guest boots Debian's own kernel (uncompressed: decompressing the bzImage under TCG costs
seconds) with a tiny busybox initramfs that mounts the host's root read-only over 9p, lays a
tmpfs overlay on it and switch_roots into it, so the guest runs this very checkout and venv.
A second, read-write 9p share (``/wgvsock-guest`` inside) carries the command in and the
output, exit code and results out. See tests/guest/README.md.

Used by tests/guest/conftest.py, and by hand::

    python -m tests.guest.rig -- ip -br link      # runs a command in a fresh guest
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / "build" / "guest"
GUEST_MARK = "wgvsock.guest=1"
# Inside the guest the results share is mounted here (stage2 reads its command from it).
GUEST_SHARE = "/wgvsock-guest"

# What the initramfs loads to reach the host's root; their order is the dependency order.
INITRAMFS_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
)
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "cat", "echo", "switch_root",
                   "poweroff", "sleep")
APT_HINT = "apt-get install qemu-system-x86 linux-image-amd64 busybox-static (make test does)"
_XZ_MAGIC = b"\xfd7zXZ\x00"


class GuestError(RuntimeError):
    """The guest could not be prepared or booted."""


def in_guest() -> bool:
    """True only inside the throw-away guest this rig boots: the one place where connecting
    AF_VSOCK is allowed (CID 1 is loopback there, and the guest has no network device)."""
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return False
    return GUEST_MARK in cmdline.split() and Path("/sys/module/vsock_loopback").exists()


def require_guest() -> None:
    """Raise unless in the guest: guards every test that connects AF_VSOCK."""
    if not in_guest():
        raise RuntimeError("refusing to connect AF_VSOCK outside the wgvsock test guest "
                           "(it would leave this machine); run it through tests/guest")


# -- preparing the kernel and the initramfs ----------------------------------------------------


def _kernel_release() -> str:
    """The newest installed Debian kernel that has its modules."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / release / "modules.dep").exists():
            found.append(release)
    if not found:
        raise GuestError(f"no kernel with modules in /boot and /lib/modules: {APT_HINT}")

    def key(release: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", release)]

    return max(found, key=key)


def _uncompressed_kernel(release: str) -> Path:
    """vmlinux (ELF, booted through its PVH entry) from the xz-compressed bzImage."""
    out = CACHE / f"vmlinux-{release}"
    if out.exists():
        return out
    data = Path(f"/boot/vmlinuz-{release}").read_bytes()
    start = data.find(_XZ_MAGIC)
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(elf)
            tmp.rename(out)
            return out
        start = data.find(_XZ_MAGIC, start + 1)
    raise GuestError(f"/boot/vmlinuz-{release} holds no xz-compressed ELF kernel")


def _initramfs(release: str) -> Path:
    init = HERE / "initramfs-init"
    # Named by what goes into it, so a changed /init or module list builds a new one.
    ident = hashlib.sha256(init.read_bytes() + repr(INITRAMFS_MODULES).encode()).hexdigest()
    out = CACHE / f"initramfs-{release}-{ident[:12]}.cpio"
    if out.exists():
        return out
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise GuestError(f"busybox is missing: {APT_HINT}")
    moddir = Path("/lib/modules") / release
    dep = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, _ = line.partition(":")
        dep[Path(path).name.split(".ko")[0].replace("-", "_")] = moddir / path
    with tempfile.TemporaryDirectory(prefix="wgvsock-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "modules", "proc", "sys", "dev"):
            (root / d).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        order = []
        for name in INITRAMFS_MODULES:
            src = dep.get(name)
            if src is None:
                continue  # built into this kernel
            if src.suffix != ".ko":
                raise GuestError(f"{src}: compressed modules are not supported by the rig")
            shutil.copy2(src, root / "modules" / f"{name}.ko")
            order.append(name)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        shutil.copy2(init, root / "init")
        (root / "init").chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        tmp_out = out.with_suffix(".tmp")
        with open(tmp_out, "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, check=True,
                           input="\n".join(files).encode(), stdout=f)
        tmp_out.rename(out)
    return out


def prepare() -> tuple[Path, Path]:
    """(kernel, initramfs), built once and cached under build/guest."""
    missing = [tool for tool in ("qemu-system-x86_64", "cpio") if not shutil.which(tool)]
    if missing:
        raise GuestError(f"missing {', '.join(missing)}: {APT_HINT}")
    CACHE.mkdir(parents=True, exist_ok=True)
    release = _kernel_release()
    return _uncompressed_kernel(release), _initramfs(release)


# -- booting -----------------------------------------------------------------------------------


@dataclass
class GuestRun:
    returncode: int | None  # None: the command never finished (timeout, or the guest died)
    output: str  # what the command printed
    console: str  # the guest's console: boot messages and anything the kernel said
    share: Path  # the read-write share, for result files the command wrote
    boot_seconds: float  # from QEMU's start to the command's start
    seconds: float  # the whole run

    def explain(self, lines: int = 80) -> str:
        tail = "\n".join(self.console.splitlines()[-lines:])
        return (f"guest command exit code: {self.returncode}\n"
                f"--- command output ---\n{self.output}\n--- guest console (tail) ---\n{tail}")


class Guest:
    """A booting or running guest (`start`); `finish` waits for it and collects the run."""

    def __init__(self, proc: subprocess.Popen[bytes], share: Path, console_path: Path,
                 begun: float, wall: float) -> None:
        self.proc = proc
        self.share = share
        self.console_path = console_path
        self.begun = begun
        self.wall = wall

    def kill(self) -> None:
        """Powers the guest off at once (it is throw-away: nothing in it needs a clean stop)."""
        if self.proc.poll() is None:
            self.proc.kill()

    def finish(self, timeout: float) -> GuestRun:
        """Waits for the command to end and the guest to power off, at most TIMEOUT seconds from
        its start (then kills it)."""
        try:
            qemu_out, _ = self.proc.communicate(
                timeout=max(0.0, self.begun + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            qemu_out, _ = self.proc.communicate()
        seconds = time.monotonic() - self.begun
        share = self.share
        console = (self.console_path.read_text(errors="replace")
                   if self.console_path.exists() else "")
        if qemu_out:
            console += "\n--- qemu ---\n" + qemu_out.decode(errors="replace")
        output = ""
        if (share / "output.log").exists():
            output = (share / "output.log").read_text(errors="replace")
        rc_text = (share / "rc").read_text().strip() if (share / "rc").exists() else ""
        started = share / "started"
        # stage2 touches it through 9p, so its mtime is this machine's clock.
        boot = started.stat().st_mtime - self.wall if started.exists() else seconds
        return GuestRun(int(rc_text) if rc_text else None, output, console, share, boot,
                        seconds)


def start(command: str, *, share: Path | None = None, cwd: Path = REPO,
          memory_mib: int = 1024, nice: int = 0) -> Guest:
    """Boots a fresh guest that runs `command` (a sh script) as root in `cwd` and powers off.
    NICE > 0 lowers QEMU's priority, so that it runs on what this machine leaves idle."""
    kernel, initrd = prepare()
    share = share or Path(tempfile.mkdtemp(prefix="wgvsock-guest-"))
    share.chmod(0o700)
    (share / "command").write_text(
            f"{command}\n")
    (share / "cwd").write_text(str(cwd))
    shutil.copy2(HERE / "stage2", share / "stage2")
    (share / "stage2").chmod(0o755)
    for stale in ("rc", "output.log", "started"):
        with contextlib.suppress(FileNotFoundError):
            (share / stale).unlink()
    console_path = share / "console.log"
    append = " ".join((
        "console=ttyS0", "panic=-1", "tsc=reliable", "quiet", "loglevel=4", GUEST_MARK,
        # The guest's own firmware and hardware probing is irrelevant: keep the boot short.
        "mitigations=off", "nokaslr", "no_timer_check", "8250.nr_uarts=1",
    ))
    # QEMU dies with the thread that started it (pytest killed outright, say): a guest left
    # behind would eat both cores. Its nice value is set by nice(1), not setpriority() on its
    # pid: Linux keeps one per thread, and the vCPU threads inherit it only from a thread that
    # had it when they were made.
    cmd = [
        "setpriv", "--pdeathsig", "KILL", "nice", "-n", str(nice),
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
        "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-nic", "none", "-serial", f"file:{console_path}", "-monitor", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=results,security_model=none,multidevs=remap",
    ]
    begun, wall = time.monotonic(), time.time()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return Guest(proc, share, console_path, begun, wall)


def run(command: str, *, timeout: float = 600, share: Path | None = None,
        cwd: Path = REPO, memory_mib: int = 1024) -> GuestRun:
    """Boots a fresh guest, runs `command` (a sh script) as root in `cwd`, powers it off."""
    return start(command, share=share, cwd=cwd, memory_mib=memory_mib).finish(timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guest.rig",
                                     description="run a command in a throw-away QEMU guest")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("command", nargs="+", help="the command (after --)")
    args = parser.parse_args(argv)
    share = Path(tempfile.mkdtemp(prefix="wgvsock-guest-"))
    try:
        result = run(shlex.join(args.command), timeout=args.timeout, share=share)
    except GuestError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(share, ignore_errors=True)
    sys.stdout.write(result.output)
    print(f"[guest: exit {result.returncode}, boot {result.boot_seconds:.1f} s, "
          f"total {result.seconds:.1f} s]", file=sys.stderr)
    if result.returncode is None:
        print(result.explain(), file=sys.stderr)
        return 1
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
