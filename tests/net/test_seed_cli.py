"""The environment wireguard-go-vsock (the Go seed, v0.2.5) reads, side by side with ours: each
case runs both programs the same way, each in a namespace of its own, with `-n tcp` only (the
seed's vsock mode would dial out of this VM), so the seed shows what a drop-in must do."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from .daemonctl import link_exists, process_gone, sock_path
from .netlab import DAEMON, Lab, wait_for

pytestmark = [pytest.mark.root]

KINDS = ["seed", "ours"]


def _command(kind: str, seed: Path) -> str:
    return str(seed) if kind == "seed" else DAEMON


@pytest.mark.parametrize("kind", KINDS)
def test_wg_process_foreground_keeps_it_in_the_foreground(lab: Lab, seed: Path,
                                                          kind: str) -> None:
    # The seed reads WG_PROCESS_FOREGROUND=1 as -f (a container's entry point, a unit of
    # Type=simple); ours forked, exited 0 at once, and a supervisor took the interface for gone.
    ns = lab.netns("f")
    ifname = lab.ifname("f")
    proc = ns.popen(_command(kind, seed), "-n", "tcp", ifname,
                    env=lab.env(WG_PROCESS_FOREGROUND="1"))
    wait_for(lambda: os.path.exists(sock_path(ifname)) or proc.poll() is not None, 30,
             f"{kind}: the UAPI socket of {ifname}")
    assert proc.poll() is None, f"{kind} left the foreground (exit {proc.returncode})"
    assert ns.pids() == [proc.pid]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not link_exists(ns, ifname)
    assert not os.path.exists(sock_path(ifname))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["WG_TUN_FD", "WG_UAPI_FD"])
def test_a_descriptor_variable_is_not_passed_over(lab: Lab, seed: Path, kind: str,
                                                  name: str) -> None:
    # The seed takes its TUN or UAPI socket from the descriptor these name (and fails when it
    # cannot); ours opened its own by name instead, so a launcher that handed one over got a
    # second interface, or none where it holds the name, and no word why.
    ns = lab.netns("d")
    ifname = lab.ifname("d")
    res = ns.run(_command(kind, seed), "-f", "-n", "tcp", ifname,
                 env=lab.env(**{name: "7", "LOG_LEVEL": "error"}), check=False,
                 stdin=subprocess.DEVNULL)
    assert res.returncode != 0, f"{kind} started with {name}=7 (no such descriptor)"
    assert not link_exists(ns, ifname)
    assert not os.path.exists(sock_path(ifname))
    assert ns.pids() == [] or all(process_gone(p) for p in ns.pids())
    if kind == "ours":
        assert f"{name}='7' is set" in res.stderr and "Traceback" not in res.stderr
