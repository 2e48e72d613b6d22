"""Our daemon's UAPI beside Debian's wireguard-go, the reference: the same `wg` commands to
both, each in a namespace of its own, must give the same exit codes and the same `wg show
dump` and `wg showconf`.

What differs on purpose is left out here (uapi.py's docstring lists it): endpoints given by
name or with port 0, IPv6 zones and v4-mapped endpoints, and sets refused whole. Peers are
compared in sorted order: wireguard-go lists them from a Go map, in no fixed order.
"""

from __future__ import annotations

import os

import pytest

from .netlab import Keys, Lab, Namespace

pytestmark = [pytest.mark.root]


def _canonical(text: str, showconf: bool) -> str:
    """TEXT with its peers sorted (their allowed IPs keep their order: both keep the order they
    were added in)."""
    if showconf:
        interface, *peers = text.split("\n\n")
        return "\n\n".join([interface, *sorted(p.strip("\n") for p in peers)])
    device, *peers = text.splitlines()
    return "\n".join([device, *sorted(peers)])


def test_wg_commands_leave_both_daemons_alike(lab: Lab) -> None:
    ref_ns, ours_ns = lab.netns("r"), lab.netns("o")
    ref_if, ours_if = lab.ifname("r"), lab.ifname("o")
    lab.start_wireguard_go(ref_ns, ref_if)
    lab.start_daemon(ours_ns, ours_if, "udp")

    def file(name: str, text: str) -> str:
        path = lab.tmp / name
        path.write_text(text)
        os.chmod(path, 0o600)
        return str(path)

    me, psk = Keys(), Keys().private_b64
    peers = [Keys() for _ in range(300)]
    p0, p1, p2 = (k.public_b64 for k in peers[:3])
    many_peers = [a for i, k in enumerate(peers) for a in (
        "peer", k.public_b64, "allowed-ips", f"10.{i // 250}.{i % 250}.0/24",
        "endpoint", f"192.0.2.{i % 250 + 1}:{1000 + i}")]
    many_ips = ",".join(f"172.{16 + i // 250}.{i % 250}.0/24" for i in range(1000))
    conf = f"[Interface]\nPrivateKey = {me.private_b64}\nListenPort = 12347\nFwMark = 0x20\n\n"
    for i, k in enumerate(peers[:5]):
        conf += (f"[Peer]\nPublicKey = {k.public_b64}\nAllowedIPs = 10.{i}.0.0/16, fd0{i}::/64\n"
                 f"Endpoint = 198.51.100.{i + 1}:{2000 + i}\nPersistentKeepalive = {i * 10}\n\n")
    sync = (f"[Interface]\nListenPort = 12348\n\n[Peer]\nPublicKey = {p0}\n"
            f"AllowedIPs = 10.9.0.0/16, 0.0.0.0/0\n\n[Peer]\nPublicKey = {peers[11].public_b64}\n"
            "Endpoint = [2001:db8::5]:9\n")
    commands: list[tuple[str, ...]] = [
        ("set", "IF", "private-key", file("me.key", me.private_b64), "listen-port", "12345"),
        ("set", "IF", "listen-port", "23456"),
        ("set", "IF", "listen-port", "abc"),
        ("set", "IF", "fwmark", "0x10"),
        ("set", "IF", "fwmark", "0xffffffff"),
        ("set", "IF", "fwmark", "0x100000000"),
        ("set", "IF", "fwmark", "off"),
        ("set", "IF", *many_peers),
        ("set", "IF", "peer", p0, "allowed-ips", many_ips),
        ("set", "IF", "peer", p0, "allowed-ips", "10.200.0.0/16,fd00::/8"),
        # Host bits set: both keep the network.
        ("set", "IF", "peer", p1, "allowed-ips", "10.252.3.4/16,fd00:1::5/32,10.253.1.1/0"),
        ("set", "IF", "peer", p1, "allowed-ips", "10.0.0.1/33"),
        # The default routes move between peers; in one set the last peer named wins.
        ("set", "IF", "peer", p1, "allowed-ips", "0.0.0.0/0,::/0"),
        ("set", "IF", "peer", p2, "allowed-ips", "0.0.0.0/0"),
        ("set", "IF", "peer", p1, "allowed-ips", "10.250.0.0/16",
         "peer", p2, "allowed-ips", "10.250.0.0/16,10.251.0.0/16,10.251.1.0/24"),
        ("set", "IF", "peer", p0, "preshared-key", file("psk", psk)),
        ("set", "IF", "peer", p1, "preshared-key", file("psk", psk)),
        ("set", "IF", "peer", p1, "preshared-key", "/dev/null"),
        ("set", "IF", "peer", p0, "persistent-keepalive", "65535"),
        ("set", "IF", "peer", p1, "persistent-keepalive", "25"),
        ("set", "IF", "peer", p1, "persistent-keepalive", "off"),
        ("set", "IF", "peer", p2, "persistent-keepalive", "65536"),
        ("set", "IF", "peer", p2, "endpoint", "[2001:db8::1]:51820"),
        ("set", "IF", *[a for k in peers[100:250] for a in ("peer", k.public_b64, "remove")]),
        ("set", "IF", "private-key", "/dev/null"),
        ("setconf", "IF", file("c1.conf", conf)),
        ("addconf", "IF", file("c2.conf", f"[Peer]\nPublicKey = {peers[10].public_b64}\n"
                                          "AllowedIPs = 10.0.0.0/16\n")),
        ("syncconf", "IF", file("c3.conf", sync)),
        ("syncconf", "IF", file("c1.conf", conf)),
    ]

    def run(ns: Namespace, ifname: str, args: tuple[str, ...]) -> tuple[int, str]:
        res = ns.wg(*[ifname if a == "IF" else a for a in args], check=False, timeout=60)
        return res.returncode, res.stderr.replace(ifname, "IF")

    def state(ns: Namespace, ifname: str) -> tuple[str, str]:
        return (_canonical(ns.wg("show", ifname, "dump").stdout, showconf=False),
                _canonical(ns.wg("showconf", ifname).stdout, showconf=True))

    most_peers = most_ips = 0
    for args in commands:
        what = " ".join(args)[:120]
        assert run(ours_ns, ours_if, args) == run(ref_ns, ref_if, args), what
        dump, showconf = state(ours_ns, ours_if)
        assert (dump, showconf) == state(ref_ns, ref_if), what
        most_peers = max(most_peers, dump.count("\n"))
        most_ips = max(most_ips, showconf.count("/"))
    # The large sets were taken, not refused by both alike.
    assert most_peers == 300 and most_ips > 1000
