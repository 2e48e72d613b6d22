"""The Go seed (wireguard-go-vsock v0.2.5, `-n vsock`) and our daemon over real AF_VSOCK
(CID 1, vsock_loopback), each in its own network namespace: the mixed deployment the drop-in
promises (the seed on the parent and ours in the enclave, or the reverse), on vsock itself.
tests/net/test_seed.py covers the same pair over the seed's TCP framing, the only network the
seed may use outside this guest.

Our daemon keeps segmentation offload on, so it sends its capability hello when it dials: the
seed must ignore it and get only MTU-sized packets.

The seed names an accepted connection's peer in the Go release's form `local(1):2323982615`,
which `wg show` (wireguard-tools 1.0.20210914) cannot parse: it dies with SIGSEGV on such an
interface. So the seed's counters are read over its UAPI socket here, and `wgvsock status`
must read that form.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.net.netlab import SLOWDOWN, Lab, Namespace, connect_pair, ping
from tests.net.test_roles import WGVSOCK
from wgvsock.device.tun import NATIVE_SEGMENTATION

from .traffic import copy_through, wait_counters_agree

pytestmark = [pytest.mark.root, pytest.mark.guest]

LOOPBACK_CID = 1
# The seed takes 16-bit vsock ports only (its README); ours take 32-bit ones too.
SEED_PORT, OURS_PORT = 50301, 50302
SEED_TUN, OURS_TUN = "10.99.0.1", "10.99.0.2"


def _uapi_counters(lab: Lab) -> Callable[[Namespace, str], tuple[int, int]]:
    def read(ns: Namespace, ifname: str) -> tuple[int, int]:
        (peer,) = lab.uapi(ifname)["peers"]
        return peer["rx_bytes"], peer["tx_bytes"]

    return read


def _status(lab: Lab, ns: Namespace, ifname: str) -> dict:
    # --timeout: see STATUS_WAIT in test_vsock_roles.py.
    res = ns.run(WGVSOCK, "status", "--once", "--json", "--timeout", f"{15 * SLOWDOWN:g}",
                 ifname, env=lab.env(), timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    (iface,) = json.loads(res.stdout)["interfaces"]
    return iface


@pytest.mark.parametrize("listener", ["seed", "ours"])
def test_seed_and_ours_over_vsock(lab: Lab, seed: Path, listener: str) -> None:
    s_ns, o_ns = lab.netns("s"), lab.netns("o")
    s_if, o_if = lab.ifname("s"), lab.ifname("o")
    lab.start_seed(s_ns, s_if, seed, network="vsock")
    lab.start_daemon(o_ns, o_if, "vsock")
    if listener == "seed":
        # Ours dials the seed in the IPv4-CID form, the one wg(8) can send.
        connect_pair(lab, o_ns, o_if, f"0.0.0.{LOOPBACK_CID}:{SEED_PORT}", s_ns, s_if, None,
                     b_port=SEED_PORT, a_tun=OURS_TUN, b_tun=SEED_TUN)
        ping(o_ns, SEED_TUN)
        ping(s_ns, OURS_TUN)
    else:
        connect_pair(lab, s_ns, s_if, f"0.0.0.{LOOPBACK_CID}:{OURS_PORT}", o_ns, o_if, None,
                     b_port=OURS_PORT, a_tun=SEED_TUN, b_tun=OURS_TUN)
        ping(s_ns, OURS_TUN)
        ping(o_ns, SEED_TUN)

    # Both ways whole, and what one side sent the other received, byte for byte: nothing of
    # ours (the hello, a super-packet) was counted by us and refused by the seed.
    copy_through(lab, o_ns, s_ns, SEED_TUN, 4 << 20)
    copy_through(lab, s_ns, o_ns, OURS_TUN, 4 << 20)
    wait_counters_agree(o_ns, o_if, s_ns, s_if, read=_uapi_counters(lab))
    # The seed sent no hello: we cut super-packets in C for it (a compiled build).
    assert lab.uapi(o_if)["extra"]["wgvsock_tun_offload"] == ("on" if NATIVE_SEGMENTATION
                                                               else "off")

    # Each side's `wgvsock status` names the other by vsock CID and port: the dialler's view
    # is the listener's port, the listener's view the dialler's CID (and its ephemeral port).
    ours, theirs = _status(lab, o_ns, o_if), _status(lab, s_ns, s_if)
    assert ours["network"] == theirs["network"] == "vsock", (ours, theirs)
    (ours_peer,), (seed_peer,) = ours["peers"], theirs["peers"]
    assert ours_peer["cid"] == seed_peer["cid"] == LOOPBACK_CID, (ours_peer, seed_peer)
    if listener == "seed":
        assert ours_peer["endpoint"] == f"vsock://{LOOPBACK_CID}:{SEED_PORT}"
        assert seed_peer["endpoint"].startswith(f"vsock://{LOOPBACK_CID}:"), seed_peer
    else:
        assert seed_peer["endpoint"] == f"vsock://{LOOPBACK_CID}:{OURS_PORT}", seed_peer
        assert ours_peer["endpoint"].startswith(f"vsock://{LOOPBACK_CID}:"), ours_peer
    # wg(8) reads our side whatever the direction (ours prints only forms it can parse).
    assert o_ns.wg("show", o_if, "dump").returncode == 0
