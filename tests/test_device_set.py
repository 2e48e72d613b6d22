"""Device.uapi_set without a TUN or a network: what one `set` request does as a whole."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time

import pytest

from wgvsock.conn.stream import StreamBind
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import SEND
from wgvsock.device.device import Device
from wgvsock.device.uapi import UAPIError, parse_set
from wgvsock.ui.nslab import wait_for


def test_a_peer_removed_later_in_the_same_set_gets_no_keepalive() -> None:
    """`wg set IF peer K persistent-keepalive 25 peer K remove`: before, the keepalive's
    handshake initiation went out after the loop, to a peer no longer configured, and its
    handshake index stayed in the table for good (review finding)."""
    d = tempfile.mkdtemp(prefix="wgd", dir="/tmp")
    bind = StreamBind("unix", unix_dir=d)
    sent: list = []

    class Up(Device):  # an interface that is up, whose sends are recorded
        def _is_up(self) -> bool:
            return True

        def _perform(self, actions) -> None:
            sent.extend(actions)

    dev = Up("wgdset0", bind, run_dir=os.path.join(d, "run"))
    dev._sync_link()  # the link comes up
    me, them = generate_private_key(), public_key(generate_private_key())
    try:
        dev.uapi_set(parse_set(f"private_key={me.hex()}\n"))
        dev.uapi_set(parse_set(
            f"public_key={them.hex()}\nendpoint=127.0.0.1:9\npersistent_keepalive_interval=25\n"
            f"public_key={them.hex()}\nremove=true\n"))
        assert not dev.engine.peers
        assert not dev.engine._index
        for t in threading.enumerate():  # a keepalive goes out on a thread of its own
            if t.name == "wgdset0-uapi-send":
                t.join(5)
        assert not [a for a in sent if a[0] == SEND]
        # Without the removal the keepalive goes out (the test can fail).
        dev.uapi_set(parse_set(
            f"public_key={them.hex()}\nendpoint=127.0.0.1:9\npersistent_keepalive_interval=25\n"))
        wait_for(lambda: [a for a in sent if a[0] == SEND], 5, "the keepalive")
    finally:
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_keepalive_that_cannot_be_sent_yet_does_not_hold_the_set_up() -> None:
    """A set that turns on a persistent keepalive sends one at once. Before, it was sent
    inside the request, under the UAPI's lock: toward a stream peer that had stopped reading,
    `wg set` and every `wg show` behind it waited up to the send timeout (review finding)."""
    d = tempfile.mkdtemp(prefix="wgd", dir="/tmp")
    bind = StreamBind("unix", unix_dir=d)
    sending = threading.Event()
    release = threading.Event()

    class Up(Device):  # an interface that is up, whose sends wait until released
        def _is_up(self) -> bool:
            return True

        def _perform(self, actions) -> None:
            sending.set()
            release.wait(10)

    dev = Up("wgdset1", bind, run_dir=os.path.join(d, "run"))
    dev._sync_link()  # the link comes up
    me, them = generate_private_key(), public_key(generate_private_key())
    try:
        dev.uapi_set(parse_set(f"private_key={me.hex()}\n"))
        done = threading.Event()

        def configure() -> None:
            dev.uapi_set(parse_set(f"public_key={them.hex()}\nendpoint=127.0.0.1:9\n"
                                   "persistent_keepalive_interval=25\n"))
            done.set()

        threading.Thread(target=configure, daemon=True).start()
        assert sending.wait(5)
        assert done.wait(2), "the set waited for the keepalive's send"
        assert them in {p.public_key for p in dev.uapi_get().peers}
    finally:
        release.set()
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def test_handshake_times_follow_a_stepped_wall_clock(monkeypatch) -> None:
    """The wall-clock offset was taken once, at start: after the clock was stepped (chrony's
    makestep), `wg show` and the dashboard were off by the step (review finding)."""
    d = tempfile.mkdtemp(prefix="wgd", dir="/tmp")
    bind = StreamBind("unix", unix_dir=d)
    dev = Device("wgdset2", bind, run_dir=os.path.join(d, "run"))
    them = public_key(generate_private_key())
    try:
        dev.uapi_set(parse_set(f"private_key={generate_private_key().hex()}\n"
                               f"public_key={them.hex()}\n"))
        dev.engine.peers[them].last_handshake = time.monotonic() - 5
        stepped = time.time() + 3600
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)
        [peer] = dev.uapi_get().peers
        assert abs(peer.last_handshake_time_sec - (stepped - 5)) < 2
    finally:
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_set_past_the_peer_limit_is_refused_whole() -> None:
    """wireguard-go takes at most 65536 peers (MaxPeers) and refuses the one past it; ours
    took any number, each costing memory and a share of every timer tick. A set that would
    leave more is refused with EINVAL before anything changes; one that removes as many as
    it adds, or only updates, is not."""
    d = tempfile.mkdtemp(prefix="wgd", dir="/tmp")
    bind = StreamBind("unix", unix_dir=d)
    dev = Device("wgdset3", bind, run_dir=os.path.join(d, "run"))
    dev.max_peers = 3
    keys = [public_key(generate_private_key()) for _ in range(5)]

    def peers(*lines: str) -> str:
        return "".join(lines)

    try:
        dev.uapi_set(parse_set(peers(*(f"public_key={k.hex()}\n" for k in keys[:3]))))
        with pytest.raises(UAPIError) as e:
            dev.uapi_set(parse_set(f"listen_port=0\npublic_key={keys[3].hex()}\n"))
        assert e.value.errno == -errno.EINVAL and "at most 3" in e.value.message
        assert set(dev.engine.peers) == set(keys[:3])
        # Within the limit once the set is applied: one out, one in; an update of a peer not
        # there creates none; replace_peers starts from none.
        dev.uapi_set(parse_set(f"public_key={keys[0].hex()}\nremove=true\n"
                               f"public_key={keys[3].hex()}\n"
                               f"public_key={keys[4].hex()}\nupdate_only=true\n"))
        assert set(dev.engine.peers) == {keys[1], keys[2], keys[3]}
        dev.uapi_set(parse_set("replace_peers=true\n"
                               + peers(*(f"public_key={k.hex()}\n" for k in keys[2:5]))))
        assert set(dev.engine.peers) == set(keys[2:5])
    finally:
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def _endpoint_refused(endpoint: str) -> str:
    """The message a device refuses ENDPOINT for a new peer with (EINVAL, no peer added)."""
    d = tempfile.mkdtemp(prefix="wgd", dir="/tmp")
    bind = StreamBind("unix", unix_dir=d)
    dev = Device("wgdset4", bind, run_dir=os.path.join(d, "run"))
    them = public_key(generate_private_key())
    try:
        with pytest.raises(UAPIError) as e:
            dev.uapi_set(parse_set(f"public_key={them.hex()}\nendpoint={endpoint}\n"))
        assert e.value.errno == -errno.EINVAL
        assert not dev.engine.peers
        return e.value.message
    finally:
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_bad_endpoint_is_named_once() -> None:
    """Before: "invalid endpoint 'x:y': invalid endpoint 'x:y': port 'y' is not a number", the
    value quoted twice in the log (the transport's message already names it)."""
    assert _endpoint_refused("nowhere:port") == (
        "invalid endpoint 'nowhere:port': port 'port' is not a number")


@pytest.mark.parametrize("key", [
    "a8" * 16 + "5c" * 16,  # hex, as the UAPI writes keys
    "qKioqKioqKioqKioqKioqFxcXFxcXFxcXFxcXFxcXFw=",  # base64, as wg(8) shows them
], ids=["hex", "base64"])
def test_a_key_given_as_an_endpoint_is_not_quoted(key: str) -> None:
    """A key in the endpoint field (a template that fills fields in the wrong order) is no
    endpoint: every endpoint has a colon. Before, the transport's message quoted it whole,
    "invalid endpoint '<the key>': expected HOST:PORT", and it went into the daemon's log,
    where every other field shows a value as long as a key by its length only."""
    assert _endpoint_refused(key) == f"invalid endpoint ({len(key)} characters): expected HOST:PORT"


@pytest.mark.parametrize("form", ["{}:51820", "[{}]:51820", "vsock://{}:5000", "{}:1"])
@pytest.mark.parametrize("key", [
    "a8" * 16 + "5c" * 16,
    "qKioqKioqKioqKioqKioqFxcXFxcXFxcXFxcXFxcXFw=",
], ids=["hex", "base64"])
def test_a_key_with_a_port_after_it_given_as_an_endpoint_is_not_quoted(key: str,
                                                                       form: str) -> None:
    """The colon check above let KEY:PORT through to the transport: TCP's and UDP's message
    quoted it ("invalid endpoint '<the key>:51820': cannot resolve '<the key>'") into the log,
    and the Unix stand-in took it as port 51820 of its directory, to show it in `wg show`."""
    endpoint = form.format(key)
    message = _endpoint_refused(endpoint)
    assert message == (f"invalid endpoint ({len(endpoint)} characters, not shown: it holds "
                       "what looks like a key): expected HOST:PORT")


@pytest.mark.parametrize("endpoint", [
    "ec2-203-0-113-25.compute-1.amazonaws.com:51820",  # a host name as long as a key
    "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:51820",
    "unix:/run/containers/" + "ab" * 32 + "/51820.sock",  # a path may hold a digest
])
def test_a_long_endpoint_that_holds_no_key_is_taken(endpoint: str) -> None:
    assert parse_set(f"public_key={'11' * 32}\nendpoint={endpoint}\n").peers[0].endpoint \
        == endpoint
