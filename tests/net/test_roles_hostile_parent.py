"""Whatever answers on the parent's control port can say anything in its welcome: the answer is
not authenticated, and in Nitro's threat model the enclave does not trust the parent. With the
roles of test_roles.py (Unix stand-in for vsock) and no `parent.public_key` pin, a welcome that
offers a key no parent can have (the enclave's own, a low-order point) is refused, installs
nothing, and leaves the enclave able to take the real parent's answer afterwards.
"""

from __future__ import annotations

import select
import subprocess
import sys

import pytest

from wgvsock.core.crypto import key_to_base64, public_key
from wgvsock.device.uapi import uapi_get

from .netlab import wait_for
from .test_roles import RECOVERY_BOUND, World

pytestmark = [pytest.mark.root]

# Something on the host that binds the parent's control port while `parent up` is down and
# answers one registration with a welcome offering the key KIND names: "own" (the key the
# enclave registered, sent back) or "zero" (32 zero bytes, a low-order point). Exits after it.
HOSTILE = r"""
import base64, os, sys, time
from wgvsock.roles.common import control_listener
from wgvsock.services.control import encode, read_message
from wgvsock.services.profile import load_profile
p = load_profile(sys.argv[1])
listener = control_listener(p.transport)
print("ready", flush=True)
conn, _ = listener.accept()
conn.sendall(encode({"type": "challenge", "profile": p.name,
                     "nonce": base64.b64encode(os.urandom(32)).decode()}))
msg = read_message(conn, time.monotonic() + 10)
key = msg["public_key"] if sys.argv[2] == "own" else base64.b64encode(bytes(32)).decode()
conn.sendall(encode({"type": "welcome", "public_key": key, "wg_port": p.transport.port,
                     "attested": True, "attestation": "attested"}))
conn.settimeout(20)
conn.recv(1)  # until the enclave ends the connection
print("welcomed", flush=True)
"""


@pytest.mark.parametrize("kind", ["own", "zero"])
def test_a_welcome_with_a_key_no_parent_can_have_is_refused(world: World, kind: str) -> None:
    """Before (kind "own"): the enclave replaced its peers with one whose key is its own,
    which the device drops, so the real parent's peer was gone; the real parent's next
    welcome took the "same key" shortcut to a peer that no longer existed, and every
    registration after that failed with a KeyError traceback, CMD running without a network.
    (Kind "zero": the low-order key was installed as the parent's.)"""
    w = world
    w.parent_cmd("up")
    w.start_enclave()
    wait_for(w.egress_works, 30, "the enclave to reach the internet through the parent")
    parent_key = public_key(uapi_get(str(w.parent_uapi()))["private_key"])

    w.parent_cmd("down")
    hostile = w.parent.popen(sys.executable, "-c", HOSTILE, str(w.profile), kind,
                             stdout=subprocess.PIPE, text=True)
    assert hostile.stdout is not None
    ready, _, _ = select.select([hostile.stdout], [], [], 20)
    assert ready and hostile.stdout.readline().strip() == "ready"
    ready, _, _ = select.select([hostile.stdout], [], [], 30)
    assert ready and hostile.stdout.readline().strip() == "welcomed"
    hostile.wait(10)

    w.parent_cmd("up")
    log_path = w.lab.tmp / "enclave.log"
    try:
        wait_for(w.egress_works, RECOVERY_BOUND, "the tunnel to come back with the real parent")
    except TimeoutError as e:
        raise AssertionError(f"{e}; the enclave's log ends:\n{log_path.read_text()[-3000:]}") from e
    enclave_uapi = str(w.lab.tmp / "run-enclave" / "wg0.sock")
    assert [p["public_key"] for p in uapi_get(enclave_uapi)["peers"]] == [parent_key]
    log = log_path.read_text()
    assert "Traceback" not in log and "KeyError" not in log, log
    what = "this enclave's own public key" if kind == "own" else "a low-order point"
    assert f"refusing the parent: it offered {what}" in log, log
    if kind == "zero":
        assert key_to_base64(bytes(32)) in log
