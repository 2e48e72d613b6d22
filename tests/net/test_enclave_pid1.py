"""`wgvsock enclave up` as PID 1 of its own PID namespace (`docker run` without an init), with a
real tunnel to a real parent: orphans of CMD are reaped, a SIGTERM from outside reaches CMD,
CMD's status is `up`'s, and the tunnel goes with it. A guard: it passed when written (the
parts are tested alone in tests/test_enclave_lifecycle.py and tests/test_enclave_cmd.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from .netlab import wait_for
from .test_roles import WGVSOCK, World

pytestmark = [pytest.mark.root]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of PID's children."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid:
            out.append((int(entry), state))
    return out


def test_as_pid_1_orphans_are_reaped_sigterm_reaches_cmd_and_its_status_is_kept(
        world: World) -> None:
    assert world.parent_cmd("up").returncode == 0
    ready, orphans = world.lab.tmp / "ready", world.lab.tmp / "orphans"
    script = world.lab.tmp / "app.sh"
    # Three helpers left to PID 1 (their parent subshell exits at once), then wait for TERM.
    script.write_text(f"""#!/bin/sh
for i in 1 2 3; do (sleep 0.3 & echo $! >> {orphans}); done
trap 'exit 3' TERM
echo > {ready}
while :; do sleep 0.05; done
""")
    script.chmod(0o755)
    with open(world.lab.tmp / "enclave.log", "ab") as log:
        proc = world.enclave.popen(
            "unshare", "--pid", "--fork", "--mount-proc", WGVSOCK, "enclave", "up",
            "--profile", str(world.profile), "--timeout", "30", "--", str(script),
            env=world.env_for("enclave"), stdout=log, stderr=log)
    world.enclave_proc = proc
    wait_for(ready.exists, 30, "the tunnel and CMD")
    assert world.egress_works()
    # unshare's child is `enclave up`, PID 1 inside.
    wait_for(lambda: _children(proc.pid), 5, "unshare's child")
    pid1 = _children(proc.pid)[0][0]
    assert "enclave" in Path(f"/proc/{pid1}/cmdline").read_text()

    def orphans_gone() -> bool:  # all three started and ended, and only CMD is left
        return len(orphans.read_text().split()) == 3 and len(_children(pid1)) == 1

    wait_for(orphans_gone, 10, "PID 1 to reap the helpers CMD left to it")
    assert [state for _, state in _children(pid1)] in (["S"], ["R"])  # CMD, alive
    os.kill(pid1, signal.SIGTERM)
    assert proc.wait(15) == 3
    log_text = (world.lab.tmp / "enclave.log").read_text()
    assert "WARNING" not in log_text, log_text
    assert "wg0" not in world.enclave.ip("-o", "link", "show").stdout
    assert subprocess.run(["ip", "netns", "pids", world.enclave.name], capture_output=True,
                          text=True, check=False).stdout.split() == []
