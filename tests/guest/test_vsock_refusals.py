"""What real vsock says where the Unix and TCP stand-ins say something else, in this process
(no daemons: seconds of TCG), found in the QEMU guest (Linux 6.1, vsock_loopback):

- A vsock datagram socket: socket() itself fails, ENODEV. In Linux 6.1 only VMware's VMCI
  transport offers vsock datagrams (not virtio, vhost, Hyper-V or the loopback); the seed's
  README says "you should see ENODEV", Nitro answers EOPNOTSUPP. The host's kernel says the
  same (tests/net/test_vsock.py).
- A connect() nobody takes: the peer's reset, ECONNRESET ("Connection reset by peer", which
  reads as a connection made and then dropped), where TCP and Unix say ECONNREFUSED.
- A connect() to a CID that no transport of the kernel reaches (here every CID but 1 and 2,
  there being no virtio-vsock device): ENODEV, "No such device". The enclave's "parent never
  answered" error was proved only with a stand-in dial raising OSError(19) before.

Each is said in vsock's words by the stream bind's dialler (its log and status) and by the
enclave's control dial (its log and `enclave up`'s error), with the errno kept.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conn.test_binds import opened
from tests.net.netlab import SLOWDOWN
from wgvsock.conn.bind import Bind, TransportUnavailable
from wgvsock.conn.dgram import DatagramBind
from wgvsock.conn.stream import StreamBind
from wgvsock.roles import enclave as enclave_mod
from wgvsock.services.profile import parse_profile
from wgvsock.ui.nslab import wait_for

pytestmark = [pytest.mark.root, pytest.mark.guest]

LOOPBACK_CID = 1
UNREACHED_CID = 5  # no transport here reaches it (nor 3, Nitro's parent: no virtio device)
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
WAIT = 10.0 * SLOWDOWN
FAST = {"backoff_min": 0.01, "backoff_max": 0.05}
PROFILE = Path(__file__).resolve().parents[1] / "data" / "profile-unix.yaml"


@pytest.fixture
def unheard_port() -> Iterator[int]:
    """A vsock port bound and never listened on, held for the test: no listener can take it
    meanwhile (vsock ports are the whole guest's), and a connect there is reset."""
    hold = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        hold.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
        yield hold.getsockname()[1]
    finally:
        hold.close()


def test_vsock_datagrams_are_refused_at_socket_creation() -> None:
    with pytest.raises(OSError) as kernel:
        socket.socket(socket.AF_VSOCK, socket.SOCK_DGRAM).close()
    assert kernel.value.errno == errno.ENODEV, kernel.value
    before = set(os.listdir("/proc/self/fd"))
    bind = DatagramBind("vsock")
    with pytest.raises(TransportUnavailable) as caught:
        bind.open(0, lambda *_: None)
    text = str(caught.value)
    assert caught.value.errno == errno.ENODEV
    assert "vsock datagram" in text and "use the stream transport" in text, text
    assert "ENODEV" in text, text
    assert not bind.is_open
    assert set(os.listdir("/proc/self/fd")) == before  # nothing left open


def _dial_error(bind: StreamBind, endpoint: str) -> str:
    """The stream bind's last error dialling ENDPOINT, once it has one."""
    bind.send(b"\x04" + bytes(31), bind.parse_endpoint(endpoint))

    def error() -> str:
        for d in bind.status()["dialers"]:
            if d["endpoint"] == endpoint and d["last_error"]:
                return d["last_error"]
        return ""

    return wait_for(error, WAIT, f"a failed dial to {endpoint}")


def test_the_stream_dialler_says_why_in_vsock_words(binds: list[Bind],
                                                     unheard_port: int) -> None:
    a, _a_in, _ = opened(binds, StreamBind("vsock", **FAST))
    assert isinstance(a, StreamBind)
    nobody = _dial_error(a, f"vsock://{LOOPBACK_CID}:{unheard_port}")
    assert f"[Errno {errno.ECONNRESET}] nothing listens on that port" in nobody, nobody
    assert "reset by peer" not in nobody, nobody
    unreached = _dial_error(a, f"vsock://{UNREACHED_CID}:{unheard_port}")
    assert f"[Errno {errno.ENODEV}] no vsock transport" in unreached, unreached
    assert "reaches that CID" in unreached, unreached


@pytest.mark.parametrize(("cid", "said", "hint"), [
    (LOOPBACK_CID, "nothing listens on that port (vsock's reset, ECONNRESET)",
     "is `wgvsock parent up` running with the same profile?"),
    (UNREACHED_CID, "no vsock transport on this machine reaches that CID (ENODEV)",
     "is transport.parent_cid the parent's CID (3 on Nitro)?"),
])
def test_the_enclave_names_why_the_parent_never_answered(unheard_port: int, cid: int,
                                                          said: str, hint: str) -> None:
    text = PROFILE.read_text().replace(
        "  kind: unix\n  port: 51820\n  control_port: 51821\n  path: /run/wgvsock/e2e\n",
        f"  kind: vsock\n  port: 51820\n  control_port: {unheard_port}\n"
        f"  parent_cid: {cid}\n")
    e = enclave_mod.Enclave(parse_profile(text, "vsock.yaml"))
    t = threading.Thread(target=e._control_loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: e.last_dial_error is not None, WAIT, "the enclave's first dial")
        with pytest.raises(enclave_mod.EnclaveError) as caught:
            e.wait_connected(1.0)
    finally:
        e.stop.set()
        t.join(WAIT)
    assert e.last_dial_error is not None
    assert e.last_dial_error.errno == (errno.ECONNRESET if cid == LOOPBACK_CID
                                       else errno.ENODEV)
    message = str(caught.value)
    assert message == (f"no answer from the parent's control port (vsock CID {cid} port "
                       f"{unheard_port}) within 1 s: {said} ({hint})"), message
