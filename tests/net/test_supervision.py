"""Issue 13, item 4: the parent under its own systemd unit (parent/wgvsock-parent@.service).

systemd is not PID 1 here, so tests/net/unitrun.py runs the unit's own ExecStart line the way
systemd would (Type=exec, clean environment, NoNewPrivileges, ProtectHome, ExecStop after the
main process ends, Restart=on-failure after RestartSec). The parent is killed with SIGKILL, then
made to stop itself for a reason (its interface deleted under it): each time the unit restarts
it and the enclave's app, never restarted, reaches the internet again within RECOVERY_BOUND of
the new parent being ready, and within RECOVERY_BOUND of the failure itself. A clean stop
(SIGTERM, exit 0) is not restarted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from .daemonctl import process_gone
from .netlab import wait_for
from .test_recovery import RECOVERY_BOUND, app_pid, parent_pid, recovery_time
from .test_roles import WGVSOCK, World
from .unitrun import PROTECTED, Supervisor, env_for, load_unit

pytestmark = [pytest.mark.root, pytest.mark.slow]

UNIT = Path(__file__).resolve().parents[2] / "parent" / "wgvsock-parent@.service"


def test_unit_parses_and_restarts_on_failure_quickly() -> None:
    unit = load_unit(UNIT, "payments")
    assert unit.exec_start == ["/usr/local/bin/wgvsock", "parent", "up", "--profile",
                               "/etc/wgvsock/payments.yaml", "-f", "-v"]
    assert unit.exec_stop[:3] == ["/usr/local/bin/wgvsock", "parent", "down"]
    assert unit.exec_reload == ["/usr/local/bin/wgvsock", "parent", "reload", "--profile",
                                "/etc/wgvsock/payments.yaml"]
    assert unit.type == "exec" and unit.restart == "on-failure"
    # RestartSec is spent before the parent even starts: it must leave room in the 10 s bound
    # for `parent down` (ExecStop), `parent up` and the enclave's redial.
    assert unit.restart_sec <= 2
    # A crash loop still gives up: more starts than the burst cannot fit in the interval.
    assert unit.start_limit_burst * unit.restart_sec < unit.start_limit_interval


def ready(world: World, sup: Supervisor, run: int) -> float:
    """Waits for the unit's `run`-th start to be up (its pid in the state file: `up` writes it
    once everything is made); returns when, monotonic."""
    pid = sup.wait_runs(run, 30).pid

    def up() -> bool:
        try:
            return parent_pid(world) == pid
        except (FileNotFoundError, ValueError):
            assert not process_gone(pid), f"the unit's start {run} failed:\n{sup.log.read_text()}"
            return False

    wait_for(up, 30, f"start {run} of the unit to be ready")
    return time.monotonic()


def test_unit_restarts_a_failed_parent_and_the_tunnel_recovers(world: World) -> None:
    unit = load_unit(UNIT, world.name)
    # The unit's own command lines; only its two paths are mapped to this checkout's.
    paths = {"/usr/local/bin/wgvsock": WGVSOCK,
             f"/etc/wgvsock/{world.name}.yaml": str(world.profile)}
    assert set(paths) <= set(unit.exec_start) and set(paths) <= set(unit.exec_stop)
    assert unit.exec_reload is not None and set(paths) <= set(unit.exec_reload)
    log = world.lab.tmp / "journal.log"
    # The venv's interpreter may live under /root (pyenv), which ProtectHome hides.
    base = sys.base_prefix
    keep = base if base.startswith(tuple(p + "/" for p in PROTECTED)) else ""
    sup = Supervisor(unit, world.parent, log, paths=paths, keep=keep,
                     env=env_for(world.env_for("parent"), "WGVSOCK_STATE_DIR",
                                 "WGVSOCK_RUN_DIR"))
    sup.start()
    try:
        ready(world, sup, 1)
        world.start_enclave()
        wait_for(world.egress_works, 30, "the tunnel")
        app = app_pid(world)

        # 1. A crash: SIGKILL.
        crashed = time.monotonic()
        os.kill(sup.runs[0].pid, signal.SIGKILL)
        up = ready(world, sup, 2)
        took = recovery_time(world, up, RECOVERY_BOUND, "egress after the unit restarted")
        total = time.monotonic() - crashed
        print(f"\nSIGKILL: restarted and ready after {up - crashed:.2f} s, egress back "
              f"{took:.2f} s later ({total:.2f} s in all)")
        assert total <= RECOVERY_BOUND
        assert sup.runs[0].code == -signal.SIGKILL and sup.stops[0] == 0

        # 2. The parent stops itself for a reason: its interface is deleted under it.
        world.parent.ip("link", "del", "wg0")
        failed = time.monotonic()
        up = ready(world, sup, 3)
        took = recovery_time(world, up, RECOVERY_BOUND, "egress after the unit restarted")
        total = time.monotonic() - failed
        print(f"interface deleted: restarted and ready after {up - failed:.2f} s, egress back "
              f"{took:.2f} s later ({total:.2f} s in all)")
        assert total <= RECOVERY_BOUND
        assert sup.runs[1].code == 1, "a parent that stopped on its own must exit non-zero"
        assert "interface wg0 was removed" in log.read_text()
        wait_for(world.ingress_works, RECOVERY_BOUND, "ingress after the restarts")
        assert app_pid(world) == app, "the enclave's app was restarted"

        # `systemctl reload` with a new ingress port: applied by the running parent, which is
        # neither restarted nor stopped.
        world.profile.write_text(world.profile.read_text().replace("{listen: 8443",
                                                                   "{listen: 9443"))
        assert sup.reload() == 0, log.read_text()
        wait_for(lambda: world.curl(world.internet, "http://198.51.100.1:9443/")
                 == "hello from the enclave\n", 10, "ingress on the reloaded port")
        assert len(sup.runs) == 3 and sup.main_pid == sup.runs[2].pid

        # 3. A clean stop (SIGTERM, exit 0) is not restarted: Restart=on-failure.
        pid = sup.runs[2].pid
        os.kill(pid, signal.SIGTERM)
        sup.wait_done(30)
        assert process_gone(pid) and sup.runs[2].code == 0 and len(sup.runs) == 3
        assert not sup.gave_up
    finally:
        sup.stop()
