"""The vsock transport as far as this machine allows: bind, report the port, parse and print
vsock endpoints. NEVER connect: AF_VSOCK has no loopback here, a connect() would leave the VM.

So every daemon here keeps its interface DOWN, has NO private key (it could not even build a
handshake) and NO persistent keepalive: nothing is ever sent. Binding and listening on
VMADDR_PORT_ANY is fine; vsock is not namespaced, the namespace only holds the TUN.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from wgvsock.device.uapi import uapi_set

from .daemonctl import only_pid, process_gone, sock_path
from .netlab import DAEMON, Keys, Lab, Namespace, wait_for

pytestmark = [pytest.mark.root]

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF


def _vsock_or_skip() -> None:
    """Skips unless this kernel offers AF_VSOCK stream sockets (creating one sends nothing)."""
    dev = "/dev/vsock " + ("present" if os.path.exists("/dev/vsock") else "missing")
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip(f"this Python has no socket.AF_VSOCK ({dev})")
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as e:
        pytest.skip(f"AF_VSOCK stream sockets are unavailable here: {e} ({dev})")


@pytest.fixture
def vsock_daemon(lab: Lab) -> tuple[Namespace, str]:
    _vsock_or_skip()
    ns = lab.netns("v")
    ifname = lab.ifname("v")
    lab.start_daemon(ns, ifname, "vsock")
    return ns, ifname


def _assert_down(ns: Namespace, ifname: str) -> None:
    out = ns.ip("-o", "link", "show", "dev", ifname).stdout
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",")
    assert "UP" not in flags, out


def test_binds_any_port_and_reports_it(lab: Lab, vsock_daemon: tuple[Namespace, str]) -> None:
    ns, ifname = vsock_daemon
    _assert_down(ns, ifname)
    state = lab.uapi(ifname)
    assert state["extra"]["wgvsock_network"] == "vsock"
    port = int(state["extra"]["wgvsock_port"])
    assert 0 < port < VMADDR_PORT_ANY
    # listen_port is only given when wg(8) can take it (<= 65535), and then it agrees.
    if port <= 0xFFFF:
        assert state["listen_port"] == port
    else:
        assert state["listen_port"] == 0
    # The daemon really holds that port: binding it ourselves (no connect) is refused.
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s, pytest.raises(OSError) as ei:
        s.bind((VMADDR_CID_ANY, port))
    assert ei.value.errno == errno.EADDRINUSE
    # wg(8) copes with the reply whatever the port.
    show = ns.wg("show", ifname).stdout
    assert f"interface: {ifname}" in show
    if port <= 0xFFFF:
        assert f"listening port: {port}" in show
    assert ns.wg("show", ifname, "dump").returncode == 0
    assert f"interface {ifname} up: network vsock, port {port}," in lab.log(ifname)


def test_vsock_endpoints_parse_and_print(lab: Lab, vsock_daemon: tuple[Namespace, str]) -> None:
    ns, ifname = vsock_daemon
    path = sock_path(ifname)
    p1, p2, p3, p4 = Keys(), Keys(), Keys(), Keys()

    # What wg(8) can send: the CID written as an IPv4 address (getaddrinfo reads 0.0.0.16).
    ns.wg("set", ifname, "peer", p1.public_b64, "endpoint", "0.0.0.16:5000",
          "allowed-ips", "10.0.0.16/32")
    # The seed's vsock:// form and the Go release's named forms, through raw UAPI.
    assert uapi_set(path, f"public_key={p2.public_hex}\nendpoint=vsock://16:5001\n") == 0
    assert uapi_set(path, f"public_key={p3.public_hex}\nendpoint=host(2):5002\n") == 0
    # A 32-bit vsock port: wg(8) cannot read it, so the reply leaves `endpoint` out.
    assert uapi_set(path, f"public_key={p4.public_hex}\nendpoint=vsock://4:70000\n") == 0

    _assert_down(ns, ifname)
    eps = dict(
        line.split("\t") for line in ns.wg("show", ifname, "endpoints").stdout.splitlines()
    )
    assert eps == {
        p1.public_b64: "0.0.0.16:5000",
        p2.public_b64: "0.0.0.16:5001",
        p3.public_b64: "0.0.0.2:5002",
        p4.public_b64: "(none)",
    }
    shown = {p["public_key"].hex(): p for p in lab.uapi(ifname)["peers"]}
    assert shown[p1.public_hex]["extra"]["wgvsock_endpoint"] == "vsock://16:5000"
    assert shown[p2.public_hex]["extra"]["wgvsock_endpoint"] == "vsock://16:5001"
    assert shown[p3.public_hex]["extra"]["wgvsock_endpoint"] == "vsock://2:5002"
    assert shown[p4.public_hex]["extra"]["wgvsock_endpoint"] == "vsock://4:70000"
    assert shown[p4.public_hex]["endpoint"] is None
    for p in shown.values():
        assert p["persistent_keepalive_interval"] == 0
        assert p["tx_bytes"] == 0 and p["rx_bytes"] == 0  # nothing was sent, nothing came

    # Endpoints no vsock form can mean are refused, and change nothing.
    before = ns.wg("show", ifname, "dump").stdout
    for bad in ("example.invalid:5000", "vsock://16:0", "vsock://x:1", "[::1]:5000",
                f"vsock://{VMADDR_CID_ANY}:5000", "vm(2):5000"):
        assert uapi_set(path, f"public_key={p1.public_hex}\nendpoint={bad}\n") == -errno.EINVAL
    assert ns.wg("show", ifname, "dump").stdout == before
    assert not process_gone(only_pid(ns))


def test_vsock_datagram(lab: Lab) -> None:
    _vsock_or_skip()
    # What does this kernel say to a vsock datagram socket? (Binding sends nothing.)
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_DGRAM)
    except OSError as e:
        refused: OSError | None = e
    else:
        try:
            probe.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
            refused = None
        except OSError as e:
            refused = e
        finally:
            probe.close()

    ns = lab.netns("d")
    ifname = lab.ifname("d")
    env = lab.env()
    env.pop("WGVSOCK_LOG_FILE", None)
    env.pop("LOG_LEVEL", None)  # with it, a background daemon would hold our stdout open
    for mode in ([], ["-f"]):
        res = ns.run(DAEMON, *mode, "-d", "-n", "vsock", ifname, env=env, check=False,
                     timeout=20)
        if refused is None:
            assert not mode, "the background daemon is running; -f would block"
            assert res.returncode == 0, res.stderr
            assert lab.uapi(ifname)["extra"]["wgvsock_network"] == "vsock"
            assert f"interface: {ifname}" in ns.wg("show", ifname).stdout
            return
        # The kernel refuses vsock datagrams (as here: ENODEV; Nitro: EOPNOTSUPP): exit
        # non-zero with exactly one line that says which transport and why.
        assert res.returncode != 0
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, res.stderr
        line = lines[0]
        assert "vsock datagram" in line and "SOCK_DGRAM" in line
        assert "not available" in line
        # What to do, and no Python "[Errno 19]" before the transport's own words.
        assert "use the stream transport: without -d" in line and "[Errno" not in line, line
        assert errno.errorcode[refused.errno] in line  # e.g. ENODEV
        assert ifname in line
        # Nothing left behind.
        assert not os.path.exists(sock_path(ifname))
        assert ns.ip("link", "show", "dev", ifname, check=False).returncode != 0
        # The background child may still be on its way out after reporting the failure.
        wait_for(lambda: all(process_gone(p) for p in ns.pids()), 5, "the failed daemon to exit")


def test_the_control_server_stops_on_a_vsock_listener_and_frees_its_port() -> None:
    """shutdown() does not wake accept() on an AF_VSOCK listener (the kernel answers ENOTCONN
    and wakes nobody; a TCP or Unix listener's accept returns): the parent's control server,
    closed as `parent down` or a failed `up` closes it, must still stop its accept thread and
    let go of the port, or a new listener there (the next `up` in this process) is refused
    with EADDRINUSE and the close waits out its join. Only bind and listen: no connect."""
    _vsock_or_skip()
    from wgvsock.services.control import ControlServer, Verdict

    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
    listener.listen(8)
    port = listener.getsockname()[1]
    server = ControlServer(listener, profile="t", public_key=b"P" * 32, wg_port=1,
                           verify=lambda *_: Verdict(False, reason="test"),
                           install=lambda *_: None)
    server.start()
    thread = server._thread
    # Blocked in the kernel before it is closed (not yet in its loop, it would just see the
    # stop): in accept4, or in a poll() that waits on the listener and something else.
    syscall = f"/proc/self/task/{thread.native_id}/syscall"

    def waiting() -> bool:
        with open(syscall) as f:
            return f.read().split(" ", 1)[0] in ("288", "7")  # x86-64: accept4, poll

    wait_for(waiting, 10, "the accept thread to wait for a connection")
    server.close()
    wait_for(lambda: not thread.is_alive(), 10, "the control server's accept thread to end")
    again = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        again.bind((VMADDR_CID_ANY, port))  # the port is free again
    finally:
        again.close()


def test_a_control_port_held_by_another_process_is_named() -> None:
    """vsock ports are the whole host's, not a network namespace's: another profile's parent
    (in any namespace) or a vsock-proxy may hold the control port. `parent up` then says which
    port of the profile it could not have and what to do, not a bare "[Errno 98] Address
    already in use", and closes the socket it made. Only bind and listen: no connect."""
    _vsock_or_skip()
    from types import SimpleNamespace

    from wgvsock.roles.common import RoleError, control_listener

    holder = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        holder.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
        holder.listen(1)
        port = holder.getsockname()[1]
        before = set(os.listdir("/proc/self/fd"))
        transport = SimpleNamespace(kind="vsock", control_port=port, parent_cid=3)
        with pytest.raises(RoleError) as caught:
            control_listener(transport)
        text = str(caught.value)
        assert f"control port {port}" in text and "vsock" in text, text
        assert "transport.control_port" in text, text
        assert "Address already in use" in text, text
        assert set(os.listdir("/proc/self/fd")) == before  # nothing left open
    finally:
        holder.close()
