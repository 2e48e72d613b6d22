"""The parent under its own unit (parent/wgvsock-parent@.service), run by systemd itself.

systemd 252 (Debian's, what Amazon Linux 2023 also runs) boots in a container whose network
is the parent's namespace (tests/net/systemd_rig.py); the unit is installed as the README
says and driven with `systemctl`. The enclave runs outside, in its own namespace, over the
Unix stand-in, and its app is never restarted. What is checked:

- readiness (Type=notify): `systemctl start` returns only once the interface, the nftables
  table and the control listener exist; `systemctl status` says what the parent waits for;
- restarts (Restart=on-failure): after SIGKILL and after the parent stops itself (its
  interface deleted), the enclave reaches the internet again within RECOVERY_BOUND;
- `systemctl reload`: a new ingress port applied by the same process, which stays active; a
  broken profile refused with the reason, the parent running on;
- `systemctl stop`: nothing left behind, no restart;
- the watchdog (WatchdogSec=): the main loop stopped (ptrace) for longer than WatchdogSec is
  not taken for a hang while the data path moves; one thread of the data path stopped, the
  rest of the process running — systemd stops it with SIGABRT, the journal shows why and every
  thread's stack, the unit restarts it and the tunnel comes back;
- `parent up` without -f under Type=notify: refused at once, saying to add -f;
- the log: errors at priority err in the journal (`journalctl -p err`);
- the sandbox (the unit's [Service] hardening): a probe run as ExecStartPre=, in the same
  sandbox as the parent, finds the system read-only but its own directories, two capabilities,
  no AF_PACKET, no writable and executable memory, no namespaces; the DNS forwarder, the metrics
  exporter and parent.enclave (tests/fakes/nitro-cli) work under it;
- `wgvsock daemon -f` (the wireguard-go-vsock drop-in) in a Type=notify unit of its own: its
  UAPI socket answers as soon as `systemctl start` returns; SIGUSR1 writes each thread's stack
  to the journal and leaves it running.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .netlab import Lab, wait_for
from .systemd_rig import NSPAWN, Container, StuckThread
from .test_egress_names import DNS, query, start_dnsmasq
from .test_recovery import RECOVERY_BOUND, app_pid
from .test_roles import World

pytestmark = [pytest.mark.root, pytest.mark.slow]

UNIT_FILE = Path(__file__).resolve().parents[2] / "parent" / "wgvsock-parent@.service"


@dataclass
class Rig:
    world: World
    box: Container
    unit: str
    home: Path  # the profile, key and sockets: outside /tmp, which the unit's PrivateTmp hides

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(self.unit, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def restarts(self) -> int:
        return int(self.show("NRestarts")["NRestarts"])

    def running(self) -> bool:
        s = self.show("ActiveState", "SubState")
        return s["ActiveState"] == "active" and s["SubState"] == "running"

    def status_text(self) -> str:
        return self.show("StatusText").get("StatusText", "")

    def journal(self) -> str:
        return self.box.journal(self.unit)

    def egress_back_within(self, since: float, what: str) -> float:
        wait_for(lambda: self.world.curl(self.world.enclave, "http://198.51.100.2/", timeout=1)
                 == "hello from the internet\n", RECOVERY_BOUND - (time.monotonic() - since),
                 what)
        return time.monotonic() - since


@pytest.fixture
def rig(lab: Lab) -> Iterator[Rig]:
    if shutil.which(NSPAWN) is None:
        pytest.fail("systemd-nspawn is missing: `make test` installs systemd-container")
    home = Path(f"/run/wgvsock-sd-{lab.tag}")
    home.mkdir(mode=0o700)
    # The container must change nothing of this machine's own (its namespace's sysctls are
    # the parent's to change; this one decides what every new namespace starts with).
    host_forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    box = None
    unit = ""
    try:
        world = World(lab, transport=f"  kind: unix\n  port: 51820\n  path: {home}/sock")
        world.env["TMPDIR"] = str(lab.tmp)
        text = world.profile.read_text().replace(str(lab.tmp / "parent.key"),
                                                 str(home / "parent.key"))
        world.profile = home / f"{world.name}.yaml"
        world.profile.write_text(text)
        box = Container(lab.tmp, world.parent.name, f"wgvsd{lab.tag}",
                        binds=[(str(home), str(home), True), (str(home), "/etc/wgvsock", False)])
        box.start()
        # Installed as parent/README.md says (the empty /etc lacks the directory).
        box.run("install", "-D", "-m", "0644", f"/opt/wgvsock/src/parent/{UNIT_FILE.name}",
                f"/etc/systemd/system/{UNIT_FILE.name}", check=True)
        # The profile's key and transport.path are in `home`, outside what the unit lets the
        # parent write: added with a drop-in, as parent/README.md says for such paths.
        box.run("mkdir", "-p", f"/etc/systemd/system/{UNIT_FILE.name}.d", check=True)
        box.run("sh", "-c", 'printf "[Service]\\nReadWritePaths=%s\\n" "$1" > "$2"', "-",
                str(home), f"/etc/systemd/system/{UNIT_FILE.name}.d/home.conf", check=True)
        box.systemctl("daemon-reload", check=True)
        unit = f"wgvsock-parent@{world.name}.service"
        yield Rig(world, box, unit, home)
    finally:
        try:
            if box is not None:
                if box.proc is not None and box.leader and unit:
                    try:  # (only to read: a container that broke must still be closed)
                        print(f"\n--- the journal of {unit} ---\n" + box.journal(unit)[-3000:])
                    except Exception as e:
                        print(f"\n--- cannot read the journal of {unit}: {e!r}")
                box.close()
            if "world" in locals():
                world.close()
        finally:
            shutil.rmtree(home, ignore_errors=True)
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forwarding


def start(rig: Rig) -> None:
    """`systemctl start`, then what must already be there when it returns."""
    res = rig.box.systemctl("start", rig.unit, timeout=120)
    assert res.returncode == 0, f"{res.stderr}\n{rig.journal()}"
    # Type=notify: start returned after READY=1, so everything `up` makes exists now, not
    # "soon" (with Type=exec it returned as soon as the process had been started).
    world = rig.world
    assert world.parent.ip("link", "show", "wg0", check=False).returncode == 0
    table = world.parent.run("nft", "list", "tables", check=True).stdout
    assert f"wgvsock-{world.name}" in table or world.name in table, table
    assert (rig.home / "sock").is_dir() and any((rig.home / "sock").iterdir())
    assert rig.running()
    assert world.parent.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"


def test_the_unit_starts_ready_restarts_reloads_and_stops_under_systemd(rig: Rig) -> None:
    world = rig.world
    start(rig)
    props = rig.show("Type", "NotifyAccess", "WatchdogUSec", "Restart", "RestartUSec",
                     "StartLimitBurst", "StartLimitIntervalUSec")
    # RestartSec is spent before the parent even starts: it leaves room in the 10 s bound for
    # ExecStop, `parent up` and the enclave's redial. A crash loop still gives up: 5 starts
    # 1 s apart fit well within the 5 minutes of the start limit.
    assert props == {"Type": "notify", "NotifyAccess": "main", "WatchdogUSec": "10s",
                     "Restart": "on-failure", "RestartUSec": "1s", "StartLimitBurst": "5",
                     "StartLimitIntervalUSec": "5min"}
    assert rig.status_text() == "wg0 up; waiting for the enclave to register"

    world.start_enclave()
    wait_for(world.egress_works, 30, "the tunnel")
    wait_for(lambda: "tunnel up" in rig.status_text(), 10, "the status to say the tunnel is up")
    assert rig.status_text() == "wg0 up; enclave registered (attested: false); tunnel up"
    app = app_pid(world)

    # 1. A crash: SIGKILL. Restarted by the unit; the enclave's app never notices.
    first = rig.main_pid()
    crashed = time.monotonic()
    rig.box.run("kill", "-KILL", str(first), check=True)
    wait_for(lambda: rig.restarts() == 1 and rig.running(), RECOVERY_BOUND, "the restart")
    took = rig.egress_back_within(crashed, "egress after SIGKILL")
    print(f"\nSIGKILL: egress back {took:.2f} s after the kill")
    assert rig.main_pid() != first

    # 2. The parent stops itself for a reason (exit 1): its interface deleted under it.
    second = rig.main_pid()
    failed = time.monotonic()
    world.parent.ip("link", "del", "wg0")
    wait_for(lambda: rig.restarts() == 2 and rig.running(), RECOVERY_BOUND, "the restart")
    took = rig.egress_back_within(failed, "egress after the interface was deleted")
    print(f"interface deleted: egress back {took:.2f} s later")
    assert rig.main_pid() != second
    assert "interface wg0 was removed" in rig.journal()
    # Logged at its own priority (wgvsock.journal): `journalctl -p err` has the error and no
    # info line.
    errors = rig.box.run("journalctl", "--no-pager", "-o", "cat", "-p", "err", "-u", rig.unit,
                         check=True).stdout
    assert "stopped: interface wg0 was removed" in errors, errors
    assert "up on wg0" not in errors and "enclave registered" not in errors
    assert app_pid(world) == app, "the enclave's app was restarted"
    wait_for(world.ingress_works, RECOVERY_BOUND, "ingress after the restarts")

    # 3. `systemctl reload`: a new ingress port, applied by the same process.
    pid = rig.main_pid()
    good = world.profile.read_text()
    world.profile.write_text(good.replace("{listen: 8443", "{listen: 9443"))
    res = rig.box.systemctl("reload", rig.unit)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: world.curl(world.internet, "http://198.51.100.1:9443/")
             == "hello from the enclave\n", 10, "ingress on the reloaded port")
    assert rig.main_pid() == pid and rig.running()
    assert "reloaded from" in rig.journal()
    wait_for(lambda: "; reloaded at " in rig.status_text(), 5, "the status to show the reload")

    # A profile that does not parse, then one the running parent cannot take: each reload
    # fails, saying why; the parent runs on, back in its running state (READY=1 after
    # RELOADING=1 even when the reload failed).
    world.profile.write_text(good.replace("ingress:", "ingress: [oops"))
    assert rig.box.systemctl("reload", rig.unit).returncode != 0
    assert "not valid YAML" in rig.journal()
    world.profile.write_text(good.replace("interface: wg0", "interface: wg9"))
    assert rig.box.systemctl("reload", rig.unit).returncode != 0
    assert "not reloaded: interface (line 3) changed" in rig.journal()
    assert rig.main_pid() == pid and rig.running()
    wait_for(lambda: rig.status_text().endswith(" refused (see the log)"), 5,
             "the status to show the refused reload")
    world.profile.write_text(good.replace("{listen: 8443", "{listen: 9443"))
    assert world.egress_works()

    # 4. `systemctl stop`: clean, nothing left, not restarted.
    rig.box.systemctl("stop", rig.unit, check=True)
    # (Result=success: Restart=on-failure does not bring it back.)
    s = rig.show("ActiveState", "SubState", "Result")
    assert s == {"ActiveState": "inactive", "SubState": "dead", "Result": "success"}
    assert world.parent.ip("link", "show", "wg0", check=False).returncode != 0
    assert world.name not in world.parent.run("nft", "list", "tables", check=True).stdout
    assert not any((rig.home / "sock").glob("*.sock"))


def test_the_watchdog_restarts_a_parent_whose_data_path_hangs(rig: Rig) -> None:
    world = rig.world
    start(rig)
    world.start_enclave()
    wait_for(world.egress_works, 30, "the tunnel")
    app = app_pid(world)
    main_pid = rig.main_pid()
    pid = rig.box.host_pid(main_pid)

    # A main loop that is busy (a slow nft in a reload, here stopped outright) for longer than
    # WatchdogSec, with the data path moving: the pings come from a thread of their own, so
    # systemd keeps getting them and nothing is restarted.
    frozen = time.monotonic()
    main = StuckThread(pid)
    try:
        wait_for(lambda: int(rig.show("WatchdogTimestampMonotonic")[
            "WatchdogTimestampMonotonic"]) / 1e6 > frozen + 11, 20,
            "a ping more than WatchdogSec after the main loop stopped")
        assert world.egress_works()
    finally:
        main.release()
    assert rig.restarts() == 0 and rig.main_pid() == main_pid and rig.running()
    assert "not confirming liveness" not in rig.journal()

    timers = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()
              if (t / "comm").read_text().strip() == "wg0-timers"]
    assert len(timers) == 1, "the device's timer thread is named for the kernel (NamedThread)"
    stuck = StuckThread(timers[0])
    hung = time.monotonic()
    try:
        # Only that thread is stopped: the rest of the parent still answers, so only the
        # watchdog can tell. It is stopped with SIGABRT, after which the stopped thread must
        # be reaped by its tracer (us) before systemd sees the process end.
        stuck.reap(60)
        assert stuck.done, "the hung parent was not stopped"
    finally:
        stuck.release()
    killed = time.monotonic() - hung
    wait_for(lambda: rig.restarts() == 1 and rig.running(), 20, "the restart")
    took = rig.egress_back_within(time.monotonic(), "egress after the watchdog's restart")
    print(f"\nhung timer thread: stopped by the watchdog after {killed:.1f} s, egress back "
          f"{took:.2f} s after the restart")
    # 8 s without a tick (STALL_LIMIT), then at most WatchdogSec=10 s from the last ping.
    assert 8 <= killed <= 25

    log = rig.journal()
    assert "not confirming liveness to systemd's watchdog: interface wg0: the timer thread " \
        "has not finished a tick" in log
    assert "Watchdog timeout" in log
    # faulthandler: every thread's stack, the hung one's in the timer loop.
    assert "Fatal Python error: Aborted" in log
    assert "in _timer_loop" in log
    assert app_pid(world) == app


DAEMON_UNIT = """[Unit]
Description=wgvsock daemon test
[Service]
Type=notify
ExecStart=/usr/local/bin/wgvsock daemon -f -n unix wgt0
Environment=WGVSOCK_UNIX_DIR=/run/wgvsock-unix
"""


def test_the_daemon_says_ready_when_its_uapi_socket_answers(rig: Rig) -> None:
    box = rig.box
    # Without -f the launcher would exit once a detached process is up, and systemd, which
    # takes notifications only from the process it started, would fail the unit after its
    # start timeout without a reason: refused at once, saying what to change.
    box.run("mkdir", "-p", "/etc/systemd/system/wgvsock-parent@.service.d", check=True)
    box.run("sh", "-c", 'printf "%s\\n" "$1" > "$2"', "-", "[Service]\nExecStart=\n"
            "ExecStart=/usr/local/bin/wgvsock parent up --profile /etc/wgvsock/%i.yaml",
            "/etc/systemd/system/wgvsock-parent@.service.d/no-f.conf", check=True)
    box.systemctl("daemon-reload", check=True)
    assert box.systemctl("start", rig.unit, timeout=60).returncode != 0
    assert "which must run it in the foreground: add -f to the unit's ExecStart" in rig.journal()
    assert rig.world.parent.ip("link", "show", "wg0", check=False).returncode != 0
    box.run("sh", "-c", f"printf '%s' '{DAEMON_UNIT}' > /etc/systemd/system/wgt.service",
            check=True)  # (the rig made the directory when it installed the parent's unit)
    box.systemctl("daemon-reload", check=True)
    box.systemctl("start", "wgt.service", check=True)
    # Ready means configurable: `wg` talks to the UAPI socket at once.
    res = box.run("wg", "show", "wgt0", "listen-port", check=True)
    assert res.stdout.strip() == "0" or res.stdout.strip().isdigit()
    s = box.show("wgt.service", "ActiveState", "StatusText", "MainPID")
    assert s["ActiveState"] == "active"
    assert s["StatusText"].startswith("interface wgt0 up (unix")
    # SIGUSR1: every thread's stack to the journal, and the daemon runs on.
    box.systemctl("kill", "--signal=SIGUSR1", "--kill-who=main", "wgt.service", check=True)
    wait_for(lambda: "in _timer_loop" in box.journal("wgt.service"), 10, "the stack dump")
    assert box.show("wgt.service", "ActiveState", "MainPID") == {
        "ActiveState": "active", "MainPID": s["MainPID"]}
    box.systemctl("stop", "wgt.service", check=True)
    assert box.run("ip", "link", "show", "wgt0").returncode != 0


# What a command of the unit may do, found out from inside its sandbox: run as an ExecStartPre=,
# which systemd starts in the same sandbox as ExecStart=. One line of JSON: each attempt's
# errno name, or "ok".
PROBE = r"""
import ctypes, errno, json, mmap, os, socket, sys
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def write(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    os.unlink(path)
for d in ("/usr", "/etc", "/var", "/run", "/run/wgvsock", "/run/wireguard", "/etc/wgvsock"):
    attempt("write " + d, lambda d=d: write(d + "/wgvsock-probe"))
attempt("open /dev/net/tun", lambda: os.close(os.open("/dev/net/tun", os.O_RDWR)))
attempt("socket AF_PACKET", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close())
attempt("socket AF_VSOCK", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close())
attempt("mmap write+exec", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                           | mmap.PROT_EXEC).close())
libc = ctypes.CDLL(None, use_errno=True)
def unshare():
    if libc.unshare(0x04000000) != 0:  # CLONE_NEWUTS
        raise OSError(ctypes.get_errno(), "unshare")
attempt("unshare", unshare)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
out["CapBnd"] = status["CapBnd"].strip()
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
out["Seccomp"] = status["Seccomp"].strip()
out["umask"] = oct(os.umask(0o077))
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""

CAP_NET_BIND_SERVICE, CAP_NET_ADMIN = 10, 12
SANDBOX_CAPS = f"{(1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN):016x}"


def test_the_unit_sandboxes_the_parent(rig: Rig) -> None:
    box = rig.box
    (rig.home / "probe.py").write_text(PROBE)
    result = rig.home / "probe.json"
    box.run("sh", "-c", 'printf "%s\\n" "$1" > "$2"', "-",
            f"[Service]\nExecStartPre=/usr/bin/python3 -I {rig.home}/probe.py {result}",
            f"/etc/systemd/system/{UNIT_FILE.name}.d/probe.conf", check=True)
    box.systemctl("daemon-reload", check=True)
    start(rig)
    got = json.loads(result.read_text())
    # Everything read-only but its own directories (/etc/wgvsock is read-only in this
    # container only: the rig binds it so; ReadWritePaths= cannot open a read-only mount).
    assert got == {
        "write /usr": "EROFS", "write /etc": "EROFS", "write /var": "EROFS",
        "write /run": "EROFS", "write /run/wgvsock": "ok", "write /run/wireguard": "ok",
        "write /etc/wgvsock": "EROFS",
        "open /dev/net/tun": "ok",
        "socket AF_PACKET": "EAFNOSUPPORT", "socket AF_VSOCK": got["socket AF_VSOCK"],
        "mmap write+exec": "EPERM", "unshare": "EPERM",
        "CapBnd": SANDBOX_CAPS, "NoNewPrivs": "1", "Seccomp": "2", "umask": "0o77",
    }, got
    # Let through (EAFNOSUPPORT would be the sandbox's answer too, but this machine may have
    # no vsock at all: the kernel's own answer then).
    assert got["socket AF_VSOCK"] == "ok" or not Path("/dev/vsock").exists()
    # The parent itself, as this machine sees it.
    status = Path(f"/proc/{box.host_pid(rig.main_pid())}/status").read_text()
    assert f"CapBnd:\t{SANDBOX_CAPS}" in status and "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    # What the probe cannot see from inside.
    props = rig.show("ProtectSystem", "ProtectKernelModules", "ProtectKernelLogs",
                     "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                     "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                     "MemoryDenyWriteExecute", "SystemCallArchitectures", "DevicePolicy",
                     "RuntimeDirectoryPreserve", "PrivateMounts", "RestrictNamespaces",
                     "RestrictAddressFamilies")
    assert props == {
        "ProtectSystem": "strict", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
        "DevicePolicy": "closed", "RuntimeDirectoryPreserve": "yes", "PrivateMounts": "yes",
        "RestrictNamespaces": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_NETLINK AF_UNIX AF_VSOCK"}, props
    rig.box.systemctl("stop", rig.unit, check=True)
    assert rig.show("Result") == {"Result": "success"}


NITRO_ENV = ("[Service]\n"
             # tests/fakes/nitro-cli first on the parent's PATH; its state file where the real
             # one keeps its sockets, one of the unit's ReadWritePaths=.
             "Environment=PATH=/opt/wgvsock/src/tests/fakes:/usr/local/sbin:/usr/local/bin:"
             "/usr/sbin:/usr/bin:/sbin:/bin\n"
             "Environment=FAKE_NITRO_STATE=/run/nitro_enclaves/fake-nitro.json\n"
             "Environment=FAKE_NITRO_ENCLAVE_PROCESS=1\n")


def test_the_parent_s_services_run_in_the_sandbox(rig: Rig) -> None:
    """What test_the_unit_starts_... does not use, under the sandbox: the DNS forwarder (port
    53), the metrics exporter, and parent.enclave starting the enclave with nitro-cli (the fake,
    whose enclave process stays in the unit as the real one's does) and `down` ending it."""
    world, box = rig.world, rig.box
    start_dnsmasq(world.lab, world.internet)
    (rig.home / "app.eif").write_bytes(b"EIF" * 1000)
    text = world.profile.read_text()
    text = text.replace("    allow: [0.0.0.0/0]\n",
                        f"    allow: [0.0.0.0/0, ok.test]\n    resolver: {DNS}\n")
    text = text.replace("  ingress:\n", f"  metrics:\n    listen: 127.0.0.1:9586\n  enclave:\n"
                        f"    eif: {rig.home}/app.eif\n    cpu_count: 2\n    memory_mib: 256\n"
                        "    cid: 23\n  ingress:\n", 1)
    world.profile.write_text(text.replace("  dns: [198.51.100.53]\n", ""))
    # What the aws-nitro-enclaves-cli package makes (its tmpfiles.d and %post).
    box.run("install", "-d", "-m", "0775", "/run/nitro_enclaves", "/var/log/nitro_enclaves",
            check=True)
    box.run("sh", "-c", 'printf "%s" "$1" > "$2"', "-", NITRO_ENV,
            f"/etc/systemd/system/{UNIT_FILE.name}.d/nitro.conf", check=True)
    box.systemctl("daemon-reload", check=True)
    start(rig)

    def nitro(*args: str) -> str:
        return box.run("env", "FAKE_NITRO_STATE=/run/nitro_enclaves/fake-nitro.json",
                       "/opt/wgvsock/src/tests/fakes/nitro-cli", *args, check=True).stdout

    running = wait_for(lambda: json.loads(nitro("describe-enclaves")), 30,
                       "the parent to start the enclave with nitro-cli")
    assert running[0]["EnclaveCID"] == 23 and running[0]["State"] == "RUNNING"
    # The enclave process nitro-cli left behind is the unit's, in its sandbox.
    enclave_process = box.host_pid(running[0]["ProcessID"])
    status = Path(f"/proc/{enclave_process}/status").read_text()
    assert f"CapBnd:\t{SANDBOX_CAPS}" in status and "Seccomp:\t2" in status

    world.start_enclave()
    wait_for(world.egress_works, 30, "the tunnel")
    # The forwarder on the parent's tunnel address, port 53, asking the resolver outside.
    assert query(world.enclave, "ok.test") == {"rcode": "NOERROR",
                                               "addresses": ["198.51.100.2"]}
    assert query(world.enclave, "ok.test", proto="tcp")["addresses"] == ["198.51.100.2"]
    page = world.parent.run("curl", "-sf", "--max-time", "5", "http://127.0.0.1:9586/metrics",
                            check=True).stdout
    assert "wgvsock_peer_attested" in page, page[:500]

    rig.box.systemctl("stop", rig.unit, check=True)
    assert rig.show("Result") == {"Result": "success"}
    assert json.loads(nitro("describe-enclaves")) == []
    assert "terminate-enclave" in nitro("fake-state")

