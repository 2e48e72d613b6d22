"""`wgvsock parent up|down|doctor`: the EC2 host's side of one profile.

`up` creates the WireGuard interface, NAT and ingress rules and the control listener; the
enclave registers its key over the control channel and becomes the profile's one peer.
Everything `up` makes is recorded in a state file so `down` can remove it even after a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import firewall, netconf
from ..conn import make_bind
from ..control import ControlServer, Verdict
from ..core.crypto import KeyFormatError, generate_private_key, key_from_base64, key_to_base64
from ..device import Device
from .common import (
    configure,
    control_listener,
    is_alive,
    run_dir,
    state_dir,
    unix_socket_path,
)

log = logging.getLogger("wgvsock.parent")


class RoleError(Exception):
    """A problem the user can fix; its text says what and how."""


# -- checks ----------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here
    detail: str


def local_checks(profile) -> list[Check]:
    checks = [
        Check("root", os.geteuid() == 0,
              "running as root" if os.geteuid() == 0 else "run as root (or with CAP_NET_ADMIN)"),
        Check("TUN device", os.path.exists("/dev/net/tun"),
              "/dev/net/tun present" if os.path.exists("/dev/net/tun")
              else "/dev/net/tun missing: load the tun module (modprobe tun)"),
        Check("nftables", shutil.which("nft") is not None,
              "nft found" if shutil.which("nft") else "nft not found: apt-get install nftables"),
    ]
    if profile.transport.kind == "vsock":
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
            checks.append(Check("vsock", True, "AF_VSOCK available"))
        except (OSError, AttributeError) as e:
            checks.append(Check("vsock", False, f"AF_VSOCK unavailable ({e}): on EC2, load "
                                "vsock_loopback/vhost_vsock or install aws-nitro-enclaves-cli"))
    else:
        checks.append(Check("vsock", None, f"transport is {profile.transport.kind}"))
    if profile.parent.enclave is not None:
        from ..nitro import launch_checks

        checks += [Check(*c) for c in launch_checks(profile.parent.enclave)]
    return checks


# -- keys ------------------------------------------------------------------------------------


def load_parent_key(spec: str) -> bytes:
    if spec.startswith(("ssm:", "secretsmanager:")):
        from .. import aws

        try:
            return aws.load_private_key(spec)
        except aws.AWSError as e:
            raise RoleError(f"parent key {spec}: {e}") from e
    path = Path(spec)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_to_base64(generate_private_key()) + "\n")
        log.info("created a new private key at %s", path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise RoleError(f"private key {path} is readable by others (mode {mode:o}): "
                        f"chmod 600 {path}")
    try:
        return key_from_base64(path.read_text())
    except KeyFormatError as e:
        raise RoleError(f"private key {path}: {e} (expected the output of `wg genkey`)") from e
    except OSError as e:
        raise RoleError(f"private key {path}: {e.strerror}") from e


# -- attestation policy ------------------------------------------------------------------------


def make_verifier(profile):
    policy = profile.attestation

    def verify(public_key: bytes, document: bytes | None, nonce: bytes) -> Verdict:
        if document is None:
            if policy.require:
                return Verdict(False, reason="the profile requires attestation and the enclave "
                                             "sent no attestation document")
            return Verdict(True, attested=False)
        try:
            from ..attestation import verify_enclave
        except ImportError:
            if policy.require:
                return Verdict(False, reason="the profile requires attestation, which this "
                                             "version cannot verify yet")
            return Verdict(True, attested=False, reason="attestation document not verified")
        return verify_enclave(document, public_key=public_key, nonce=nonce, policy=policy)

    return verify


# -- state -----------------------------------------------------------------------------------


@dataclass
class State:
    name: str
    pid: int
    interface: str
    profile: str
    forwarding: dict = field(default_factory=dict)
    sockets: list[str] = field(default_factory=list)
    enclave: dict = field(default_factory=dict)  # the enclave `up` started: id, cid, name

    @staticmethod
    def path_for(name: str) -> Path:
        return Path(state_dir()) / f"{name}.json"

    def save(self) -> None:
        path = self.path_for(self.name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, name: str) -> State | None:
        try:
            return cls(**json.loads(cls.path_for(name).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise RoleError(f"state file {cls.path_for(name)} is corrupt ({e}); remove it and "
                            "run `wgvsock parent down` again") from e


# -- the role --------------------------------------------------------------------------------


class Parent:
    def __init__(self, profile) -> None:
        self.profile = profile
        self.device: Device | None = None
        self.control: ControlServer | None = None
        self.stopped = threading.Event()
        self._forwarding: dict = {}
        self._table = False
        self._sockets: list[str] = []
        self.enclave_key: bytes | None = None
        self.supervisor = None  # nitro.EnclaveSupervisor when the profile starts the enclave
        self._state: State | None = None
        self.verdict: Verdict | None = None

    def spec(self) -> firewall.FirewallSpec:
        p = self.profile
        egress_if = p.parent.egress.interface or netconf.default_route_interface()
        return firewall.FirewallSpec(
            name=p.name,
            tunnel_interface=p.interface,
            enclave_addresses=[a.ip for a in p.enclave.addresses],
            egress_nat=p.parent.egress.nat,
            egress_interface=egress_if,
            allow=list(p.parent.egress.allow),
            deny=list(p.parent.egress.deny),
            ingress=list(p.parent.ingress),
        )

    def start(self) -> None:
        p = self.profile
        t = p.transport
        failed = [c for c in local_checks(p) if c.ok is False]
        if failed:
            raise RoleError("; ".join(f"{c.name}: {c.detail}" for c in failed))
        key = load_parent_key(p.parent.private_key)
        try:
            bind = make_bind(t.kind, False, unix_dir=t.path if t.kind == "unix" else None)
            self.device = Device(p.interface, bind, mtu=p.mtu, run_dir=run_dir())
            self.device.start()
            configure(self.device, private_key=key, listen_port=t.port)
            if t.kind == "unix":
                self._sockets.append(unix_socket_path(t.path, t.port))
            netconf.add_addresses(p.interface, p.parent.addresses)
            netconf.link_up(p.interface, p.mtu)
            self._route_enclave()
            v6 = any(a.version == 6 for a in p.enclave.addresses)
            self._forwarding = firewall.enable_forwarding(ipv6=v6)
            firewall.apply(self.spec())
            self._table = True
            listener = control_listener(t)
            if t.kind == "unix":
                self._sockets.append(unix_socket_path(t.path, t.control_port))
            from ..core.crypto import public_key

            self.control = ControlServer(
                listener, profile=p.name, public_key=public_key(key), wg_port=t.port,
                verify=make_verifier(p), install=self._install_enclave,
            )
            self.control.start()
            self._state = State(p.name, os.getpid(), p.interface, p.path, self._forwarding,
                                self._sockets)
            self._state.save()
            self._start_enclave()
        except BaseException:
            self.close()
            raise
        log.info("parent %s up on %s (%s port %d, control %d)", p.name, p.interface, t.kind,
                 t.port, t.control_port)

    def _route_enclave(self) -> None:
        # The parent's own address usually covers the enclave's (same subnet); only prefixes
        # outside it need a route.
        p = self.profile
        own = [a.network for a in p.parent.addresses]
        extra = [a.network if a.network.prefixlen == a.max_prefixlen else
                 type(a.network)(f"{a.ip}/{a.max_prefixlen}")
                 for a in p.enclave.addresses if not any(a.ip in n for n in own)]
        if extra:
            netconf.add_routes(p.interface, extra)

    def _install_enclave(self, public_key: bytes, verdict: Verdict) -> None:
        assert self.device is not None
        allowed = [
            (type(a.network)(f"{a.ip}/{a.max_prefixlen}"), True)
            for a in self.profile.enclave.addresses
        ]
        # The profile has exactly one enclave: a new key (a restarted enclave) replaces the
        # peer; the same key (only the control connection was new) keeps its session.
        if public_key != self.enclave_key:
            configure(self.device, replace_peers=True,
                      peers=[{"public_key": public_key, "allowed_ips": allowed}])
        self.enclave_key, self.verdict = public_key, verdict
        self.device.extra_status = {
            "wgvsock_profile": self.profile.name,
            "wgvsock_role": "parent",
            "wgvsock_attested": "true" if verdict.attested else "false",
        }

    def _start_enclave(self) -> None:
        """With `parent.enclave` in the profile, start the enclave and keep it running."""
        if self.profile.parent.enclave is None:
            return
        from ..nitro import EnclaveSupervisor, NitroCli, enclave_name

        def started(info) -> None:
            if self._state is not None and not self.stopped.is_set():
                self._state.enclave = {"id": info.enclave_id, "cid": info.cid,
                                       "name": info.name}
                self._state.save()

        self.supervisor = EnclaveSupervisor(NitroCli(), self.profile.parent.enclave,
                                            enclave_name(self.profile.name), started, log)
        self.supervisor.start()

    def close(self) -> None:
        self.stopped.set()
        if self.supervisor is not None:
            self.supervisor.stop()  # terminates the enclave it started
            self.supervisor = None
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._table:
            firewall.remove(self.profile.name)
            self._table = False
        if self._forwarding:
            firewall.restore_forwarding(self._forwarding)
            self._forwarding = {}
        if self.device is not None:
            self.device.close()
            self.device = None
        for path in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # Only our own: a second `up` that failed must not delete the running one's record.
        try:
            state = State.load(self.profile.name)
        except RoleError:
            state = None
        if state is not None and state.pid == os.getpid():
            State.path_for(self.profile.name).unlink(missing_ok=True)


def run_up(profile, ready_fd: int | None) -> int:
    from ..daemon import report_ready

    parent = Parent(profile)
    try:
        parent.start()
    except (RoleError, OSError, ValueError) as e:
        msg = f"parent up {profile.name}: {e}"
        log.error("%s", msg)
        report_ready(ready_fd, msg)
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        parent.stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    failed = False
    try:
        report_ready(ready_fd)
        while not parent.stopped.wait(1.0):
            if parent.device is not None and parent.device.wait(0):
                log.error("parent %s: %s", profile.name, parent.device.stop_reason)
                failed = True
                break
    finally:
        parent.close()
    # Stopping on its own is a failure: the unit's Restart=on-failure then brings it back.
    return 1 if failed else 0


def already_up(profile) -> int | None:
    state = State.load(profile.name)
    if state is not None and is_alive(state.pid):
        return state.pid
    return None


def down(profile) -> list[str]:
    """Stops a running parent and removes everything `up` made. Returns what it did."""
    done: list[str] = []
    state = State.load(profile.name)
    if state is not None and is_alive(state.pid):
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while is_alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_alive(state.pid):
            os.kill(state.pid, signal.SIGKILL)
            done.append(f"killed pid {state.pid} (did not stop within 15 s)")
        else:
            done.append(f"stopped pid {state.pid}")
    # Whatever a crashed `up` may have left behind:
    if profile.parent.enclave is not None:
        from ..nitro import NitroCli, NitroError, enclave_name, terminate_leftovers

        known = [state.enclave["id"]] if state is not None and state.enclave.get("id") else []
        try:
            done += terminate_leftovers(NitroCli(), enclave_name(profile.name), known)
        except NitroError as e:
            if known or shutil.which("nitro-cli"):  # silent when there is nothing to look for
                done.append(f"could not check for a leftover enclave: {e}")
    if firewall.exists(profile.name):
        firewall.remove(profile.name)
        done.append(f"removed nftables table for {profile.name}")
    if state is not None and state.forwarding:
        firewall.restore_forwarding(state.forwarding)
    if netconf.interface_exists(profile.interface):
        netconf.delete_interface(profile.interface)
        done.append(f"deleted interface {profile.interface}")
    sockets = list(state.sockets) if state else []
    sockets.append(os.path.join(run_dir(), f"{profile.interface}.sock"))
    for path in sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            done.append(f"removed {path}")
    with contextlib.suppress(FileNotFoundError):
        State.path_for(profile.name).unlink()
        done.append("removed state file")
    return done
