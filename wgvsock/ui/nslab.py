"""A tiny network-namespace lab for the demo and the benchmarks (the tests have their own).

Everything made through a :class:`Lab` — namespaces, veth cables, daemons, helper processes,
a private temporary directory — is torn down by :meth:`Lab.close`, which is safe to call more
than once and keeps going past individual failures so that nothing is left behind.

All traffic stays inside namespaces the lab created; nothing here touches AF_VSOCK (the Unix
transport stands in for it, see DESIGN.md §5).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from ..core.crypto import generate_private_key, key_to_base64, public_key
from ..device.uapi import DeviceConfig, PeerConfig, format_set, uapi_get, uapi_set

__all__ = [
    "RUN_DIR",
    "Keys",
    "Lab",
    "LabError",
    "Namespace",
    "daemon_command",
    "interrupts_raise",
    "missing_tools",
    "preflight",
    "rss_kib",
    "run",
    "run_in_lab",
    "seed_binary",
    "wait_for",
]

RUN_DIR = "/var/run/wireguard"


class LabError(RuntimeError):
    pass


def run(
    *cmd: str, check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()
        raise LabError(f"`{' '.join(cmd)}` failed ({res.returncode}): {detail}")
    return res


class LabTimeout(LabError, TimeoutError):
    pass


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition", *,
    max_delay: float = 0.2,
) -> Any:
    """Polls `predicate` until it returns something truthy and returns that value. The delay
    between polls doubles from 10 ms up to `max_delay`."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


def missing_tools(tools: Sequence[str]) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def preflight(needs: str, tools: Sequence[str]) -> str | None:
    """Why a lab program cannot run here, or None: it must be root (`needs` says what for, and
    how to get it) and have `tools` on PATH."""
    if os.geteuid() != 0:
        return f"needs root ({needs})"
    if missing := missing_tools(tools):
        return f"missing tools: {', '.join(missing)} (`make apt` installs them)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing: this kernel or container has no TUN support"
    return None


SEED_ENV = "WGVSOCK_SEED_BIN"
_SEED_NAME = "wireguard-go-vsock"


def seed_binary(dest: Path) -> tuple[Path | None, str]:
    """The Go seed (wireguard-go-vsock), for interop tests and the benchmark: $WGVSOCK_SEED_BIN,
    else ../shared/seed/bin beside the repository, as a binary or gzipped (then unpacked into
    `dest`). (path, "") or (None, why not). Run it only with `-n tcp`: its vsock mode would
    dial out of this VM."""
    given = os.environ.get(SEED_ENV)
    if given:
        candidates = [Path(given)]
    else:
        # wgvsock/ui/nslab.py -> the folder that holds the repository, where shared/ lies.
        here = Path(__file__).resolve().parents[3] / "shared" / "seed" / "bin"
        candidates = [here / _SEED_NAME, here / f"{_SEED_NAME}.gz"]
    for path in candidates:
        if not path.is_file():
            continue
        if path.suffix != ".gz":
            return path, ""
        out = dest / _SEED_NAME
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out.chmod(0o755)
        return out, ""
    where = given if given else str(candidates[-1].parent)
    return None, f"the Go seed binary is not in {where} (set ${SEED_ENV} to its path)"


def daemon_command() -> list[str]:
    """How to start our daemon: the installed script beside this interpreter (what users run),
    else the module, so that a checkout without the console script still works."""
    script = Path(sys.executable).parent / "wireguard-go-vsock"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "wgvsock.daemon"]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the stack like Ctrl-C does, so `finally` clean-up runs for
    them too (by default they kill the interpreter on the spot)."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    # A second Ctrl-C during clean-up would otherwise abandon namespaces half-removed.
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Keys:
    def __init__(self) -> None:
        self.private = generate_private_key()
        self.public = public_key(self.private)
        self.public_b64 = key_to_base64(self.public)


class Namespace:
    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def run(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.name, *cmd, **kw)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)
        self.lab.procs.append(p)
        return p

    def ip(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return run("ip", "-n", self.name, *args, **kw)

    def pids(self) -> list[int]:
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def find_pid(self, *needles: str) -> int | None:
        """The process in this namespace whose argv contains every one of `needles`."""
        for pid in self.pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [a.decode(errors="replace") for a in argv]
            if all(any(n == w or w.endswith("/" + n) for w in words) for n in needles):
                return pid
        return None

    def ping(
        self, addr: str, count: int, interval: float = 0.2, timeout: float = 3
    ) -> subprocess.CompletedProcess:
        return self.run("ping", "-q", "-n", "-c", str(count), "-i", f"{interval:g}",
                        "-W", f"{timeout:g}", addr, check=False,
                        timeout=count * interval + timeout + 10)


class Lab:
    def __init__(self, tmp_prefix: str = "wgvsock-lab-") -> None:
        self.namespaces: list[Namespace] = []
        self.procs: list[subprocess.Popen] = []
        self.ifnames: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix))
        os.chmod(self.tmp, 0o700)
        self.unix_dir = self.tmp / "unix"
        self.unix_dir.mkdir(mode=0o700)
        # /etc/netns/NAME files (see netns_file) and the directories the lab made for them.
        self.etc_files: list[Path] = []
        self.etc_dirs: list[Path] = []
        self._on_close: list[Callable[[], object]] = []
        self._closed = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ------------------------------------------------------------------------

    def netns(self, name: str, lo_up: bool = True) -> Namespace:
        """A new namespace; `lo_up=False` leaves loopback down, as a Nitro Enclave boots."""
        run("ip", "netns", "add", name)
        ns = Namespace(self, name)
        # Registered before anything else can fail, so close() deletes it.
        self.namespaces.append(ns)
        if lo_up:
            ns.ip("link", "set", "lo", "up")
        return ns

    def netns_file(self, ns: Namespace, name: str, text: str) -> Path:
        """Writes /etc/netns/NS/NAME, which `ip netns exec` bind-mounts over /etc/NAME for the
        processes it starts from then on (how a namespace gets a private resolv.conf without
        touching the machine's own). close() removes it, and the directory if it made it."""
        d = Path("/etc/netns") / ns.name
        if not d.exists():
            d.mkdir(parents=True, mode=0o755)
            self.etc_dirs.append(d)
        path = d / name
        self.etc_files.append(path)
        path.write_text(text)
        return path

    def on_close(self, fn: Callable[[], object]) -> None:
        """Runs `fn` at the start of close() (last registered first), before processes are
        killed and namespaces deleted: for graceful stops such as `wgvsock parent down`.
        Exceptions from it are ignored, so that the rest of the clean-up still runs."""
        self._on_close.append(fn)

    def veth(self, a: Namespace, a_if: str, a_addr: str, b: Namespace, b_if: str,
             b_addr: str) -> None:
        run("ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
            "netns", b.name)
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            ns.ip("addr", "add", addr, "dev", ifname)
            ns.ip("link", "set", ifname, "up")

    def log_path(self, ifname: str) -> Path:
        return self.tmp / f"{ifname}.log"

    def start_ours(self, ns: Namespace, ifname: str, network: str,
                   log_level: str = "error", cwd: str | None = None, python: str | None = None,
                   **extra_env: str) -> int:
        """Starts our daemon as users do (it backgrounds itself once ready); returns its pid.
        `extra_env` such as WGVSOCK_OFFLOAD="0" goes into its environment; `cwd` is where it
        runs (its background child is `python -m`, which imports from there first); `python`
        an interpreter to run it with instead of the console script beside this one."""
        self.ifnames.append(ifname)
        env = dict(os.environ, WGVSOCK_UNIX_DIR=str(self.unix_dir),
                   WGVSOCK_LOG_FILE=str(self.log_path(ifname)), LOG_LEVEL=log_level,
                   **extra_env)
        command = [python, "-m", "wgvsock.daemon"] if python else daemon_command()
        ns.run(*command, "-n", network, ifname, env=env, cwd=cwd)
        pid = ns.find_pid("wgvsock.daemon", ifname)
        if pid is None:
            raise LabError(f"our daemon for {ifname} is not running after start")
        return pid

    def start_wireguard_go(self, ns: Namespace, ifname: str) -> int:
        self.ifnames.append(ifname)
        # Debian's wireguard-go refuses to start on Linux without this acknowledgement.
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        # With LOG_LEVEL set, its background child keeps our stdout pipe open and the start
        # command never returns.
        env.pop("LOG_LEVEL", None)
        ns.run("wireguard-go", ifname, env=env)
        pid = ns.find_pid("wireguard-go", ifname)
        if pid is None:
            raise LabError(f"wireguard-go for {ifname} is not running after start")
        return pid

    def start_seed(self, ns: Namespace, ifname: str, binary: Path) -> int:
        """The Go seed over TCP (never vsock here); it backgrounds itself like wireguard-go."""
        self.ifnames.append(ifname)
        env = dict(os.environ)
        env.pop("LOG_LEVEL", None)  # see start_wireguard_go
        ns.run(str(binary), "-n", "tcp", ifname, env=env)
        pid = ns.find_pid(str(binary), ifname)
        if pid is None:
            raise LabError(f"the Go seed for {ifname} is not running after start")
        return pid

    def configure(self, ifname: str, keys: Keys, peer: Keys, peer_ip: str, *,
                  listen_port: int | None = None, endpoint: str | None = None,
                  keepalive: int | None = None, timeout: float = 2.0) -> None:
        """Keys, port and one peer through the UAPI — the same request `wg set` would make.
        `peer_ip`: the peer's allowed IPs, comma-separated as `wg` takes them. `timeout` for
        the reply: longer for a daemon under valgrind."""
        cfg = DeviceConfig(
            private_key=keys.private,
            listen_port=listen_port,
            replace_peers=True,
            peers=[PeerConfig(
                public_key=peer.public,
                endpoint=endpoint,
                persistent_keepalive=keepalive,
                replace_allowed_ips=True,
                allowed_ips=[(ip_network(ip), True) for ip in peer_ip.split(",")],
            )],
        )
        err = uapi_set(f"{RUN_DIR}/{ifname}.sock", format_set(cfg), timeout)
        if err != 0:
            raise LabError(f"configuring {ifname} through the UAPI failed: errno={err}")

    @staticmethod
    def address(ns: Namespace, ifname: str, cidr: str, mtu: int = 1420) -> None:
        ns.ip("link", "set", "dev", ifname, "mtu", str(mtu))
        ns.ip("addr", "add", cidr, "dev", ifname)
        ns.ip("link", "set", "dev", ifname, "up")

    @staticmethod
    def status(ifname: str) -> dict[str, Any]:
        return uapi_get(f"{RUN_DIR}/{ifname}.sock")

    def stop_interface(self, ns: Namespace, ifname: str, pid: int | None) -> None:
        """Deleting the link is the documented way to stop both our daemon and wireguard-go."""
        ns.ip("link", "del", "dev", ifname, check=False)
        if pid is not None:
            self._reap([pid], grace=5.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{RUN_DIR}/{ifname}.sock")

    # -- teardown -----------------------------------------------------------------------

    @staticmethod
    def _reap(pids: list[int], grace: float) -> None:
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.05)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _signals_ignored():
            for fn in reversed(self._on_close):
                with contextlib.suppress(Exception):
                    fn()
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            # SIGTERM first: our daemon and wireguard-go then remove their UAPI sockets.
            pids: list[int] = []
            for ns in self.namespaces:
                for pid in ns.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                        pids.append(pid)
            self._reap(pids, grace=3.0)
            for ns in self.namespaces:
                run("ip", "netns", "del", ns.name, check=False)
            for name in self.ifnames:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{RUN_DIR}/{name}.sock")
            for path in self.etc_files:
                path.unlink(missing_ok=True)
            for d in self.etc_dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def run_in_lab(prog: str, prefix: str, body: Callable[[Lab], int], *, failure: int = 1) -> int:
    """`body` in a new Lab, with SIGTERM and SIGHUP taken as Ctrl-C: the lab is removed however
    it ends, and an interruption (130) or a LabError (`failure`, the message after `prog:`)
    becomes an exit code for a lab program's main(). Otherwise body's own."""
    with interrupts_raise(), Lab(prefix) as lab:
        try:
            return body(lab)
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        except LabError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return failure
