"""systemd itself, as PID 1 of a throw-away container, for the tests of our unit file.

systemd is not PID 1 on this machine (and the machine's init is not ours to replace), so
tests/net/test_systemd.py boots Debian's own systemd in a container with `systemd-nspawn
--boot` and runs parent/wgvsock-parent@.service there, as shipped, with `systemctl`:

- The container's root is a tmpfs with this machine's /usr bound read-only (`--volatile=yes`):
  /etc starts empty, so none of the machine's own services is enabled in it. It is given a
  machine id, so systemd does not take the boot for a first boot (which would enable every
  installed service by preset).
- Its network is a namespace the test made (`--network-namespace-path`): the interface, the
  nftables table and the sysctls the unit's parent makes are in that namespace, and the
  enclave in another namespace reaches it as in the other tests.
- wgvsock is "installed" as /usr/local/bin/wgvsock, where the unit expects it: a wrapper that
  runs Debian's python3 on this checkout and its venv's packages, bound read-only under
  /opt/wgvsock. (The venv's own interpreter may live under /root, which the unit's
  ProtectHome= hides, and a CI clone lives under /tmp, which its PrivateTmp= hides.)
- Commands run inside through `nsenter` into all of the container's namespaces.

Nothing of it outlives `close()`: stopping nspawn powers the container off (systemd stops the
unit, whose ExecStop runs `parent down`), and what is left is killed with its PID namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from wgvsock.ui.nslab import wait_for

REPO = Path(__file__).resolve().parents[2]
NSPAWN = "systemd-nspawn"
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LANG": "C.UTF-8"}

WRAPPER = """#!/usr/bin/python3 -I
# /usr/local/bin/wgvsock in the test container: this checkout on Debian's python3.
import sys
sys.path[:0] = ["/opt/wgvsock/src", "/opt/wgvsock/site-packages"]
from wgvsock.cli import main
sys.exit(main())
"""


def site_packages() -> Path:
    return Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" \
        / "site-packages"


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def ns_pid(pid: int) -> int:
    """`pid`'s number in its own (innermost) PID namespace; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """systemd booted in a container on the network namespace `netns`. `binds` are
    (host path, container path, writable) triples added to the ones described above."""

    def __init__(self, scratch: Path, netns: str, name: str,
                 binds: list[tuple[str, str, bool]] = ()) -> None:  # type: ignore[assignment]
        self.scratch = scratch
        self.netns = netns
        self.name = name
        self.binds = list(binds)
        self.log = scratch / "container-console.log"
        self.proc: subprocess.Popen | None = None
        self.leader = 0  # the container's PID 1, as this machine numbers it

    def start(self, timeout: float = 90) -> None:
        # The wrapper runs Debian's python3 on the venv's packages, whose compiled parts
        # (cryptography, ...) are built for the venv's Python: the two must be one version.
        system = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, check=True).stdout.strip()
        if system != str(sys.version_info[:2]):
            raise AssertionError(
                f"the container runs /usr/bin/python3 {system} on the venv's packages, built "
                f"for Python {sys.version_info[:2]}: make the venv with /usr/bin/python3 "
                "(`make clean venv`)")
        (self.scratch / "machine-id").write_text(uuid.uuid4().hex + "\n")
        bindir = self.scratch / "bin"
        bindir.mkdir()
        (bindir / "wgvsock").write_text(WRAPPER)
        (bindir / "wgvsock").chmod(0o755)
        cmd = [NSPAWN, "--quiet", "--boot", "--directory=/", "--volatile=yes",
               f"--network-namespace-path=/run/netns/{self.netns}",
               # No systemd on this machine to register with or to run a scope unit.
               "--register=no", "--keep-unit", f"--machine={self.name}", "--console=pipe",
               # nspawn keeps CAP_NET_ADMIN only for a network it made itself.
               "--capability=CAP_NET_ADMIN",
               f"--bind-ro={self.scratch / 'machine-id'}:/etc/machine-id",
               f"--bind-ro={bindir}:/usr/local/bin",
               f"--bind-ro={REPO}:/opt/wgvsock/src",
               f"--bind-ro={site_packages()}:/opt/wgvsock/site-packages"]
        for host, inside, writable in self.binds:
            cmd.append(f"--bind{'' if writable else '-ro'}={host}:{inside}")
        cmd += ["--", "systemd.firstboot=off", "systemd.log_color=0",
                "systemd.show_status=no"]
        # /proc/sys/net writable (the parent switches forwarding on in its namespace), the
        # rest of /proc/sys, which is this machine's, read-only: nspawn does this by itself
        # only for a network it made.
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)

        def leader() -> int:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                     f"{self.console()}")
            # The container's PID 1 and nothing else: commands nsentered into any other
            # process (nspawn's own) would run on this machine itself.
            return next((p for p in descendants(self.proc.pid)
                         if comm(p) == "systemd" and ns_pid(p) == 1), 0)

        self.leader = wait_for(leader, timeout, "the container's systemd")

        def booted() -> str:
            # Until systemd has its private socket, systemctl cannot reach it at all; and
            # until it has made /run/systemd/system (sd_booted()), systemctl says "offline"
            # without asking it. A loaded machine widens that window after PID 1 exists.
            state = self.run("systemctl", "is-system-running", "--wait",
                             timeout=timeout).stdout.strip()
            return "" if state == "offline" else state

        state = wait_for(booted, timeout, "the container's boot")
        # "degraded": some unit of the machine's own failed in the container; not ours.
        assert state in ("running", "degraded"), f"container boot: {state}\n{self.console()}"

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(self, *cmd: str, check: bool = False, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(["nsenter", f"--target={self.leader}", "--all", *cmd],
                             capture_output=True, text=True, env=_ENV, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in the container: exit {res.returncode}\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = False,
                  timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props),
                             check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def host_pid(self, pid: int) -> int:
        """This machine's number for the container's process `pid`."""
        ns = os.readlink(f"/proc/{self.leader}/ns/pid")
        for p in [self.leader, *descendants(self.leader)]:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{p}/ns/pid") == ns and ns_pid(p) == pid:
                    return p
        raise LookupError(f"no process {pid} in the container")

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn powers the container off
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                # The PID namespace ends with its init, and everything in it with it.
                with contextlib.suppress(ProcessLookupError):
                    if self.leader:
                        os.kill(self.leader, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(30)
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/systemd/nspawn/propagate/{self.name}")
        self.proc = None


# -- a stuck thread, made with ptrace ----------------------------------------------------------

_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000


class StuckThread:
    """Stops one thread of a running process and nothing else, as a deadlock or a wedged
    system call would: PTRACE_SEIZE and PTRACE_INTERRUPT on that thread. The rest of the
    process runs on. When the process ends (killed by a signal), the thread has to be reaped
    by its tracer before the process can be, so `reap()` does that."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p]
        for request in (_PTRACE_SEIZE, _PTRACE_INTERRUPT):
            if self._libc.ptrace(request, tid, None, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
        self.done = False

    def reap(self, timeout: float) -> None:
        """Waits until the thread has ended (its process was killed), reaping it."""
        deadline = time.monotonic() + timeout
        while not self.done and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.tid, _WALL | os.WNOHANG)
            except ChildProcessError:
                self.done = True
                break
            if pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                self.done = True
                break
            time.sleep(0.05)

    def release(self) -> None:
        """Lets the thread go, if its process is still there (a test that failed early)."""
        if not self.done:
            with contextlib.suppress(OSError):
                os.kill(self.tid, signal.SIGCONT)
            self._libc.ptrace(0x11, self.tid, None, None)  # PTRACE_DETACH (it must be stopped)
