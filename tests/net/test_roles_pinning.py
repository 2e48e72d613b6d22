"""Issue 12, item 2, end to end with the roles of test_roles.py (Unix stand-in for vsock):
with `parent.public_key` pinned by `wgvsock profile pin-parent`, an impostor answering on the
parent's control port with another key is refused by `enclave up`, which installs nothing;
the real parent is accepted; and `parent up` refuses to start with a key that does not match
the pin, making nothing.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

from wgvsock.core.crypto import generate_private_key, key_to_base64, public_key
from wgvsock.device.uapi import uapi_get
from wgvsock.services import firewall
from wgvsock.services.profile import load_profile

from .netlab import wait_for
from .test_roles import WGVSOCK, World

pytestmark = [pytest.mark.root]

# Any process on the host that can bind the parent's control port: it answers the exchange
# like a parent would, with its own key.
IMPOSTOR = r"""
import sys, threading
from wgvsock.services.control import ControlServer, Verdict
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.services.profile import load_profile
from wgvsock.roles.common import control_listener
p = load_profile(sys.argv[1])
server = ControlServer(control_listener(p.transport), profile=p.name,
                       public_key=public_key(generate_private_key()), wg_port=p.transport.port,
                       verify=lambda key, doc, nonce: Verdict(True),
                       install=lambda key, verdict: print("registered", flush=True))
server.start()
print("ready", flush=True)
threading.Event().wait()
"""
REFUSED_TIMEOUT = 6


def write_parent_key(world: World) -> bytes:
    key = generate_private_key()
    fd = os.open(world.lab.tmp / "parent.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key_to_base64(key) + "\n")
    return key


def pin(world: World, *args: str) -> None:
    res = subprocess.run([WGVSOCK, "profile", "pin-parent", str(world.profile), *args],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.quiet  # mostly waits for refusals: runs beside the QEMU guest
def test_impostor_parent_is_refused_and_the_real_one_accepted(world: World) -> None:
    key = write_parent_key(world)
    pin(world)  # from the profile's own parent.private_key
    assert load_profile(world.profile).parent.public_key == key_to_base64(public_key(key))

    impostor = world.parent.popen(sys.executable, "-c", IMPOSTOR, str(world.profile),
                                  stdout=subprocess.PIPE, text=True)
    assert impostor.stdout is not None
    ready, _, _ = select.select([impostor.stdout], [], [], 20)
    assert ready and impostor.stdout.readline().strip() == "ready"
    proc = world.start_enclave(timeout=REFUSED_TIMEOUT)
    log_path = world.lab.tmp / "enclave.log"
    wait_for(lambda: "refusing the parent" in log_path.read_text(), REFUSED_TIMEOUT,
             "the enclave to refuse the impostor")
    # Nothing of the impostor's was installed: the enclave's device has no peer.
    enclave_uapi = world.lab.tmp / "run-enclave" / "wg0.sock"
    assert uapi_get(str(enclave_uapi))["peers"] == []
    code = proc.wait(REFUSED_TIMEOUT + 10)
    log = log_path.read_text()
    assert code != 0, log
    assert (f"could not register with the parent within {REFUSED_TIMEOUT} s: refusing the "
            f"parent: it offered public key ") in log, log
    assert f"but the profile pins parent.public_key {key_to_base64(public_key(key))}" in log
    assert "tunnel to the parent is up" not in log and "Traceback" not in log, log
    impostor.terminate()
    impostor.wait(10)

    # The real parent, whose key is the pinned one, is accepted.
    assert world.parent_cmd("up").returncode == 0
    world.start_enclave(log_name="enclave-real.log")
    wait_for(world.egress_works, 30, "the enclave to reach the internet through the real parent")
    status = uapi_get(str(enclave_uapi))
    assert [key_to_base64(p["public_key"]) for p in status["peers"]] == [
        key_to_base64(public_key(key))]


def test_parent_up_refuses_a_key_that_does_not_match_the_pin(world: World) -> None:
    key = write_parent_key(world)
    other = key_to_base64(public_key(generate_private_key()))
    pin(world, "--public-key", other)
    res = world.parent_cmd("up", check=False)
    assert res.returncode != 0
    assert (f"has public key {key_to_base64(public_key(key))}, but the profile pins "
            f"parent.public_key {other}") in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # It made nothing: no interface, no nftables table, no control socket.
    assert not firewall.exists(world.name, netns=world.parent.name)
    links = world.parent.ip("-o", "link", "show").stdout
    assert " wg0:" not in links, links
    assert not (world.lab.tmp / "sock" / "51821.sock").exists()
