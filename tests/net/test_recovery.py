"""Faults on the Unix stand-in (issue 13, items 1-3): the tunnel comes back on its own, and
the enclave's app never notices that the parent went away.

  - the parent killed with SIGKILL and started again after a short and a long absence (longer
    than the old 30 s redial cap): the enclave reaches the internet within RECOVERY_BOUND of
    `parent up` returning, and its app is the same process;
  - the enclave replaced (killed, started with a new key): traffic within ENCLAVE_BOUND, and
    the parent keeps only the new enclave's peer;
  - the parent frozen (SIGSTOP for 15 s, then SIGCONT): the tunnel is back within
    RECOVERY_BOUND, with the same parent and the same app.

The measured times are printed (pytest -s shows them); the machine is shared, so they vary.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from wgvsock.core.crypto import public_key
from wgvsock.device.uapi import uapi_get

from .daemonctl import process_gone
from .netlab import wait_for
from .test_roles import World

pytestmark = [pytest.mark.root]

# From `parent up` returning (or SIGCONT) to the enclave reaching the internet again.
RECOVERY_BOUND = 10.0
# From starting a new enclave to its traffic flowing through the parent.
ENCLAVE_BOUND = 5.0


def parent_pid(world: World) -> int:
    state = json.loads((world.lab.tmp / "state" / f"{world.name}.json").read_text())
    return int(state["pid"])


def app_pid(world: World) -> int:
    """The enclave's CMD: the one child of `wgvsock enclave up`."""
    proc = world.enclave_proc
    assert proc is not None and proc.poll() is None, "wgvsock enclave up is not running"
    path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    # The CMD starts once the tunnel is up: a first packet may get through a moment before.
    children = wait_for(lambda: path.read_text().split(), 10, "the enclave's app to start")
    assert len(children) == 1, f"expected one app process, found {children}"
    return int(children[0])


def recovery_time(world: World, since: float, bound: float, what: str) -> float:
    """Seconds from `since` (monotonic) until the enclave fetches a page from the internet;
    fails beyond `bound`. Each probe gives up after 1 s so a late start is not hidden."""
    wait_for(lambda: world.curl(world.enclave, "http://198.51.100.2/", timeout=1)
             == "hello from the internet\n", bound - (time.monotonic() - since), what)
    took = time.monotonic() - since
    assert took <= bound, f"{what}: {took:.1f} s"
    return took


def kill_parent(world: World) -> None:
    pid = parent_pid(world)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), 10, "the parent to die")


def up_and_running(world: World) -> int:
    assert world.parent_cmd("up").returncode == 0
    world.start_enclave()
    wait_for(world.egress_works, 30, "the tunnel")
    return app_pid(world)


@pytest.mark.slow
# 40 s away is a wait on the clock, not on the CPU: it runs beside the other tests.
@pytest.mark.parametrize("away", [1, pytest.param(40, marks=pytest.mark.apart)],
                         ids=["away-1s", "away-40s"])
def test_parent_killed_and_back_recovers_within_bound(world: World, away: float) -> None:
    app = up_and_running(world)
    kill_parent(world)
    assert not world.egress_works()
    # Longer than the old 30 s redial cap: the enclave has been backing off all this time.
    time.sleep(away)
    assert world.parent_cmd("up").returncode == 0
    took = recovery_time(world, time.monotonic(), RECOVERY_BOUND,
                         f"egress after the parent was away {away} s")
    print(f"\nparent away {away} s: egress back {took:.2f} s after `parent up` returned")
    wait_for(world.ingress_works, RECOVERY_BOUND, "ingress after the parent came back")
    assert app_pid(world) == app, "the enclave's app was restarted"


def test_enclave_replaced_with_new_key_recovers_and_old_peer_goes(world: World) -> None:
    app = up_and_running(world)
    old_key = only_parent_peer(world)
    # Kill the enclave the way an enclave dies: everything at once, no goodbye.
    assert world.enclave_proc is not None
    os.kill(app, signal.SIGKILL)
    world.enclave_proc.kill()
    world.enclave_proc.wait(10)
    start = time.monotonic()
    world.start_enclave()
    took = recovery_time(world, start, ENCLAVE_BOUND, "egress from the new enclave")
    print(f"\nenclave replaced: egress {took:.2f} s after starting the new one")
    wait_for(world.ingress_works, ENCLAVE_BOUND, "ingress to the new enclave")
    # The parent's UAPI (what `wg show` reads) lists exactly one peer: the new key.
    new_key = only_parent_peer(world)
    enclave_private = uapi_get(str(world.lab.tmp / "run-enclave" / "wg0.sock"))["private_key"]
    assert new_key == public_key(enclave_private) != old_key


def only_parent_peer(world: World) -> bytes:
    peers = uapi_get(str(world.parent_uapi()))["peers"]
    assert len(peers) == 1, f"the parent has {len(peers)} peers"
    return peers[0]["public_key"]


@pytest.mark.quiet
@pytest.mark.slow
def test_frozen_parent_recovers_after_sigcont(world: World) -> None:
    app = up_and_running(world)
    pid = parent_pid(world)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert not world.egress_works()
        time.sleep(15)
    finally:
        os.kill(pid, signal.SIGCONT)
    took = recovery_time(world, time.monotonic(), RECOVERY_BOUND, "egress after SIGCONT")
    print(f"\nparent frozen 15 s: egress back {took:.2f} s after SIGCONT")
    wait_for(world.ingress_works, RECOVERY_BOUND, "ingress after SIGCONT")
    assert parent_pid(world) == pid and not process_gone(pid)
    assert app_pid(world) == app, "the enclave's app was restarted"
