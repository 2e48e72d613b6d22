"""The stock wg(8) tool (Debian's wireguard-tools) against our daemon's UAPI socket.

Every daemon here is a UDP one inside a fresh network namespace whose interface stays down, so
nothing is ever sent: these tests are about configuration, not traffic.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time

import pytest

from wgvsock.core.crypto import key_to_base64, public_key
from wgvsock.device.uapi import uapi_set

from .daemonctl import only_pid, process_gone, raw_uapi, sock_path
from .netlab import Keys, Lab, Namespace, wait_for

pytestmark = [pytest.mark.root]


def _keyfile(lab: Lab, name: str, b64: str) -> str:
    path = lab.tmp / name
    path.write_text(b64 + "\n")
    os.chmod(path, 0o600)
    return str(path)


def _daemon(lab: Lab, label: str = "a") -> tuple[Namespace, str]:
    ns = lab.netns(label)
    ifname = lab.ifname(label)
    lab.start_daemon(ns, ifname, "udp")
    return ns, ifname


def _dump(ns: Namespace, ifname: str) -> tuple[list[str], list[list[str]]]:
    lines = ns.wg("show", ifname, "dump").stdout.splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def test_wg_set_show_dump_showconf(lab: Lab) -> None:
    ns, ifname = _daemon(lab)
    me, peer = Keys(), Keys()
    psk = Keys().private_b64  # any 32 random bytes make a preshared key
    ns.wg(
        "set", ifname,
        "private-key", _keyfile(lab, "me.key", me.private_b64),
        "listen-port", "51820",
        "peer", peer.public_b64,
        "allowed-ips", "10.0.0.2/32,10.1.0.0/16,fd00::2/128",
        "endpoint", "192.0.2.7:51821",
        "persistent-keepalive", "25",
        "preshared-key", _keyfile(lab, "psk", psk),
    )

    show = ns.wg("show", ifname).stdout
    assert f"interface: {ifname}" in show
    assert f"public key: {me.public_b64}" in show
    assert "private key: (hidden)" in show
    assert "listening port: 51820" in show
    assert f"peer: {peer.public_b64}" in show
    assert "preshared key: (hidden)" in show
    assert "endpoint: 192.0.2.7:51821" in show
    assert re.search(r"allowed ips: .*10\.0\.0\.2/32", show)
    assert "fd00::2/128" in show and "10.1.0.0/16" in show
    assert "persistent keepalive: every 25 seconds" in show
    assert "latest handshake" not in show  # none happened

    dev, peers = _dump(ns, ifname)
    assert dev == [me.private_b64, me.public_b64, "51820", "off"]
    assert len(peers) == 1
    pk, ps, ep, ips, hs, rx, tx, ka = peers[0]
    assert (pk, ps, ep, hs, rx, tx, ka) == (
        peer.public_b64, psk, "192.0.2.7:51821", "0", "0", "0", "25"
    )
    assert sorted(ips.split(",")) == ["10.0.0.2/32", "10.1.0.0/16", "fd00::2/128"]

    conf = ns.wg("showconf", ifname).stdout
    assert "ListenPort = 51820" in conf
    assert f"PrivateKey = {me.private_b64}" in conf
    assert f"PublicKey = {peer.public_b64}" in conf
    assert f"PresharedKey = {psk}" in conf
    assert "Endpoint = 192.0.2.7:51821" in conf
    assert "PersistentKeepalive = 25" in conf

    # The daemon kept its own socket and nothing else in the namespace.
    assert os.path.exists(sock_path(ifname))
    assert not process_gone(only_pid(ns))


def test_an_unclamped_private_key_is_shown_clamped(lab: Lab) -> None:
    """wireguard-go and the kernel clamp a private key as they take it, so `wg show
    private-key` and `wg showconf` give the clamped key; ours gave back the bytes as sent."""
    ns, ifname = _daemon(lab)
    raw = bytes(range(0xC1, 0xE1))  # low bits of byte 0 and top bit of byte 31 set
    clamped = bytearray(raw)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    ns.wg("set", ifname, "private-key", _keyfile(lab, "raw.key", key_to_base64(raw)))
    assert ns.wg("show", ifname, "private-key").stdout.strip() == key_to_base64(bytes(clamped))
    assert ns.wg("show", ifname, "public-key").stdout.strip() == \
        key_to_base64(public_key(bytes(clamped)))
    assert f"PrivateKey = {key_to_base64(bytes(clamped))}" in ns.wg("showconf", ifname).stdout
    # The clamped form is the same key, and reads back the same.
    ns.wg("set", ifname, "private-key", _keyfile(lab, "clamped.key",
                                                 key_to_base64(bytes(clamped))))
    assert ns.wg("show", ifname, "private-key").stdout.strip() == key_to_base64(bytes(clamped))


def test_showconf_setconf_round_trip(lab: Lab) -> None:
    ns, ia = _daemon(lab)
    ib = lab.ifname("b")
    lab.start_daemon(ns, ib, "udp")
    me = Keys()
    peers = [Keys() for _ in range(3)]
    ns.wg(
        "set", ia, "private-key", _keyfile(lab, "me.key", me.private_b64), "listen-port", "40001",
        "peer", peers[0].public_b64, "allowed-ips", "10.0.0.2/32,fd00::/64",
        "endpoint", "[2001:db8::1]:51820", "persistent-keepalive", "15",
        "preshared-key", _keyfile(lab, "psk", Keys().private_b64),
        "peer", peers[1].public_b64, "allowed-ips", "10.0.1.0/24",
        "endpoint", "198.51.100.3:1",
        "peer", peers[2].public_b64,
    )
    conf_a = ns.wg("showconf", ia).stdout
    # Same listen port in the same namespace would collide; everything else is copied.
    conf_file = lab.tmp / "copy.conf"
    conf_file.write_text(conf_a.replace("ListenPort = 40001", "ListenPort = 40002"))
    ns.wg("setconf", ib, str(conf_file))
    conf_b = ns.wg("showconf", ib).stdout
    assert "ListenPort = 40002" in conf_b
    assert conf_b.replace("ListenPort = 40002", "ListenPort = 40001") == conf_a
    # setconf replaces: a second setconf with fewer peers leaves only those.
    conf_file.write_text(
        f"[Interface]\nPrivateKey = {me.private_b64}\n\n[Peer]\nPublicKey = {peers[1].public_b64}\n"
    )
    ns.wg("setconf", ib, str(conf_file))
    assert ns.wg("show", ib, "peers").stdout.split() == [peers[1].public_b64]
    assert ns.wg("show", ib, "allowed-ips").stdout.split() == [peers[1].public_b64, "(none)"]


def test_setconf_of_a_large_configuration(lab: Lab) -> None:
    """8000 peers with preshared keys and two allowed IPs each: a 1.9 MB request, which the
    UAPI's old 1 MiB cap refused (wg died of SIGPIPE without a word, nothing applied).
    wireguard-go takes it; so must we."""
    ns, ifname = _daemon(lab)
    lines = ["[Interface]", f"PrivateKey = {Keys().private_b64}"]
    for i in range(8000):
        lines += ["[Peer]", f"PublicKey = {key_to_base64(os.urandom(32))}",
                  f"PresharedKey = {key_to_base64(os.urandom(32))}",
                  f"AllowedIPs = 10.{i // 250}.{i % 250}.1/32, fd00::{i:x}/128"]
    conf = lab.tmp / "big.conf"
    conf.write_text("\n".join(lines) + "\n")
    ns.wg("setconf", ifname, str(conf), timeout=120)
    assert len(ns.wg("show", ifname, "peers").stdout.split()) == 8000
    allowed = ns.wg("show", ifname, "allowed-ips").stdout.split()
    assert "10.31.249.1/32" in allowed and "fd00::1f3f/128" in allowed


def _allowed(ns: Namespace, ifname: str) -> dict[str, str]:
    out = ns.wg("show", ifname, "allowed-ips").stdout
    return dict(line.split("\t") for line in out.splitlines())


def test_peer_and_allowed_ip_removal(lab: Lab) -> None:
    ns, ifname = _daemon(lab)
    p1, p2 = Keys(), Keys()
    ns.wg("set", ifname,
          "peer", p1.public_b64, "allowed-ips", "10.0.0.2/32,10.0.0.3/32,fd00::2/128",
          "peer", p2.public_b64, "allowed-ips", "10.0.0.9/32")

    # Removing one exact prefix takes raw UAPI: Debian's wg has no "-10.0.0.2/32" syntax.
    assert uapi_set(sock_path(ifname),
                    f"public_key={p1.public_hex}\nallowed_ip=-10.0.0.2/32\n") == 0
    ips = _allowed(ns, ifname)
    assert sorted(ips[p1.public_b64].split()) == ["10.0.0.3/32", "fd00::2/128"]
    assert ips[p2.public_b64] == "10.0.0.9/32"
    # Removing a prefix the peer does not own is not an error and changes nothing.
    assert uapi_set(sock_path(ifname),
                    f"public_key={p1.public_hex}\nallowed_ip=-10.0.0.9/32\n") == 0
    ips = _allowed(ns, ifname)
    assert ips[p2.public_b64] == "10.0.0.9/32"

    # `wg set ... allowed-ips` replaces the whole list (replace_allowed_ips=true).
    ns.wg("set", ifname, "peer", p1.public_b64, "allowed-ips", "10.0.5.0/24")
    ips = _allowed(ns, ifname)
    assert ips[p1.public_b64] == "10.0.5.0/24"
    # Taking a prefix another peer has moves it.
    ns.wg("set", ifname, "peer", p1.public_b64, "allowed-ips", "10.0.5.0/24,10.0.0.9/32")
    ips = _allowed(ns, ifname)
    assert sorted(ips[p1.public_b64].split()) == ["10.0.0.9/32", "10.0.5.0/24"]
    assert ips[p2.public_b64] == "(none)"

    ns.wg("set", ifname, "peer", p2.public_b64, "remove")
    assert ns.wg("show", ifname, "peers").stdout.split() == [p1.public_b64]
    # Removing a peer that does not exist is fine, as in wireguard-go.
    ns.wg("set", ifname, "peer", p2.public_b64, "remove")
    ns.wg("set", ifname, "peer", p1.public_b64, "remove")
    assert ns.wg("show", ifname, "peers").stdout.strip() == ""


def test_an_allowed_ip_added_again_moves_to_the_end(lab: Lab) -> None:
    """wireguard-go and the kernel move a prefix a peer is given again to the end of its
    list; `wg show` lists them in that order. Ours left it where it was."""
    ns, ifname = _daemon(lab)
    peer = Keys()
    ns.wg("set", ifname, "peer", peer.public_b64, "allowed-ips", "10.0.0.0/8,10.2.0.0/16")
    # Adding without replacing takes raw UAPI (as wgctrl sends it): Debian's wg replaces the
    # list whenever it names allowed IPs. The host bits set do not make it another prefix.
    request = f"public_key={peer.public_hex}\nallowed_ip=10.9.9.9/8\n"
    assert uapi_set(sock_path(ifname), request) == 0
    assert _allowed(ns, ifname)[peer.public_b64].split() == ["10.2.0.0/16", "10.0.0.0/8"]


def test_peer_order_is_stable(lab: Lab) -> None:
    ns, ifname = _daemon(lab)
    keys = [Keys() for _ in range(12)]
    args: list[str] = []
    for i, k in enumerate(keys):
        args += ["peer", k.public_b64, "allowed-ips", f"10.0.{i}.0/24"]
    ns.wg("set", ifname, *args)
    first = ns.wg("show", ifname, "peers").stdout.split()
    assert sorted(first) == sorted(k.public_b64 for k in keys)
    for _ in range(5):
        assert ns.wg("show", ifname, "peers").stdout.split() == first
    # Changing one peer does not move it.
    ns.wg("set", ifname, "peer", keys[5].public_b64, "persistent-keepalive", "0")
    assert ns.wg("show", ifname, "peers").stdout.split() == first
    # wg prints them in the order of the UAPI reply.
    assert [key_to_base64(p["public_key"]) for p in lab.uapi(ifname)["peers"]] == first


def test_listen_port_in_use(lab: Lab) -> None:
    ns, ifname = _daemon(lab)
    ns.wg("set", ifname, "listen-port", "41000")
    # Something else in the namespace holds UDP port 41001.
    holder = ns.popen("socat", "-u", "UDP-RECV:41001", "/dev/null")
    wait_for(lambda: ":41001 " in ns.run("ss", "-ulnH", check=False).stdout, 5, "socat on 41001")
    res = ns.wg("set", ifname, "listen-port", "41001", check=False)
    assert res.returncode != 0
    assert "Address already in use" in res.stderr
    # The daemon keeps serving, on its old port, with its socket bound there.
    assert "listening port: 41000" in ns.wg("show", ifname).stdout
    assert ":41000 " in ns.run("ss", "-ulnH", check=False).stdout
    holder.kill()
    holder.wait(5)
    # Once free, the port can be taken.
    wait_for(lambda: ":41001 " not in ns.run("ss", "-ulnH", check=False).stdout, 5, "socat gone")
    ns.wg("set", ifname, "listen-port", "41001")
    assert "listening port: 41001" in ns.wg("show", ifname).stdout


@pytest.mark.parametrize("mark", ["0x80000000", "0xffffffff"])
def test_a_fwmark_with_the_top_bit_set_is_taken(lab: Lab, mark: str) -> None:
    """wg(8), the kernel and wireguard-go take any fwmark up to 0xffffffff; ours refused
    those from 0x80000000 up with EIO ("Unable to modify interface: Input/output error"):
    Python's setsockopt takes an int only as a signed 32-bit one."""
    ns, ifname = _daemon(lab)
    ns.wg("set", ifname, "listen-port", "42100")
    res = ns.wg("set", ifname, "fwmark", mark, check=False)
    assert res.returncode == 0, res.stderr
    assert ns.wg("show", ifname, "fwmark").stdout.strip() == mark
    # The daemon's socket carries it (ss shows a socket's mark to root, in hex).
    sockets = ns.run("ss", "-uanepH", "sport", "= :42100").stdout
    assert f"fwmark:{mark}" in sockets, sockets
    # Setting it again (the socket already has it) and back to off work too.
    ns.wg("set", ifname, "fwmark", mark)
    ns.wg("set", ifname, "fwmark", "off")
    assert ns.wg("show", ifname, "fwmark").stdout.strip() == "off"
    assert "fwmark:" not in ns.run("ss", "-uanepH", "sport", "= :42100").stdout


@pytest.mark.parametrize(
    ("request_bytes", "expect"),
    [
        pytest.param(b"garbage\n\n", b"errno=-71\n\n", id="unknown-operation"),
        pytest.param(b"\x00\xff\xfe\x01binary\n\n", b"errno=-71\n\n", id="binary-operation"),
        pytest.param(b"set=1\nno equals sign\n\n", b"errno=-71\n\n", id="line-without-equals"),
        pytest.param(b"set=1\nprivate_key=" + b"zz" * 32 + b"\n\n", b"errno=-22\n\n",
                     id="bad-hex-key"),
        pytest.param(b"set=1\nprivate_key=abcd\n\n", b"errno=-22\n\n", id="short-key"),
        pytest.param(b"set=1\nfrobnicate=1\n\n", b"errno=-22\n\n", id="unknown-key"),
        pytest.param(b"set=1\nlisten_port=-1\n\n", b"errno=-22\n\n", id="negative-port"),
        pytest.param(b"set=1\npublic_key=" + b"ab" * 32 + b"\nallowed_ip=10.0.0.0/33\n\n",
                     b"errno=-22\n\n", id="bad-prefix"),
        pytest.param(b"set=1\npublic_key=" + b"ab" * 32 + b"\nendpoint=nohost\n\n",
                     b"errno=-22\n\n", id="bad-endpoint"),
        pytest.param(b"get=1\ntrailing\n\n", b"errno=-22\n\n", id="get-with-body"),
        # Whole or not at all: the key, port and new peer before the bad line stay unapplied.
        pytest.param(b"set=1\nprivate_key=" + b"4" * 64 + b"\nlisten_port=42001\npublic_key="
                     + b"cd" * 32 + b"\nallowed_ip=10.9.0.0/16\nallowed_ip=10.9.0.0/99\n\n",
                     b"errno=-22\n\n", id="bad-line-after-good-ones"),
        # "set" is no device key: wireguard-go refuses the second operation line.
        pytest.param(b"set=1\nset=1\nfwmark=2\n\n", b"errno=-22\n\n", id="set-twice"),
        pytest.param(b"set=1\nprivate_key=" + b"a" * 200_000 + b"\n\n", b"errno=-5\n\n",
                     id="huge-line"),
    ],
)
def test_bad_uapi_input(lab: Lab, request_bytes: bytes, expect: bytes) -> None:
    ns, ifname = _daemon(lab)
    peer = Keys()
    ns.wg("set", ifname, "listen-port", "42000", "peer", peer.public_b64,
          "allowed-ips", "10.0.0.2/32")
    before = ns.wg("show", ifname, "dump").stdout
    reply = raw_uapi(sock_path(ifname), request_bytes)
    assert reply.startswith(expect), reply[:200]
    # Nothing was applied (the bad-prefix request named a new peer: it must not exist).
    assert ns.wg("show", ifname, "dump").stdout == before
    assert not process_gone(only_pid(ns))


def test_garbage_clients_do_not_disturb_others(lab: Lab) -> None:
    ns, ifname = _daemon(lab)
    path = sock_path(ifname)
    # A client that connects and says nothing, one that sends half a line and stays, one that
    # hangs up mid-request: none of them may block wg(8) or hurt the daemon.
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(path)
    half = socket.socket(socket.AF_UNIX)
    half.connect(path)
    half.sendall(b"set=1\nlisten_po")
    with socket.socket(socket.AF_UNIX) as gone:
        gone.connect(path)
        gone.sendall(b"set=1\nlisten_port=43000\n")  # no blank line, then EOF: applied
    try:
        wait_for(lambda: "listening port: 43000" in ns.wg("show", ifname).stdout, 5,
                 "the EOF-terminated set to apply")
        # Two transactions on one connection are served in turn.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"set=1\nlisten_port=43001\n\nget=1\n\n")
            buf = b""
            while buf.count(b"\n\n") < 2:
                chunk = s.recv(65536)
                assert chunk, buf
                buf += chunk
        first, second = buf.split(b"\n\n")[:2]
        assert first == b"errno=0"
        assert b"listen_port=43001" in second and second.endswith(b"errno=0")
    finally:
        idle.close()
        half.close()
    assert "listening port: 43001" in ns.wg("show", ifname).stdout


def test_a_name_being_resolved_holds_up_no_other_client(lab: Lab) -> None:
    """An endpoint given as a name is resolved by the daemon (wireguard-go takes only
    literals). Before: that happened under the lock every UAPI transaction takes, so while the
    resolver waited for a nameserver that does not answer, `wg show` (and every other client)
    waited with it, up to the resolver's timeout."""
    from .test_enclave_outside import private_resolv_conf

    ns = lab.netns("a")
    ifname = lab.ifname("a")
    # The nameserver is across a veth whose other end has no address: queries leave and
    # nothing ever answers.
    ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    ns.ip("addr", "add", "10.77.0.1/24", "dev", "d0")
    ns.ip("neigh", "add", "10.77.0.53", "lladdr", "02:00:00:00:00:53", "dev", "d0")
    for dev in ("d0", "d1"):
        ns.ip("link", "set", dev, "up")
    peer = Keys()
    with private_resolv_conf(ns, "nameserver 10.77.0.53\noptions timeout:5 attempts:1\n"):
        lab.start_daemon(ns, ifname, "udp")

        def sent() -> int:
            return int(ns.run("cat", "/sys/class/net/d0/statistics/tx_packets").stdout)

        before = sent()
        result: list[int] = []
        setter = threading.Thread(target=lambda: result.append(uapi_set(
            sock_path(ifname), f"public_key={peer.public_hex}\nendpoint=peer.example:51820\n",
            timeout=30)))
        setter.start()
        try:
            wait_for(lambda: sent() > before, 5, "the daemon to ask the nameserver")
            start = time.monotonic()
            ns.wg("show", ifname)
            assert time.monotonic() - start < 2
        finally:
            setter.join(30)
    # The name never resolved: the set is refused as wireguard-go refuses a name.
    assert result == [-errno.EINVAL]
