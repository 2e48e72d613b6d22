"""What both roles derive from a profile: sockets, endpoints, the device's first config."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable

from ..conn.bind import vsock_connect_error
from ..conn.endpoint import VMADDR_CID_ANY, Endpoint
from ..conn.unixsock import remove_stale, socket_dir
from ..device.device import Device
from ..device.uapi import DEFAULT_RUN_DIR, DeviceConfig, PeerConfig

ENV_RUN_DIR = "WGVSOCK_RUN_DIR"
ENV_STATE_DIR = "WGVSOCK_STATE_DIR"
DEFAULT_STATE_DIR = "/run/wgvsock"


class RoleError(Exception):
    """A problem the user can fix; its text says what and how."""


def named(name: str) -> str:
    """How a message names a profile: "profile 'demo'". Alone, the name reads as the
    program's own word or as its name: `make demo`'s profile is called demo, and
    "demo: nothing to remove" looked like the demo saying it."""
    return f"profile '{name}'"


def run_dir() -> str:
    return os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR


def state_dir() -> str:
    return os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR


def unix_socket_path(directory: str, port: int) -> str:
    """The Unix stand-in names sockets by port, as the unix transport does."""
    return os.path.join(directory, f"{port}.sock")


def parent_wg_endpoint(transport, port: int) -> Endpoint:
    """Where the enclave sends WireGuard messages for the parent."""
    if transport.kind == "vsock":
        return Endpoint("vsock", transport.parent_cid, port)
    if transport.kind == "unix":
        return Endpoint("unix", unix_socket_path(transport.path, port), port)
    return Endpoint("inet", str(transport.host), port)


def _inet_family(host: object) -> socket.AddressFamily:
    """transport.host's family: the profile takes an IPv6 address as well as an IPv4 one."""
    return socket.AF_INET6 if ":" in str(host) else socket.AF_INET


def control_listener(transport) -> socket.socket:
    """The parent's control socket. Its Unix form lives beside the WireGuard socket.
    RoleError, naming the port, when it cannot be had."""
    port = transport.control_port
    if transport.kind == "unix":
        socket_dir(transport.path)
        path = unix_socket_path(transport.path, port)
        # A dead parent's is removed. One that answers is another running parent's (another
        # profile given the same path and port: this profile's own `up` refuses while one
        # runs): taking its place would hand that parent's enclave to this one.
        if not remove_stale(path):
            raise RoleError(f"{path} is another running parent's control socket: give this "
                            "profile a transport.path of its own, or another "
                            "transport.control_port")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elif transport.kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    else:
        sock = socket.socket(_inet_family(transport.host), socket.SOCK_STREAM)
    try:
        if transport.kind == "vsock":
            sock.bind((VMADDR_CID_ANY, port))
        elif transport.kind == "unix":
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Only where the enclave reaches us: anyone who can connect may try to register.
            sock.bind((str(transport.host), port))
        sock.listen(8)
    except OSError as e:
        sock.close()
        raise RoleError(port_refused(transport, "control_port", e.errno,
                                     e.strerror or str(e))) from None
    return sock


def port_refused(transport, key: str, code: int | None, said: str) -> str:
    """Why the parent cannot listen on its transport.KEY ("port", "control_port"), which the
    kernel refused with errno CODE (its words: SAID), and what to do."""
    port = getattr(transport, key)
    what = "the control port" if key == "control_port" else "the WireGuard port"
    if code == errno.EADDRINUSE:
        # vsock ports are the whole host's, whatever network namespace binds them: another
        # profile's parent or a vsock-proxy may hold this one.
        fix = (" (another profile's `parent up`"
               + (", a vsock-proxy" if transport.kind == "vsock" else "")
               + f"?): free it, or give this profile another transport.{key}"
               + (" or transport.path" if transport.kind == "unix" else ""))
    elif code == errno.EACCES and transport.kind != "unix" and port < 1024:
        # vsock reserves the ports below 1024 as TCP does: a parent with CAP_NET_ADMIN only
        # may not bind them.
        fix = (": a port below 1024 needs root (CAP_NET_BIND_SERVICE): run `parent up` as "
               f"root, or give this profile a transport.{key} of 1024 or above")
    elif code == errno.EADDRNOTAVAIL and transport.kind == "tcp":
        fix = (f": {transport.host} is no address of this machine's (in this network "
               "namespace): check transport.host")
    elif transport.kind == "unix":
        fix = f": check transport.path and transport.{key}"
    else:
        fix = f": check transport.{key}" + ("" if transport.kind == "vsock"
                                            else " and transport.host")
    return f"cannot listen on {what} {port} ({transport.kind}): {said}{fix}"


def control_address(transport) -> str:
    """Where the enclave dials the parent's control port, as an operator reads it."""
    if transport.kind == "vsock":
        return f"vsock CID {transport.parent_cid} port {transport.control_port}"
    if transport.kind == "unix":
        return unix_socket_path(transport.path, transport.control_port)
    return f"{transport.kind} {transport.host} port {transport.control_port}"


def dial_control(transport, timeout: float = 5.0) -> socket.socket:
    """The enclave's connection to the parent's control port (on Nitro: vsock to CID 3)."""
    port = transport.control_port
    if transport.kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        address: object = (transport.parent_cid, port)
    elif transport.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = unix_socket_path(transport.path, port)
    else:
        sock = socket.socket(_inet_family(transport.host), socket.SOCK_STREAM)
        address = (str(transport.host), port)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError as e:
        sock.close()
        if transport.kind == "vsock":
            raise vsock_connect_error(e) from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


def configure(device: Device, **kw) -> None:
    """Applies a UAPI-style configuration in-process, through the same code `wg set` uses."""
    peers = kw.pop("peers", [])
    device.uapi_set(DeviceConfig(peers=[PeerConfig(**p) for p in peers], **kw))


def wait_until(predicate: Callable[[], bool], timeout: float, stop: Callable[[], bool]) -> bool:
    """Polls an in-process condition; used where no event exists to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if stop() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def is_alive(pid: int) -> bool:
    """Whether `pid` is a live wgvsock process. After a crash and a reboot-free while, the pid
    in a state file may belong to something else: never signal that."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno != errno.EPERM:
            return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"wgvsock" in cmdline
