"""Debian's wg-quick driving our daemon through WG_QUICK_USERSPACE_IMPLEMENTATION.

wg-quick first tries `ip link add IF type wireguard`; this kernel has no wireguard module, so
it falls back to the userspace program, run as `wireguard-go-vsock IF` (no other arguments:
the transport comes from WGVSOCK_NETWORK). wg-quick takes the interface name from the config
file's name, so each config is written as <lab.ifname>.conf in a private directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .daemonctl import link_exists, only_pid, process_gone, sock_path
from .netlab import VENV_BIN, Keys, Lab, Namespace, ping, wait_for

pytestmark = [pytest.mark.root]


def _wg_quick_env(lab: Lab, network: str, ifname: str) -> dict[str, str]:
    return lab.env(
        PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go-vsock",
        WGVSOCK_NETWORK=network,
        WGVSOCK_LOG_FILE=str(lab.tmp / f"{ifname}.log"),
    )


def _write_conf(lab: Lab, ifname: str, text: str) -> Path:
    d = lab.tmp / "conf"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / f"{ifname}.conf"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def _conf(keys: Keys, addr: str, port: int, peer: Keys, peer_ip: str, endpoint: str | None,
          extra: str = "") -> str:
    return (
        f"[Interface]\nAddress = {addr}/24\nPrivateKey = {keys.private_b64}\n"
        f"ListenPort = {port}\n{extra}\n[Peer]\nPublicKey = {peer.public_b64}\n"
        f"AllowedIPs = {peer_ip}/32\n" + (f"Endpoint = {endpoint}\n" if endpoint else "")
    )


def _up(lab: Lab, ns: Namespace, network: str, ifname: str, conf: Path):
    res = ns.run("wg-quick", "up", str(conf), env=_wg_quick_env(lab, network, ifname),
                 check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    # The kernel path failed and wg-quick said so before running us.
    assert "Falling back to slow userspace implementation" in res.stderr
    assert f"[#] wireguard-go-vsock {ifname}" in res.stderr
    return res


def _down_and_check(lab: Lab, ns: Namespace, network: str, ifname: str, conf: Path) -> None:
    pid = only_pid(ns)
    res = ns.run("wg-quick", "down", str(conf), env=_wg_quick_env(lab, network, ifname),
                 check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"[#] ip link delete dev {ifname}" in res.stderr
    assert not link_exists(ns, ifname)
    wait_for(lambda: process_gone(pid), 5, f"the daemon of {ifname} to exit")
    wait_for(lambda: not os.path.exists(sock_path(ifname)), 5, "the UAPI socket to go")
    assert f"{ifname}: stopped (interface {ifname} was removed)" in lab.log(ifname)


@pytest.mark.parametrize("network", ["unix", "udp"])
def test_wg_quick_pair(lab: Lab, network: str) -> None:
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    ka, kb = Keys(), Keys()
    if network == "udp":
        lab.veth(a, "192.168.78.1/24", b, "192.168.78.2/24")
        endpoint = "192.168.78.2:7402"
    else:
        endpoint = "127.0.0.1:7402"  # <WGVSOCK_UNIX_DIR>/7402.sock
    conf_a = _write_conf(lab, ia, _conf(ka, "10.98.0.1", 7401, kb, "10.98.0.2", endpoint))
    conf_b = _write_conf(lab, ib, _conf(kb, "10.98.0.2", 7402, ka, "10.98.0.1", None,
                                        extra="SaveConfig = true\n"))
    _up(lab, a, network, ia, conf_a)
    _up(lab, b, network, ib, conf_b)

    for ns, ifname, port in ((a, ia, 7401), (b, ib, 7402)):
        show = ns.wg("show", ifname).stdout
        assert f"listening port: {port}" in show
        assert lab.uapi(ifname)["extra"]["wgvsock_network"] == network
        link = ns.ip("-o", "link", "show", "dev", ifname).stdout
        assert ",UP" in link or "<UP" in link
    assert "10.98.0.1/24" in a.ip("-o", "addr", "show", "dev", ia).stdout
    if network == "udp":
        assert ":7402 " in b.run("ss", "-ulnH").stdout
        # wg-quick set MTU = route MTU to the endpoint (veth 1500) - 80.
        assert "mtu 1420" in a.ip("link", "show", "dev", ia).stdout
    else:
        assert (lab.unix_dir / "7402.sock").exists()
        # The endpoint 127.0.0.1 routes via lo (MTU 65536), so wg-quick picks 65456.
        assert "mtu 65456" in a.ip("link", "show", "dev", ia).stdout

    ping(a, "10.98.0.2")
    ping(b, "10.98.0.1")
    assert lab.wait_handshake(a, ia) > 0

    _down_and_check(lab, a, network, ia, conf_a)
    # SaveConfig: wg-quick down wrote b's running configuration back, read through our UAPI.
    _down_and_check(lab, b, network, ib, conf_b)
    saved = conf_b.read_text()
    assert "ListenPort = 7402" in saved
    assert f"PrivateKey = {kb.private_b64}" in saved
    assert f"PublicKey = {ka.public_b64}" in saved
    assert "AllowedIPs = 10.98.0.1/32" in saved
    assert "Address = 10.98.0.2/24" in saved
    if network == "unix":
        assert sorted(os.listdir(lab.unix_dir)) == []


def test_wg_quick_up_failure_cleans_up(lab: Lab) -> None:
    ns = lab.netns("f")
    ifname = lab.ifname("f")
    ka, kb = Keys(), Keys()
    # wg-quick has started our daemon and configured it when `ip address add` fails on this;
    # its error trap then deletes the interface, which must stop the daemon.
    conf = _write_conf(lab, ifname, _conf(ka, "10.98.0.300", 7501, kb, "10.98.0.2", None))
    res = ns.run("wg-quick", "up", str(conf), env=_wg_quick_env(lab, "unix", ifname),
                 check=False, timeout=60)
    assert res.returncode != 0
    assert f"[#] wireguard-go-vsock {ifname}" in res.stderr
    assert f"[#] ip link delete dev {ifname}" in res.stderr
    assert not link_exists(ns, ifname)
    wait_for(lambda: all(process_gone(p) for p in ns.pids()), 5, "the daemon to exit")
    wait_for(lambda: not os.path.exists(sock_path(ifname)), 5, "the UAPI socket to go")
    assert sorted(os.listdir(lab.unix_dir)) == []


@pytest.mark.parametrize("network", ["udp", "tcp"])
def test_wg_quick_full_tunnel_marks_the_transport_s_own_packets(lab: Lab, network: str) -> None:
    """AllowedIPs = 0.0.0.0/0: wg-quick routes everything without fwmark 51820 into the tunnel,
    and the peer's endpoint is reached by the default route. Before the transport's sockets
    carried the mark, our own UDP/TCP packets to the endpoint went into our tunnel: no
    handshake (Debian's wireguard-go marks its sockets and works)."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    ka, kb = Keys(), Keys()
    _, vb = lab.veth(a, "192.168.79.1/24", b, "192.168.79.2/24")
    b.ip("addr", "add", "203.0.113.9/32", "dev", vb)  # only by a's default route
    a.ip("route", "add", "default", "via", "192.168.79.2")
    conf_a = _write_conf(lab, ia, _conf(ka, "10.98.0.1", 7601, kb, "10.98.0.2",
                                        "203.0.113.9:7602").replace(
        "AllowedIPs = 10.98.0.2/32", "AllowedIPs = 0.0.0.0/0"))
    conf_b = _write_conf(lab, ib, _conf(kb, "10.98.0.2", 7602, ka, "10.98.0.1", None))
    _up(lab, b, network, ib, conf_b)
    res = _up(lab, a, network, ia, conf_a)
    assert "fwmark 51820" in res.stderr  # wg-quick's full-tunnel set-up ran
    assert "fwmark: 0xca6c" in a.wg("show", ia).stdout
    ping(a, "10.98.0.2")
    assert lab.wait_handshake(a, ia) > 0
    _down_and_check(lab, a, network, ia, conf_a)
    _down_and_check(lab, b, network, ib, conf_b)


def test_wg_quick_persistent_keepalive_brings_the_tunnel_up_unasked(lab: Lab) -> None:
    """wg-quick configures the peer, keepalive included, before it sets the link up. The
    keepalive must still go out once the link is up, with no traffic to start a handshake:
    a peer behind NAT, or an enclave's parent, waits for it (wireguard-go sends it when its
    device goes up). Before, nothing went out until some packet did."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    ka, kb = Keys(), Keys()
    lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
    conf_b = _write_conf(lab, ib, _conf(kb, "10.98.0.2", 7702, ka, "10.98.0.1", None))
    conf_a = _write_conf(lab, ia, _conf(ka, "10.98.0.1", 7701, kb, "10.98.0.2",
                                        "192.168.77.2:7702")
                         + "PersistentKeepalive = 1\n")
    _up(lab, b, "udp", ib, conf_b)
    _up(lab, a, "udp", ia, conf_a)
    assert lab.wait_handshake(b, ib) > 0
    _down_and_check(lab, a, "udp", ia, conf_a)
    _down_and_check(lab, b, "udp", ib, conf_b)
