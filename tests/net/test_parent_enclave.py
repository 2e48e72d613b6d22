"""`wgvsock parent up` starting the enclave itself (`parent.enclave` in the profile), against
tests/fakes/nitro-cli put first on the parent's PATH: it runs the enclave, records its ID and CID,
restarts it when it exits, and `parent down` terminates it — even after the parent was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .daemonctl import process_gone
from .netlab import Lab, wait_for
from .test_roles import WGVSOCK

pytestmark = [pytest.mark.root]

FAKES = Path(__file__).resolve().parents[1] / "fakes"

PROFILE = """\
version: 1
name: {name}
transport:
  kind: unix
  path: {sock}
parent:
  address: 10.77.0.1/30
  private_key: {key}
  enclave:
    eif: {eif}
    cpu_count: 2
    memory_mib: 256
    cid: 23
    debug: true
enclave:
  address: 10.77.0.2/30
attestation:
  allow_debug: true
"""


class Host:
    def __init__(self, lab: Lab, eif_exists: bool = True) -> None:
        self.lab = lab
        self.name = f"ne{lab.tag.replace('x', '')}"[:20]
        self.ns = lab.netns("p")
        self.eif = lab.tmp / "app.eif"
        if eif_exists:
            self.eif.write_bytes(b"EIF" * 1000)
        self.profile = lab.tmp / "profile.yaml"
        self.profile.write_text(PROFILE.format(name=self.name, sock=lab.tmp / "sock",
                                               key=lab.tmp / "parent.key", eif=self.eif))
        self.nitro_state = lab.tmp / "nitro.json"
        self.state_dir = lab.tmp / "state"
        self.log = lab.tmp / "parent.log"
        self.env = {
            **os.environ,
            "PATH": f"{FAKES}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_NITRO_STATE": str(self.nitro_state),
            "WGVSOCK_STATE_DIR": str(self.state_dir),
            "WGVSOCK_RUN_DIR": str(lab.tmp / "run"),
            "WGVSOCK_LOG_FILE": str(self.log),
        }

    def up(self) -> int:
        """`parent up` as users run it: it daemonises once ready. Returns the daemon's pid."""
        res = self.cmd("up", "-v")
        assert res.returncode == 0, res.stderr
        return json.loads((self.state_dir / f"{self.name}.json").read_text())["pid"]

    def cmd(self, verb: str, *args: str) -> subprocess.CompletedProcess:
        return self.ns.run(WGVSOCK, "parent", verb, "--profile", str(self.profile), *args,
                           env=self.env, check=False, timeout=60)

    def nitro(self, *args: str) -> str:
        return subprocess.run([str(FAKES / "nitro-cli"), *args], env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def enclaves(self) -> list[dict]:
        if not self.nitro_state.exists():
            return []
        return json.loads(self.nitro("describe-enclaves"))

    def recorded(self) -> dict:
        try:
            return json.loads((self.state_dir / f"{self.name}.json").read_text())["enclave"]
        except (FileNotFoundError, KeyError, ValueError):
            return {}

    def running_enclave(self, not_id: str | None = None) -> dict | None:
        listed = self.enclaves()
        if len(listed) == 1 and listed[0]["EnclaveID"] != not_id:
            return listed[0]
        return None


@pytest.fixture
def host(lab: Lab):
    h = Host(lab)
    try:
        yield h
    finally:
        h.cmd("down")


def test_parent_runs_restarts_and_terminates_the_enclave(host: Host) -> None:
    pid = host.up()
    first = wait_for(host.running_enclave, 20, "parent up to start the enclave")
    assert first["EnclaveName"] == f"wgvsock-{host.name}"
    assert first["EnclaveCID"] == 23 and first["MemoryMiB"] == 256
    assert first["NumberOfCPUs"] == 2 and first["Flags"] == "DEBUG_MODE"
    wait_for(lambda: host.recorded().get("id") == first["EnclaveID"], 10,
             "the enclave's ID in the state file")
    assert host.recorded()["cid"] == 23

    # The enclave exits on its own: the parent notices, says why, and starts a new one.
    host.nitro("fake-crash", first["EnclaveID"])
    second = wait_for(lambda: host.running_enclave(not_id=first["EnclaveID"]), 20,
                      "the parent to restart the enclave")
    wait_for(lambda: host.recorded().get("id") == second["EnclaveID"], 10,
             "the new enclave's ID in the state file")
    log = host.log.read_text()
    assert f"({first['EnclaveID']}, CID 23) exited" in log and "restarting in" in log

    res = host.cmd("down")
    assert res.returncode == 0, res.stderr
    assert "stopped the parent (pid " in res.stdout, host.log.read_text()
    assert host.enclaves() == []
    assert process_gone(pid)
    assert list(host.state_dir.glob("*")) == []


def test_down_terminates_the_enclave_of_a_killed_parent(host: Host) -> None:
    pid = host.up()
    enclave = wait_for(host.running_enclave, 20, "parent up to start the enclave")
    wait_for(lambda: host.recorded().get("id") == enclave["EnclaveID"], 10, "the state file")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), 10, "the parent to die")
    assert host.running_enclave() == enclave  # nobody terminated it
    res = host.cmd("down")
    assert res.returncode == 0, res.stderr
    assert f"terminated enclave {enclave['EnclaveID']}" in res.stdout
    assert host.enclaves() == []


def test_up_refuses_a_missing_eif_before_changing_anything(lab: Lab) -> None:
    host = Host(lab, eif_exists=False)
    res = host.cmd("up")
    assert res.returncode != 0
    assert f"{host.eif}: No such file or directory" in res.stderr, res.stderr
    assert "wg0" not in host.ns.ip("-o", "link", "show").stdout
    assert host.enclaves() == []
    assert not host.state_dir.exists() or list(host.state_dir.glob("*")) == []


def test_status_says_why_the_enclave_the_parent_starts_is_not_running(host: Host) -> None:
    """run-enclave failing (here: E26, not enough memory) left `wgvsock status` saying only
    that no enclave had registered; the reason and its fix were in the parent's log."""
    host.nitro("fake-fail-run", "1000", "E26")
    host.up()
    wait_for(lambda: "run-enclave failed" in host.log.read_text(), 20,
             "the parent to try run-enclave")

    def shown() -> str | None:
        res = host.ns.run(WGVSOCK, "status", "--once", env={**host.env, "COLUMNS": "300"},
                          check=False)
        return res.stdout if "enclave not running: run-enclave failed" in res.stdout else None

    out = wait_for(shown, 20, "the dashboard to say why")
    assert "E26" in out and "no enclave yet" not in out, out
