"""`wgvsock parent reload` (SIGHUP): a changed egress policy, ingress ports and attestation
policy reach a running parent without touching the tunnel; a change it cannot take, or a bad
file, is refused with nothing changed and the parent still serving.

The namespaces and profiles are test_roles.py's (plain), test_roles_attested.py's (a fake
NSM and a test CA) and test_egress_names.py's (dnsmasq and name rules).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attest_fixtures import TEST_PCRS
from wgvsock.core.crypto import key_to_base64
from wgvsock.device.uapi import uapi_get
from wgvsock.services import firewall

from .fake_nsm_enclave import OTHER_IMAGE_PCR0
from .netlab import Lab, wait_for
from .test_egress_names import PORT, elements, named, query  # noqa: F401 - named: a fixture
from .test_firewall import probe
from .test_recovery import parent_pid
from .test_roles import RECOVERY_BOUND, WGVSOCK, World
from .test_roles_attested import ATTESTATION, ca_dir, launcher  # noqa: F401 - ca_dir: a fixture

pytestmark = [pytest.mark.root]

PY = sys.executable

# Holds one TCP connection open and answers each line with the same line.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb", buffering=0)
    for line in f:
        f.write(line)
"""

# Connects once, then sends each line of its stdin over that connection and prints the answer.
ECHO_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = c.makefile("rwb", buffering=0)
print("connected", flush=True)
for line in sys.stdin:
    f.write(line.encode())
    print(f.readline().decode().strip() or "closed", flush=True)
"""


class Echo:
    """One long-lived TCP connection from the enclave to the internet's 198.51.100.2:7001."""

    def __init__(self, world: World) -> None:
        self.server = world.internet.popen(PY, "-c", ECHO_SERVER, "198.51.100.2", "7001",
                                           stdout=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        assert self.server.stdout.readline().strip() == "ready"
        self.client = world.enclave.popen(PY, "-c", ECHO_CLIENT, "198.51.100.2", "7001",
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True)
        assert self.client.stdout is not None
        assert self.client.stdout.readline().strip() == "connected"

    def round_trip(self, word: str) -> str:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(word + "\n")
        self.client.stdin.flush()
        return self.client.stdout.readline().strip()

    def close(self) -> None:
        for p in (self.client, self.server):
            p.kill()
            p.wait(10)


def reload(world: World, profile: Path | None = None) -> subprocess.CompletedProcess:
    return world.parent.run(WGVSOCK, "parent", "reload", "--profile",
                            str(profile or world.profile), env=world.env_for("parent"),
                            check=False, timeout=90)


def registrations(world: World, log_name: str = "enclave.log") -> int:
    return (world.lab.tmp / log_name).read_text().count("registered with the parent")


def table(world: World) -> str:
    """The parent's table as nft lists it, counter values left out."""
    text = world.parent.run("nft", "list", "table", "inet", firewall.table_name(world.name)).stdout
    return re.sub(r"packets \d+ bytes \d+", "", text)


def test_reload_applies_egress_and_ingress_and_keeps_the_tunnel(world: World) -> None:
    assert world.parent_cmd("up").returncode == 0
    world.start_enclave()
    wait_for(world.egress_works, 30, "the tunnel")
    wait_for(world.ingress_works, 10, "ingress 8443")
    assert world.curl(world.enclave, "http://198.51.100.3/", timeout=1.5) is None  # denied
    echo = Echo(world)
    try:
        assert echo.round_trip("before") == "before"
        peers = [p["public_key"] for p in uapi_get(str(world.parent_uapi()))["peers"]]
        allowed = firewall.read_counters(world.name, netns=world.parent.name)["egress_allowed"]
        pid = parent_pid(world)

        # Deny .2 instead of .3, and forward 9443 instead of 8443.
        text = world.profile.read_text()
        world.profile.write_text(
            text.replace("198.51.100.3/32]", "198.51.100.2/32]")
            .replace("{listen: 8443", "{listen: 9443"))
        res = reload(world)
        assert res.returncode == 0, res.stderr
        assert "parent.egress.deny" in res.stdout and "parent.ingress" in res.stdout, res.stdout
        assert "Traceback" not in res.stderr

        # New connections meet the new rules at once ...
        assert world.curl(world.enclave, "http://198.51.100.3/") == "hello from the internet\n"
        assert world.curl(world.enclave, "http://198.51.100.2/", timeout=1.5) is None
        assert world.curl(world.internet, "http://198.51.100.1:9443/") == \
            "hello from the enclave\n"
        assert world.curl(world.internet, "http://198.51.100.1:8443/", timeout=1.5) is None
        # ... while the connection made before carries on (conntrack), as after `nft -f`.
        assert echo.round_trip("after") == "after"
    finally:
        echo.close()
    # The tunnel was not touched: same parent, same enclave peer, no new registration.
    assert parent_pid(world) == pid
    assert [p["public_key"] for p in uapi_get(str(world.parent_uapi()))["peers"]] == peers
    assert registrations(world) == 1
    # The counters went on from where they were (a metric never goes back).
    after = firewall.read_counters(world.name, netns=world.parent.name)["egress_allowed"]
    assert after.packets > allowed.packets and after.bytes > allowed.bytes
    # A reload with nothing new says so.
    res = reload(world)
    assert res.returncode == 0 and res.stdout.strip() == "nothing changed", res


def test_reload_refuses_what_it_cannot_apply(world: World) -> None:
    assert world.parent_cmd("up").returncode == 0
    world.start_enclave()
    wait_for(world.egress_works, 30, "the tunnel")
    good = world.profile.read_text()
    before = table(world)
    pid = parent_pid(world)

    def rest() -> tuple[list, list, list]:
        """The running state besides the table: addresses, routes and the enclave's peer.
        Not the kernel's own IPv6 link-local addresses and routes: their duplicate address
        detection may end between two looks (the flag "tentative" goes, routes come)."""
        addrs = sorted((link["ifname"], a["local"], a["prefixlen"])
                       for link in json.loads(world.parent.ip("-j", "addr", "show").stdout)
                       for a in link.get("addr_info", []) if a.get("scope") != "link")
        routes = sorted(line for line in world.parent.ip("route", "show", "table",
                                                         "all").stdout.splitlines()
                        if "fe80:" not in line and "ff00::/8" not in line)
        return (addrs, routes, [(p["public_key"], p["allowed_ips"])
                                for p in uapi_get(str(world.parent_uapi()))["peers"]])

    others = rest()
    # Keys the running parent cannot change: each named with its line; nothing changes.
    world.profile.write_text(good.replace("interface: wg0", "interface: wg9")
                             + "mtu: 1380\n")
    res = reload(world)
    assert res.returncode == 1
    assert "interface (line 3)" in res.stderr and "mtu (line" in res.stderr, res.stderr
    assert "parent down" in res.stderr and "Traceback" not in res.stderr
    assert table(world) == before
    # An invalid file: the profile's own error, with the file and the key.
    world.profile.write_text(good.replace("allow: [0.0.0.0/0]", "allow: [300.0.0.0/8]"))
    res = reload(world)
    assert res.returncode == 1
    assert str(world.profile) in res.stderr and "parent.egress.allow" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert table(world) == before
    # An egress interface the host does not have: nft would take it and masquerade nothing.
    world.profile.write_text(good.replace("  egress:\n", "  egress:\n    interface: ens9\n"))
    res = reload(world)
    assert res.returncode == 1
    assert "parent.egress.interface: this host has no interface ens9" in res.stderr, res.stderr
    assert table(world) == before and rest() == others
    # The reload of another file than the one the parent runs from is refused.
    world.profile.write_text(good)
    copy = world.lab.tmp / "copy.yaml"
    copy.write_text(good)
    res = reload(world, copy)
    assert res.returncode == 1 and f"reads {world.profile}" in res.stderr, res.stderr
    assert rest() == others
    # The parent served on throughout.
    assert parent_pid(world) == pid
    assert world.egress_works() and world.ingress_works()
    assert world.curl(world.enclave, "http://198.51.100.3/", timeout=1.5) is None
    # A burst of SIGHUPs (reloads asked faster than they run) neither kills nor wedges it:
    # it still reloads, and still stops on SIGTERM.
    for _ in range(300):
        os.kill(pid, signal.SIGHUP)
    res = reload(world)
    assert res.returncode == 0 and res.stdout.strip() == "nothing changed", res
    assert parent_pid(world) == pid and world.egress_works()
    # No parent, no reload.
    world.parent_cmd("down")
    res = reload(world)
    assert res.returncode == 1 and "is not up" in res.stderr, res.stderr


@pytest.fixture
def attested(lab: Lab, ca_dir: Path):  # noqa: F811 - the imported fixture
    w = World(lab, profile_extra=ATTESTATION + f"  test_root_ca: {ca_dir / 'test-root.pem'}\n")
    try:
        yield w
    finally:
        w.close()


def test_reload_asks_the_new_attestation_policy_about_the_running_enclave(
        attested: World, ca_dir: Path) -> None:  # noqa: F811 - the imported fixture
    w = attested
    assert w.parent_cmd("up").returncode == 0
    w.start_enclave(launcher=launcher(ca_dir, "good"))
    wait_for(w.egress_works, 30, "the attested enclave's tunnel")
    good = w.profile.read_text()

    # A policy the enclave still meets: it stays, as it was.
    w.profile.write_text(good + "  max_age: 600\n")
    res = reload(w)
    assert res.returncode == 0, res.stderr
    assert "meets the new policy (attested: true)" in res.stdout, res.stdout
    assert w.egress_works() and registrations(w) == 1

    # Another image pinned: the running enclave is removed at once, and refused when it
    # registers again.
    w.profile.write_text(good.replace(TEST_PCRS[0].hex(), OTHER_IMAGE_PCR0.hex()))
    res = reload(w)
    assert res.returncode == 0, res.stderr
    assert "removed the running enclave" in res.stdout and "PCR0" in res.stdout, res.stdout
    status = uapi_get(str(w.parent_uapi()))
    assert status["peers"] == [] and status["extra"]["wgvsock_attested"] == "false"
    assert w.curl(w.enclave, "http://198.51.100.2/", timeout=1.5) is None
    wait_for(lambda: "parent refused this enclave: attestation refused: PCR0" in
             (w.lab.tmp / "enclave.log").read_text(), RECOVERY_BOUND,
             "the removed enclave to be refused when it registers again")

    # The old pin back: the enclave's next attempt gets in, with the same key as before.
    w.profile.write_text(good)
    res = reload(w)
    assert res.returncode == 0, res.stderr
    assert "applies from the next registration" in res.stdout, res.stdout
    wait_for(w.egress_works, RECOVERY_BOUND, "the enclave to register again")
    peers = uapi_get(str(w.parent_uapi()))["peers"]
    assert [key_to_base64(p["public_key"]) for p in peers] == \
        [(ca_dir / "keys").read_text().split()[-1]]


def test_reload_of_name_rules_keeps_the_addresses_still_allowed(named: World) -> None:  # noqa: F811
    w = named
    e = w.enclave
    assert probe(e, "tcp", "ok.test", PORT) == (0, "srv 198.51.100.1")
    assert probe(e, "tcp", "x.wild.test", PORT) == (0, "srv 198.51.100.1")
    good = w.profile.read_text()

    # other.test allowed first (the rules' numbers move), x.wild.test denied.
    w.profile.write_text(good.replace("allow: [ok.test,", "allow: [other.test, ok.test,")
                         .replace("deny: [bad.wild.test]", "deny: [bad.wild.test, x.wild.test]"))
    res = reload(w)
    assert res.returncode == 0, res.stderr
    assert "1 address(es) of allowed names carried over" in res.stdout, res.stdout
    # ok.test's address moved to its rule's new set and works by number with no new lookup;
    # x.wild.test's is gone with its name, and a new connection to it is blocked.
    assert "198.51.100.2" in elements(w, 1) and elements(w, 2) == {}
    assert probe(e, "tcp", "198.51.100.2", PORT) == (0, "srv 198.51.100.1")
    assert probe(e, "tcp", "198.51.100.3", PORT)[0] == 3
    assert query(e, "x.wild.test")["rcode"] == "REFUSED"
    assert probe(e, "tcp", "other.test", PORT) == (0, "srv 198.51.100.1")

    # No names at all: the forwarder stops (its port closes, its counters leave the UAPI).
    w.profile.write_text(re.sub(r"allow: \[.*\]", "allow: [198.51.100.2/32]", good)
                         .replace("deny: [bad.wild.test]", "deny: [198.51.100.3/32]"))
    res = reload(w)
    assert res.returncode == 0, res.stderr
    # (The counters' reading is reused for a second, so one may still show them.)
    wait_for(lambda: "wgvsock_dns_queries" not in uapi_get(str(w.parent_uapi()))["extra"], 5,
             "the DNS counters to leave the parent's UAPI")
    assert ":53 " not in w.parent.run("ss", "-lunH", check=False).stdout
    assert probe(e, "tcp", "198.51.100.2", PORT) == (0, "srv 198.51.100.1")
    # And back: the forwarder starts again and answers.
    w.profile.write_text(good)
    res = reload(w)
    assert res.returncode == 0, res.stderr
    assert probe(e, "tcp", "ok.test", PORT) == (0, "srv 198.51.100.1")
    wait_for(lambda: int(uapi_get(str(w.parent_uapi()))["extra"]
                         .get("wgvsock_dns_queries", 0)) >= 1, 5,
             "the new forwarder's counters in the parent's UAPI")
