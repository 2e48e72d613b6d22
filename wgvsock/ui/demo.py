"""`make demo`: the parent and the enclave of one profile, in network namespaces, narrated.

Run as root: python -m wgvsock.ui.demo [--live SECONDS] [--iperf-seconds S]

Three network namespaces play the parts:

  wgdemo-internet  the "internet": web servers on 198.51.100.2 and 198.51.100.3
  wgdemo-parent    the EC2 parent instance: eth0 to the internet, its default route
  wgdemo-enclave   the Nitro Enclave: no interface but lo, and lo is down, as at boot

One profile, the shipped enclave/profile.example.yaml with the transport switched to the Unix
socket stand-in for vsock (AF_VSOCK cannot be connected on a machine without Nitro; see
DESIGN.md §5) and its paths moved into a private temporary directory, drives both sides:
`wgvsock parent up` in the parent namespace and `wgvsock enclave up -- python3 -m http.server
8080` in the enclave namespace, the commands a Nitro user runs. The demo then shows the
enclave reaching the internet through the parent's NAT, the internet reaching the enclave's app
through the parent's ingress port, egress by host name (a name allowed, names refused, through
the parent's DNS forwarder; dnsmasq plays the parent's resolver in the "internet"), the deny
list holding and what the parent recorded it refused, the parent's metrics page, a short
iperf3, and ends in the `wgvsock status` dashboard of both sides and what to try next.
Everything is removed on exit, on Ctrl-C and on error.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

from ..device.uapi import UAPIError, uapi_get
from ..services import firewall
from ..services.profile import Profile, ProfileError, load_profile
from .nslab import Lab, LabError, Namespace, interrupts_raise, preflight, run, wait_for

NS_INTERNET, NS_PARENT, NS_ENCLAVE = "wgdemo-internet", "wgdemo-parent", "wgdemo-enclave"
NAMESPACES = (NS_INTERNET, NS_PARENT, NS_ENCLAVE)
PARENT_WAN, WEB, DENIED_WEB = "198.51.100.1", "198.51.100.2", "198.51.100.3"
IMDS = "169.254.169.254"
# Egress by host name: dnsmasq in the "internet" is the parent's resolver for these names.
RESOLVER = "198.51.100.53"
NAME_OK, NAME_DENIED, NAME_OTHER = "www.demo.test", "ads.demo.test", "elsewhere.demo.test"
NAME_WEB = "198.51.100.4"  # where all three names point
INGRESS_PORT, APP_PORT = 8443, 8080
METRICS = "127.0.0.1:9586"  # parent.metrics.listen, inside the parent's namespace
PROFILE_NAME = "demo"
EXAMPLE = Path(__file__).resolve().parents[2] / "enclave" / "profile.example.yaml"
# Who owns the fixed names above, so that the next run can tell a live demo from leftovers:
# locked while its demo runs (claim), left behind only by one that was killed.
STATE_FILE = Path("/run/wgvsock-demo.json")
TMP_PREFIX = "wgvsock-demo-"
REQUIRED_TOOLS = ("ip", "ss", "nft", "curl", "ping", "dnsmasq")
# The interface names the dashboard shows for the two sides' UAPI sockets (both are wg0).
DASH_NAMES = ("wg0@parent", "wg0@enclave")


def _columns() -> int | None:
    """The terminal's width, asked anew each time (it may be resized); None when stdout is
    not a terminal: a pipe or a file gets whole lines."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() \
            else None
    except (OSError, ValueError):
        return None


def _fit(line: str, width: int | None) -> str:
    """LINE wrapped at word boundaries to WIDTH, continuations indented under it. Left alone,
    the terminal cuts a long line at any character and goes on at column 0."""
    if width is None or len(line) <= width or width < 20:
        return line
    indent = len(line) - len(line.lstrip(" "))
    return textwrap.fill(line, width, subsequent_indent=" " * min(indent + 2, width // 4),
                         break_on_hyphens=False)


def say(text: str = "") -> None:
    width = _columns()
    print("\n".join(_fit(line, width) for line in text.split("\n")), flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text}")


def _write_state(fd: int, state: dict[str, Any]) -> None:
    data = json.dumps(state).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def claim() -> tuple[int, dict[str, Any]] | str:
    """Takes the state file for this demo: (its descriptor, what an earlier run that did not
    end wrote in it), or why not (another demo is running).

    The file stays locked (flock) while the descriptor is open: the lock, not a pid, says that
    a demo runs, so two started together cannot both go on (each found no pid and went on,
    and the later one took the other's namespaces for its own), and one killed with SIGKILL
    holds it no more. Our pid goes in at once, for the message of the one refused."""
    while True:
        fd = os.open(STATE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = json.loads(os.pread(fd, 4096, 0)).get("pid")
            except (OSError, ValueError, AttributeError):
                pid = None
            os.close(fd)
            return ("another demo is running" + (f" (pid {pid})" if isinstance(pid, int) else "")
                    + "; one at a time: Ctrl-C in its terminal stops it, and removes what it made")
        # Its owner removes the file before letting go of it: a lock on a removed file is
        # nobody's, and the next open makes a new one.
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(STATE_FILE))
        except FileNotFoundError:
            ours = False
        if not ours:
            os.close(fd)
            continue
        try:
            state = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            state = None
        _write_state(fd, {"pid": os.getpid()})
        return fd, state if isinstance(state, dict) else {}


def release(fd: int) -> None:
    """Removes the state file, then lets go of it (see claim)."""
    STATE_FILE.unlink(missing_ok=True)
    os.close(fd)


def clear_leftovers(state: dict[str, Any]) -> None:
    """Removes what an earlier demo killed with SIGKILL left behind (STATE: what it wrote in
    the state file).

    Fixed names let users poke at the namespaces while the demo runs. Everything the demo
    makes lives in those namespaces (the daemons, the nftables table, forwarding), in
    /etc/netns/<one of them> or in its temporary directory, so removing those removes all."""
    existing = set(run("ip", "netns", "list", check=False).stdout.split())
    for name in NAMESPACES:
        if name in existing:
            for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", name, check=False)
            say(f"   (removed namespace {name} left by an earlier run)")
        etc = Path("/etc/netns") / name
        if etc.is_dir():
            shutil.rmtree(etc, ignore_errors=True)
            say(f"   (removed {etc} left by an earlier run)")
    tmp = state.get("tmp")
    if isinstance(tmp, str) and Path(tmp).name.startswith(TMP_PREFIX) and \
            Path(tmp).parent == Path(tempfile.gettempdir()) and Path(tmp).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"   (removed {tmp} left by an earlier run)")


def wgvsock_command() -> list[str]:
    """The installed `wgvsock` beside this interpreter (what users run), else the module."""
    script = Path(sys.executable).parent / "wgvsock"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "wgvsock.cli"]


def _flow(value: Any) -> str:
    """A value as YAML's flow style writes it, on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _last_log_line(path: Path, needle: str) -> str | None:
    """The last `needle` line of a python -m http.server log, without its timestamp."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if needle in line:
            m = re.match(r"(\S+) - - \[[^\]]*\] (.*)", line)
            return f"{m.group(1)} {m.group(2)}" if m else line
    return None


def enclave_stop_note(code: int, app_started: bool) -> str:
    """What `enclave up` did with the SIGTERM that stopped it, from its exit status."""
    if code == -signal.SIGTERM:
        return "SIGTERM ended it before it could take the signal (it had started nothing yet)"
    if code == 128 + signal.SIGTERM:
        if app_started:
            return f"it passed it to its app and exited {code} (128 + SIGTERM, as its app did)"
        return f"it stopped before starting its app and exited {code}"
    return f"it exited {code}"


def _packets(counters: dict[str, firewall.Counter], name: str) -> str:
    """A counter's packets, or "-" when the table has no such counter (another nft may name
    or shape them otherwise): one number unknown, not the demo ended by a KeyError."""
    c = counters.get(name)
    return "-" if c is None else str(c.packets)


_UNKNOWN_NOTE = "  (-: no such counter in the table; `nft list table` shows what is there)"


def _shown(counters: dict[str, firewall.Counter], names: dict[str, str]) -> str:
    """NAMES (label -> counter name) as "label N, ...", with a note for any not there."""
    line = ", ".join(f"{label} {_packets(counters, n)}" for label, n in names.items())
    return line + (_UNKNOWN_NOTE if any(n not in counters for n in names.values()) else "")


def names_counter_line(counters: dict[str, firewall.Counter]) -> str:
    return "     packets: " + _shown(counters, {f"'allow {NAME_OK}'": f"allow {NAME_OK}",
                                                "to the forwarder": "dns forwarder"})


def deny_counter_lines(counters: dict[str, firewall.Counter]) -> list[str]:
    denied = [f"{k}: {v.packets}" for k, v in counters.items() if k.startswith("deny ")]
    return [f"   [{NS_PARENT}] nftables counters (packets): "
            f"{', '.join(denied) or '- (no deny rule counters in the table)'}",
            "     " + _shown(counters, {n: n for n in ("egress_allowed", "egress_denied",
                                                        "ingress_accepted")})]


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Demo:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab = lab
        self.args = args
        self.tmp = lab.tmp
        self.profile_path = self.tmp / "profile.yaml"
        self.profile: Profile | None = None
        self.enclave_proc: subprocess.Popen | None = None
        self.app_started = False
        self.parent_pid: int | None = None
        self.timings: list[tuple[str, float]] = []
        self.cleanup_announced = False
        self.wgvsock = wgvsock_command()

    # -- helpers -----------------------------------------------------------------------------

    def run_dir(self, side: str) -> Path:
        return self.tmp / f"run-{side}"

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def env(self, side: str) -> dict[str, str]:
        """Each side gets its own run directory (both make an interface called wg0, and the
        UAPI socket is named after it) and state directory; TMPDIR keeps their scratch
        directories inside the demo's own."""
        env = dict(os.environ, WGVSOCK_RUN_DIR=str(self.run_dir(side)),
                   WGVSOCK_STATE_DIR=str(self.tmp / f"state-{side}"), TMPDIR=str(self.tmp),
                   LOG_LEVEL="verbose")
        if side == "parent":
            # Where `parent up` sends the output of the daemon it starts in the background.
            env["WGVSOCK_LOG_FILE"] = str(self.log("parent"))
        return env

    def popen(self, ns: Namespace, *cmd: str, log: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """A background process in `ns`, in its own session so that a Ctrl-C in the terminal
        reaches only the demo, which then stops everything in order."""
        if log is None:
            return ns.popen(*cmd, env=env, start_new_session=True)
        with open(self.log(log), "ab") as out:
            return ns.popen(*cmd, env=env, stdout=out, stderr=out, start_new_session=True)

    def curl(self, ns: Namespace, url: str, max_time: float = 5) -> tuple[bool, str, float]:
        start = time.monotonic()
        res = ns.run("curl", "-sS", "--max-time", f"{max_time:g}", url, check=False,
                     timeout=max_time + 10)
        took = time.monotonic() - start
        return res.returncode == 0, (res.stdout if res.returncode == 0 else res.stderr).strip(), \
            took

    def uapi(self, side: str) -> dict[str, Any]:
        return uapi_get(str(self.run_dir(side) / "wg0.sock"), timeout=2.0)

    def elapsed(self) -> float:
        return time.monotonic() - self.args.t0

    # -- the stage ---------------------------------------------------------------------------

    def stage(self) -> None:
        heading("The stage: three network namespaces")
        lab = self.lab
        self.internet = lab.netns(NS_INTERNET)
        self.parent = lab.netns(NS_PARENT)
        # A Nitro Enclave boots with loopback down and no other interface.
        self.enclave = lab.netns(NS_ENCLAVE, lo_up=False)
        lab.veth(self.parent, "eth0", f"{PARENT_WAN}/24", self.internet, "eth0", f"{WEB}/24")
        for addr in (DENIED_WEB, NAME_WEB):
            self.internet.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        self.parent.ip("route", "add", "default", "via", WEB)
        www = self.tmp / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from the internet\n")
        for addr in (WEB, DENIED_WEB, NAME_WEB):
            self.popen(self.internet, sys.executable, "-m", "http.server", "-d", str(www),
                       "-b", addr, "80", log="internet")
        # The parent's resolver: foreground, this address only, no file of this machine read.
        self.internet.ip("addr", "add", f"{RESOLVER}/24", "dev", "eth0")
        self.popen(self.internet, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                   "--no-hosts", "--no-resolv", "--no-poll", "--pid-file", "--user=root",
                   f"--listen-address={RESOLVER}", "--bind-interfaces", "--local-ttl=300",
                   "--log-facility=-", "--log-queries",
                   *(f"--host-record={n},{NAME_WEB}" for n in (NAME_OK, NAME_DENIED, NAME_OTHER)),
                   log="dnsmasq")
        # `ip netns exec` bind-mounts this over /etc/resolv.conf for the enclave, so the
        # resolv.conf that `enclave up` writes is this private copy, not the machine's.
        self.resolv = lab.netns_file(self.enclave, "resolv.conf",
                                     "# placeholder: wgvsock enclave up rewrites this\n")
        for addr in (WEB, DENIED_WEB, NAME_WEB):
            wait_for(lambda a=addr: self.curl(self.internet, f"http://{a}/", 1)[0], 10,
                     f"the internet's web server on {addr}")
        wait_for(lambda: f"{RESOLVER}:53" in self.internet.run("ss", "-lunH").stdout, 10,
                 "dnsmasq")
        say(f"   {NS_INTERNET:<16} the internet: web servers on {WEB}, {DENIED_WEB} and "
            f"{NAME_WEB}, port 80;")
        say(f"   {'':<16} dnsmasq on {RESOLVER} knows {NAME_OK}, {NAME_DENIED} and "
            f"{NAME_OTHER} (all {NAME_WEB})")
        say(f"   {NS_PARENT:<16} the EC2 parent: eth0 {PARENT_WAN}/24, default route via {WEB}")
        say(f"   {NS_ENCLAVE:<16} the enclave: no interface but lo, and lo is down (as at boot)")
        say("   parent and enclave share no link: their only path is Unix sockets in")
        say(f"   {self.tmp / 'sock'}, the stand-in for vsock (same stream framing code)")
        say(f"   logs: {self.tmp}/{{parent,enclave,internet,dnsmasq}}.log (removed at the end "
            "with the rest; a step that fails prints the last lines of the parent's and the "
            "enclave's)")

    # -- the profile -------------------------------------------------------------------------

    def write_profile(self) -> None:
        try:
            data = yaml.safe_load(EXAMPLE.read_text())
            source = f"{EXAMPLE.parent.name}/{EXAMPLE.name}"
        except (OSError, yaml.YAMLError):
            # Not a checkout: every key but `name` has a default.
            data, source = {"version": 1}, None
        if not isinstance(data, dict):
            raise LabError(f"{EXAMPLE} is not a YAML mapping")
        changes: dict[str, Any] = {
            "name": PROFILE_NAME,
            "transport.kind": "unix",
            "transport.path": str(self.tmp / "sock"),
            "parent.private_key": str(self.tmp / "parent.key"),
            # The web server by address, the one behind NAME_OK only by name.
            "parent.egress.allow": [f"{WEB}/32", NAME_OK],
            # The credential endpoints (IMDS among them) are added to any deny list.
            "parent.egress.deny": [f"{DENIED_WEB}/32", NAME_DENIED],
            "parent.egress.resolver": RESOLVER,
            "parent.ingress": [{"listen": INGRESS_PORT, "to": APP_PORT, "protocol": "tcp"}],
            "parent.metrics": {"listen": METRICS},
            "enclave.dns": "parent",
        }

        heading("One profile for both sides")
        say(f"   {source or 'built-in defaults'}, with these changes:")
        for key, new in changes.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            old = node.get(last)
            node[last] = new
            line = f"     {key + ':':<20} {_flow(old)} -> {_flow(new)}"
            if len(line) > 96:
                line = f"     {key + ':':<20} {_flow(old)}\n{'':<26}-> {_flow(new)}"
            say(line)
        self.profile_path.write_text(
            f"# made by `make demo` from {source or 'defaults'}\n"
            + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
        try:
            p = load_profile(self.profile_path)
        except ProfileError as e:
            raise LabError(f"the demo's profile is invalid:\n{e}") from e
        self.profile = p
        addrs = lambda xs: ", ".join(str(x) for x in xs)  # noqa: E731
        say(f"   kept: tunnel {addrs(p.parent.addresses)} <-> {addrs(p.enclave.addresses)}, "
            f"mtu {p.mtu}, port {p.transport.port}, control {p.transport.control_port}")
        say(f"         egress deny (effective) {', '.join(p.parent.egress.effective_deny())}")
        say(f"         egress allow {addrs(p.parent.egress.allow + p.parent.egress.allow_names)}"
            f" with NAT "
            f"{'on' if p.parent.egress.nat else 'off'}, enclave dns {addrs(p.enclave.dns)}, "
            f"attestation {'required' if p.attestation.require else 'not required'}")
        say(f"   written to {self.profile_path} (`wgvsock profile check` accepts it)")

    # -- the two sides -----------------------------------------------------------------------

    def parent_up(self) -> None:
        assert self.profile is not None
        p = self.profile
        heading(f"[{NS_PARENT}] wgvsock parent up --profile profile.yaml")
        self.lab.on_close(self.parent_down)
        start = time.monotonic()
        res = self.parent.run(*self.wgvsock, "parent", "up", "--profile",
                              str(self.profile_path), env=self.env("parent"), check=False,
                              timeout=60)
        took = time.monotonic() - start
        if res.returncode != 0:
            raise LabError(f"wgvsock parent up failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}")
        self.timings.append(("parent up (until ready)", took))
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((self.tmp / "state-parent" / f"{p.name}.json").read_text())
            self.parent_pid = int(state["pid"])
        pid = f" (pid {self.parent_pid})" if self.parent_pid else ""
        say(f"   ready after {took:.1f} s, then it went to the background{pid}")
        sock = Path(p.transport.path)
        say(f"   wg0 {p.parent.addresses[0]}, WireGuard on {sock.name}/{p.transport.port}.sock, "
            f"control on {sock.name}/{p.transport.control_port}.sock")
        rules = ", ".join(f"{r.listen} -> {p.enclave.addresses[0].ip}:{r.to}/{r.protocol}"
                          for r in p.parent.ingress)
        say(f"   nftables table inet {firewall.table_name(p.name)}: NAT out of eth0, the deny "
            "list,")
        say(f"     ingress {rules}")

    def announce_cleanup(self) -> None:
        if not self.cleanup_announced:
            self.cleanup_announced = True
            with contextlib.suppress(OSError):
                heading("Cleaning up")

    def parent_down(self) -> None:
        self.announce_cleanup()
        self._stop_enclave()
        res = self.parent.run(*self.wgvsock, "parent", "down", "--profile",
                              str(self.profile_path), env=self.env("parent"), check=False,
                              timeout=60)
        with contextlib.suppress(OSError):
            say(f"   [{NS_PARENT}] wgvsock parent down:")
            for line in (res.stdout + res.stderr).strip().splitlines():
                say(f"     {line.replace(str(self.tmp), '$TMP')}")

    def _stop_enclave(self) -> None:
        proc = self.enclave_proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(5)
        with contextlib.suppress(OSError):
            say(f"   [{NS_ENCLAVE}] SIGTERM to wgvsock enclave up: "
                f"{enclave_stop_note(code, self.app_started)}")

    def enclave_up(self) -> None:
        assert self.profile is not None
        p = self.profile
        app = self.tmp / "app"
        app.mkdir()
        (app / "index.html").write_text("hello from the enclave\n")
        heading(f"[{NS_ENCLAVE}] wgvsock enclave up --profile profile.yaml -- "
                f"python3 -m http.server {APP_PORT}")
        start = time.monotonic()
        self.enclave_proc = self.popen(
            self.enclave, *self.wgvsock, "enclave", "up", "--profile", str(self.profile_path),
            "--timeout", "30", "--", sys.executable, "-m", "http.server", "-d", str(app),
            str(APP_PORT), log="enclave", env=self.env("enclave"))
        ready = "tunnel to the parent is up"

        def up() -> bool:
            if self.enclave_proc is not None and self.enclave_proc.poll() is not None:
                raise LabError(f"wgvsock enclave up exited {self.enclave_proc.returncode}")
            return ready in _tail(self.log("enclave"), 1 << 20)

        wait_for(up, 40, "the enclave's tunnel")
        # It starts its app right after saying so.
        self.app_started = True
        took = time.monotonic() - start
        self.timings.append(("enclave up (until the tunnel is up)", took))
        say("   it brought lo up, made a key in memory, made wg0 "
            f"{p.enclave.addresses[0]} with the default route into it,")
        say("   wrote resolv.conf, registered its key on the parent's control port, and saw")
        say(f"   the first handshake: \"wgvsock enclave: {ready} on wg0\" after {took:.1f} s")
        peers = self.uapi("enclave")["peers"]
        if peers and peers[0]["last_handshake_time_sec"]:
            hs = peers[0]["last_handshake_time_sec"] + peers[0]["last_handshake_time_nsec"] / 1e9
            say(f"   handshake at {time.strftime('%H:%M:%S', time.localtime(hs))}"
                f".{int(hs % 1 * 1000):03d}; only then did it start its app")
        links = self.enclave.ip("-o", "link", "show").stdout
        names = sorted(line.split(":")[1].strip() for line in links.splitlines())
        routes = [m.group(0) for r in self.enclave.ip("route", "show").stdout.splitlines()
                  if (m := re.match(r"\S+ dev \S+", r))]
        say(f"   the enclave's interfaces now: {', '.join(names)}; routes: {'; '.join(routes)}")
        resolv = " ".join(line for line in self.resolv.read_text().splitlines()
                          if line.startswith("nameserver"))
        say(f"   its resolv.conf ({self.resolv}, bind-mounted): {resolv}")

    # -- what the tunnel does ----------------------------------------------------------------

    def egress(self) -> None:
        heading("The enclave reaches the internet, through the parent's NAT")
        say(f"   [{NS_ENCLAVE}] $ curl http://{WEB}/")
        ok, out, took = self.curl(self.enclave, f"http://{WEB}/")
        if not ok:
            raise LabError(f"the enclave could not fetch http://{WEB}/: {out}")
        say(f"   {out}    ({took * 1000:.0f} ms)")
        seen = _last_log_line(self.log("internet"), '"GET / ')
        if seen:
            say(f"   the internet's web server logged: {seen}")
            say(f"   it saw the parent's address {PARENT_WAN}, not the enclave's "
                f"{self.profile.enclave.addresses[0].ip if self.profile else ''}: masquerade")

    def ingress(self) -> None:
        heading(f"The internet reaches the enclave's app: parent port {INGRESS_PORT} -> "
                f"enclave port {APP_PORT}")
        url = f"http://{PARENT_WAN}:{INGRESS_PORT}/"
        say(f"   [{NS_INTERNET}] $ curl {url}")
        wait_for(lambda: self.curl(self.internet, url, 2)[0], 15, "the enclave's app")
        ok, out, took = self.curl(self.internet, url)
        if not ok:
            raise LabError(f"the internet could not fetch {url}: {out}")
        say(f"   {out}    ({took * 1000:.0f} ms)")
        seen = _last_log_line(self.log("enclave"), '"GET / ')
        if seen:
            say(f"   the app in the enclave logged: {seen}")
            say("   (the client's own address: the parent forwards the port with DNAT, no SNAT)")

    def names(self) -> None:
        heading("Egress by host name: the parent's DNS forwarder is the enclave's resolver")
        say(f"   allow has {NAME_OK}, deny has {NAME_DENIED}; the forwarder answers only "
            "allowed names,")
        say("   and puts their addresses into the nftables set of the allow entry first")
        for url, what in ((f"http://{NAME_WEB}/", "BLOCKED: no allowed answer named it yet"),
                          (f"http://{NAME_OK}/", None), (f"http://{NAME_WEB}/", None),
                          (f"http://{NAME_DENIED}/", "REFUSED by the parent (denied name)"),
                          (f"http://{NAME_OTHER}/", "REFUSED by the parent (no allow entry)")):
            ok, out, _ = self.curl(self.enclave, url, 2)
            say(f"   [{NS_ENCLAVE}] $ curl --max-time 2 {url}")
            say(f"     -> {out}" if ok else f"     -> {what or 'failed'}: {out}")
        try:
            elements = firewall.set_elements(PROFILE_NAME, firewall.name_set(0, 4),
                                             netns=NS_PARENT)
            c = firewall.read_counters(PROFILE_NAME, netns=NS_PARENT)
        except (firewall.FirewallError, OSError) as e:
            say(f"   (could not read the nftables set: {e})")
            return
        shown = ", ".join(f"{a} (timeout {t} s, expires in {e} s)"
                          for a, (t, e) in elements.items())
        say(f"   [{NS_PARENT}] set {firewall.name_set(0, 4)} ({NAME_OK}): {shown or 'empty'}")
        say(names_counter_line(c))

    def deny(self) -> None:
        heading("The deny list holds")
        ok, out, _ = self.curl(self.parent, f"http://{DENIED_WEB}/")
        say(f"   [{NS_PARENT}]  $ curl http://{DENIED_WEB}/  ->  "
            f"{out if ok else 'failed: ' + out}  (the server is there)")
        # Both at once: each can only end by timing out, since the parent drops the packets.
        urls = (f"http://{DENIED_WEB}/", f"http://{IMDS}/latest/meta-data/")
        start = time.monotonic()
        procs = [subprocess.Popen(["ip", "netns", "exec", NS_ENCLAVE, "curl", "-sS",
                                   "--max-time", "2", u], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for u in urls]
        results = [(p.communicate(timeout=15)[0].strip(), p.returncode) for p in procs]
        took = time.monotonic() - start
        for url, (out, code) in zip(urls, results, strict=True):
            if code == 28:  # curl's "operation timed out"
                what = "BLOCKED (no answer within 2 s)"
            elif code:
                what = f"BLOCKED ({out or f'curl exit {code}'})"
            else:
                what = f"REACHED: {out}"
            say(f"   [{NS_ENCLAVE}] $ curl --max-time 2 {url}")
            say(f"     -> {what}")
        say(f"   ({took:.1f} s for both. Nothing answers at the metadata address {IMDS} in this "
            "demo anyway;")
        say("    the counters show that the parent dropped those packets)")
        try:
            c = firewall.read_counters(PROFILE_NAME, netns=NS_PARENT)
        except (firewall.FirewallError, OSError) as e:
            say(f"   (could not read the nftables counters: {e})")
            return
        for line in deny_counter_lines(c):
            say(line)
        # The parent names what it refused (its table logs the first packets of each).
        try:
            extra = wait_for(lambda: self._refused_keys(3), 5, "the parent's refusal record")
        except LabError:
            extra = self._refused_keys(0)
        say(f"   [{NS_PARENT}] what the parent refused lately (`wgvsock status`; its log says "
            "what would allow each):")
        from .status import refusal_words

        for r in extra:  # in the dashboard's words
            verb, note = refusal_words(r)
            times = f", {r.count} times" if r.count > 1 else ""
            note = f" ({note})" if note else ""
            say(f"     {verb} {r.what}{times}{note}, {r.age} s ago")

    def _refused_keys(self, at_least: int) -> list:
        """The parent's refusals (status.RefusalView), once there are AT_LEAST of them."""
        from .status import refusals_of

        try:
            found = refusals_of(self.uapi("parent").get("extra", {}))
        except (OSError, UAPIError):
            return []
        return found if len(found) >= at_least else []

    def metrics(self) -> None:
        heading(f"The metrics page: Prometheus text from the parent on {METRICS}")
        res = self.parent.run("curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics",
                              check=False)
        if res.returncode != 0:
            say(f"   could not scrape it: {res.stderr.strip() or res.stdout.strip()}")
            return
        lines = [ln for ln in res.stdout.splitlines() if ln and not ln.startswith("#")]
        say(f"   [{NS_PARENT}]  $ curl http://{METRICS}/metrics   "
            f"({len(lines)} series; the per-peer, egress and DNS ones:)")
        for line in lines:
            if line.startswith(("wireguard_", "wgvsock_egress_", "wgvsock_dns_")):
                # Keys shortened as the dashboard does, so each series fits a line.
                say("     " + re.sub(r'(public_key="[^"]{8})[^"]*"', r'\1…"', line))
        say("   the same metrics go to CloudWatch with parent.metrics.cloudwatch")

    def throughput(self) -> None:
        secs = self.args.iperf_seconds
        heading(f"Throughput: iperf3 between the enclave and the internet, {secs:g} s each way")
        if secs <= 0:
            say("   skipped (--iperf-seconds 0)")
            return
        if shutil.which("iperf3") is None:
            say("   skipped: iperf3 is not installed")
            return
        server = self.popen(self.internet, "iperf3", "-s", "-B", WEB)
        try:
            wait_for(lambda: self.internet.run("ss", "-Hltn", "src", f"{WEB}:5201",
                                               check=False).stdout.strip(), 10,
                     "the iperf3 server")
            for label, reverse in (("enclave -> internet", False), ("internet -> enclave", True)):
                say(f"   {label}: {self._iperf(secs, reverse)}")
        finally:
            server.kill()
            server.wait(5)

    def _iperf(self, seconds: float, reverse: bool) -> str:
        cmd = ["iperf3", "-c", WEB, "-t", f"{seconds:g}", "-J", "--connect-timeout", "3000"]
        if reverse:
            cmd.append("-R")
        res = self.enclave.run(*cmd, check=False, timeout=seconds + 30)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            return f"failed ({res.stderr.strip() or 'no output'})"
        if "error" in data:
            return f"failed (iperf3: {data['error']})"
        end = data["end"]
        retr = end.get("sum_sent", {}).get("retransmits")
        extra = f", {retr} retransmits" if retr is not None else ""
        return f"{end['sum_received']['bits_per_second'] / 1e6:.0f} Mbit/s{extra}"

    # -- the dashboard -----------------------------------------------------------------------

    def dashboard(self) -> None:
        from rich.console import Console

        from .status import Collector, Dashboard, live

        # The dashboard reads one run directory; the sides have one each, both with a wg0.sock.
        # Links named after the side let it show both (connect() follows symlinks).
        dash = self.tmp / "dashboard"
        dash.mkdir()
        for name, side in zip(DASH_NAMES, ("parent", "enclave"), strict=True):
            (dash / f"{name}.sock").symlink_to(self.run_dir(side) / "wg0.sock")
        names = list(DASH_NAMES)
        console = Console()
        # Not merely a terminal: one that can move the cursor. On TERM=dumb the live view
        # draws nothing at all until it ends.
        tty = console.is_interactive
        secs = self.args.live
        heading("The dashboard: wgvsock status, both sides" +
                (f", for {secs:g} s ({how_to_end_live(sys.stdin)})" if tty
                 else " (two snapshots)"))
        say("   what `wgvsock status` shows on the parent, here reading both sides' UAPI "
            "sockets;")
        say(f"   a ping from the enclave to {WEB} keeps the counters moving")
        pinger = self.popen(self.enclave, "ping", "-q", "-n", "-s", "1200", "-i", "0.05", WEB)
        try:
            if tty:
                time.sleep(1.0)  # so the view opens with a rate, not "-"
                stopped_by: list[int] = []
                live(names, interval=1.0, run_dir=str(dash), duration=secs,
                     stopped_by=stopped_by)
                if stopped_by:  # SIGTERM or SIGHUP: for the demo, not only for the view
                    raise KeyboardInterrupt(signal.Signals(stopped_by[0]).name)
                say("   last frame:")
                collector = Collector(names, str(dash))
                collector.sample()
                time.sleep(1.0)
            else:
                collector = Collector(names, str(dash))
                console.print(Dashboard(collector.sample(), _at))
                console.print()
                time.sleep(1.0)
            console.print(Dashboard(collector.sample(), _at))
        finally:
            pinger.kill()
            pinger.wait(5)

    # -- all of it ---------------------------------------------------------------------------

    def run(self) -> None:
        self.stage()
        self.write_profile()
        self.parent_up()
        self.enclave_up()
        self.egress()
        self.ingress()
        self.names()
        self.deny()
        self.metrics()
        self.throughput()
        if self.args.live > 0:
            self.dashboard()


def how_to_end_live(stdin: Any) -> str:
    """How the live dashboard can be ended early: q only reaches it from a terminal on stdin
    (`make demo < /dev/null` in a terminal shows the view, but no key reaches it)."""
    try:
        keys = stdin is not None and stdin.isatty()
    except (OSError, ValueError):  # closed
        keys = False
    return "q or Ctrl-C ends it" if keys else f"Ctrl-C or `kill {os.getpid()}` ends it"


def _at(snapshot: Any) -> str:
    return f"at {time.strftime('%H:%M:%S', time.localtime(snapshot.time))} · rates in bytes/s"


def what_next() -> None:
    heading("What next")
    say(f"   to look around yourself: {sys.executable} -m wgvsock.ui.demo --live 600")
    say("   keeps the dashboard up for 10 minutes (q ends it); meanwhile, in another terminal:")
    say(f"     ip netns exec {NS_ENCLAVE} curl http://{NAME_OK}/")
    say(f"     ip netns exec {NS_PARENT} nft list table inet {firewall.table_name(PROFILE_NAME)}")
    say(f"     ip netns exec {NS_INTERNET} curl http://{PARENT_WAN}:{INGRESS_PORT}/")
    say("   on EC2 with a Nitro Enclave: README.md, \"Quick start on EC2\"")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wgvsock.ui.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=float, default=8.0, metavar="SECONDS",
                    help="how long to show the live dashboard (0: skip it); when stdout is not "
                    "a terminal (or TERM=dumb), two snapshots are printed instead")
    ap.add_argument("--iperf-seconds", type=float, default=2.0, metavar="S",
                    help="iperf3 time per direction (0: skip)")
    args = ap.parse_args(argv)
    args.t0 = time.monotonic()

    say("wgvsock demo: `wgvsock parent up` and `wgvsock enclave up` from one profile, "
        "in network namespaces")
    if reason := preflight("it creates network namespaces, TUN devices and nftables tables; "
                           "try: sudo make demo", REQUIRED_TOOLS):
        print(f"demo: refusing to run: {reason}", file=sys.stderr)
        return 2
    claimed = claim()
    if isinstance(claimed, str):
        print(f"demo: refusing to run: {claimed}", file=sys.stderr)
        return 2
    fd, earlier = claimed
    try:
        return _run(args, fd, earlier)
    finally:
        release(fd)


def _run(args: argparse.Namespace, fd: int, earlier: dict[str, Any]) -> int:
    """The demo, once the state file is ours (FD; EARLIER: what a run that did not end left)."""
    code = 0
    with interrupts_raise():
        lab = Lab(TMP_PREFIX)
        demo = Demo(lab, args)
        try:
            # At once: a run killed from here on leaves its temporary directory to the next.
            _write_state(fd, {"pid": os.getpid(), "tmp": str(lab.tmp)})
            clear_leftovers(earlier)
            say("   Ctrl-C stops it at any point and removes everything it made")
            demo.run()
        except KeyboardInterrupt:
            with contextlib.suppress(OSError):
                say("\ninterrupted")
            code = 130
        except (LabError, UAPIError, OSError, subprocess.TimeoutExpired) as e:
            with contextlib.suppress(OSError):
                print(f"\ndemo failed: {e}", file=sys.stderr)
                for name in ("parent", "enclave"):
                    if tail := _tail(demo.log(name)):
                        print(f"--- {name} log (tail)\n{tail}", file=sys.stderr)
            code = 1
        finally:
            # Printing can fail (a closed pipe, say): it must not stop the clean-up. close()
            # runs `parent down` (which stops the enclave first), then removes the rest.
            lab.close()
            listed = run("ip", "netns", "list", check=False).stdout.split()
            left = [n for n in NAMESPACES if n in listed]
            left += [str(p) for p in (Path("/etc/netns") / n for n in NAMESPACES) if p.exists()]
            if lab.tmp.exists():
                left.append(str(lab.tmp))
            with contextlib.suppress(OSError):
                demo.announce_cleanup()
                if left:
                    say(f"   WARNING: still present: {', '.join(left)}")
                else:
                    say("   namespaces (with the nftables table and forwarding in them), "
                        f"/etc/netns/{NS_ENCLAVE}")
                    say("   and the temporary directory removed: nothing left behind")
                for what, secs in demo.timings:
                    say(f"   {what}: {secs:.1f} s")
                say(f"   whole demo: {time.monotonic() - args.t0:.1f} s")
                if code == 0 and not left:
                    what_next()
            if left:
                code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
