"""Issue 14, part 1: egress by host name, end to end with `parent up` and `enclave up`.

test_roles.py's three namespaces; the "internet" also runs dnsmasq, the parent's resolver
(parent.egress.resolver), which serves the test names:

    ok.test        198.51.100.2   allowed by name
    x.wild.test    198.51.100.3   allowed by "*.wild.test" (any name below wild.test)
    bad.wild.test  198.51.100.4   denied by name, although the wildcard covers it
    other.test     198.51.100.4   allowed by nothing
    alias.test     CNAME to target.test (198.51.100.6): allowed through the chain
    short.test     198.51.100.5   TTL 1 s; with test_dns_grace 1 its address expires in 2 s
    meta.test      169.254.169.254, the metadata service: allowed by name, denied anyway

Each address has a server answering on TCP and UDP port 7000 with "<label> <peer>".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from wgvsock.device.uapi import uapi_get
from wgvsock.services import firewall

from .netlab import Lab, Namespace, wait_for
from .test_firewall import probe, start_server
from .test_roles import WGVSOCK, World

pytestmark = [pytest.mark.root]

PY = sys.executable
DNS = "198.51.100.53"
PORT = 7000
SERVERS = {"198.51.100.2": "ok", "198.51.100.3": "wild", "198.51.100.4": "other",
           "198.51.100.5": "short", "198.51.100.6": "target", "169.254.169.254": "meta"}

PROFILE = """\
version: 1
name: {name}
interface: wg0
transport:
  kind: unix
  port: 51820
  path: {sock}
parent:
  address: 10.77.0.1/30
  private_key: {key}
  egress:
    allow: [ok.test, "*.wild.test", alias.test, Short.Test., meta.test:{port}/tcp]
    deny: [bad.wild.test]
    resolver: {dns}
    test_dns_grace: 1
enclave:
  address: 10.77.0.2/30
"""

# A DNS client from the enclave: prints {"rcode": ..., "addresses": [...]} as JSON.
QUERY = r"""
import json, sys
import dns.message, dns.query, dns.rcode, dns.rdatatype
name, rdtype, proto = sys.argv[1], sys.argv[2], sys.argv[3]
q = dns.message.make_query(name, rdtype)
ask = dns.query.tcp if proto == "tcp" else dns.query.udp
r = ask(q, "10.77.0.1", timeout=5)
addrs = [rd.address for rrset in r.answer if rrset.rdtype in (dns.rdatatype.A,
         dns.rdatatype.AAAA) for rd in rrset]
print(json.dumps({"rcode": dns.rcode.to_text(r.rcode()), "addresses": addrs}))
"""


def query(ns: Namespace, name: str, rdtype: str = "A", proto: str = "udp") -> dict:
    res = ns.run(PY, "-c", QUERY, name, rdtype, proto, timeout=30)
    return json.loads(res.stdout)


RECORDS = (
    "--host-record=ok.test,198.51.100.2",
    "--address=/wild.test/198.51.100.3",
    "--host-record=bad.wild.test,198.51.100.4",
    "--host-record=other.test,198.51.100.4",
    "--host-record=target.test,198.51.100.6",
    "--cname=alias.test,target.test",
    "--host-record=short.test,198.51.100.5,1",
    "--host-record=meta.test,169.254.169.254",
)


def start_dnsmasq(
    lab: Lab, internet: Namespace, records: tuple[str, ...] = RECORDS
) -> subprocess.Popen:
    """dnsmasq in the foreground, bound to DNS only, reading no file of this machine, serving
    `records` (its own options)."""
    internet.ip("addr", "add", f"{DNS}/24", "dev", "vb0")
    log = open(lab.tmp / "dnsmasq.log", "ab")  # noqa: SIM115 - closed by the process
    proc = internet.popen(
        shutil.which("dnsmasq") or "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
        "--no-hosts", "--no-resolv", "--no-poll", "--pid-file", "--user=root",
        f"--listen-address={DNS}", "--bind-interfaces", "--port=53", "--local-ttl=300",
        "--log-facility=-", "--log-queries", *records,
        stdout=log, stderr=log,
    )
    log.close()

    wait_for(lambda: f"{DNS}:53" in internet.run("ss", "-lunH", check=False).stdout, 10,
             "dnsmasq to listen")
    return proc


@pytest.fixture
def named(lab: Lab) -> Iterator[World]:
    """World with the name profile, dnsmasq and the servers; parent and enclave up."""
    w = World(lab, parent_env={"WGVSOCK_LOG_FILE": str(lab.tmp / "parent.log")})
    try:
        start_dnsmasq(lab, w.internet)
        for addr in SERVERS:
            if addr not in ("198.51.100.2", "198.51.100.3"):
                w.internet.ip("addr", "add", f"{addr}/32", "dev", "vb0")
        w.parent.ip("route", "add", "169.254.0.0/16", "via", "198.51.100.2")
        start_server(w.internet, "srv",
                     *(f"{p}:{a}:{PORT}" for a in SERVERS for p in ("tcp", "udp")))
        w.profile.write_text(PROFILE.format(name=w.name, sock=lab.tmp / "sock",
                                            key=lab.tmp / "parent.key", dns=DNS, port=PORT))
        res = w.parent_cmd("up", check=False)
        assert res.returncode == 0, (lab.tmp / "parent.log").read_text()
        w.start_enclave()
        wait_for(lambda: "nameserver 10.77.0.1" in w.resolv.read_text(), 30,
                 "the enclave to write resolv.conf")
        wait_for(lambda: w.enclave.run("ping", "-c1", "-W1", "10.77.0.1", check=False)
                 .returncode == 0, 30, "the tunnel")
        yield w
    finally:
        w.close()


def counters(w: World) -> dict[str, int]:
    return {k: c.packets for k, c in firewall.read_counters(w.name, netns=w.parent.name).items()}


def elements(w: World, index: int) -> dict[str, tuple[int, int]]:
    return firewall.set_elements(w.name, firewall.name_set(index, 4), netns=w.parent.name)


def test_names_allow_refuse_and_block(named: World) -> None:
    w = named
    e = w.enclave
    # Nothing resolved yet: the allowed name's address is not reachable by number.
    assert probe(e, "tcp", "198.51.100.2", PORT)[0] == 3
    # An allowed name, TCP and UDP, through the enclave's own resolver (resolv.conf).
    assert probe(e, "tcp", "ok.test", PORT) == (0, "srv 198.51.100.1")
    assert probe(e, "udp", "ok.test", PORT) == (0, "srv 198.51.100.1")
    assert "198.51.100.2" in elements(w, 0)
    timeout, expires = elements(w, 0)["198.51.100.2"]
    assert timeout == 301 and 0 < expires <= 301  # TTL 300 + test grace 1
    # The wildcard, at one and at two levels below wild.test.
    assert probe(e, "tcp", "x.wild.test", PORT) == (0, "srv 198.51.100.1")
    assert query(e, "a.b.wild.test")["addresses"] == ["198.51.100.3"]
    # Denied (the wildcard covers it, deny wins) and not allowed: REFUSED, nothing added.
    assert query(e, "bad.wild.test") == {"rcode": "REFUSED", "addresses": []}
    assert query(e, "other.test", proto="tcp") == {"rcode": "REFUSED", "addresses": []}
    assert query(e, "wild.test") == {"rcode": "REFUSED", "addresses": []}
    # An address that came from no allowed answer stays blocked, TCP and UDP, and is counted.
    before = counters(w)["egress_blocked"]
    assert probe(e, "tcp", "198.51.100.4", PORT)[0] == 3
    assert probe(e, "udp", "198.51.100.4", PORT)[0] == 3
    assert counters(w)["egress_blocked"] >= before + 2
    # A CNAME chain: alias.test is allowed, so its target's address is.
    assert query(e, "alias.test")["addresses"] == ["198.51.100.6"]
    assert "198.51.100.6" in elements(w, 2)
    assert probe(e, "tcp", "198.51.100.6", PORT) == (0, "srv 198.51.100.1")
    assert query(e, "target.test")["rcode"] == "REFUSED"  # the chain, not the name
    # DNS over TCP, with case and a trailing dot in the query.
    assert query(e, "OK.Test.", proto="tcp") == {"rcode": "NOERROR",
                                                "addresses": ["198.51.100.2"]}
    # The metadata service stays denied although an allowed name resolves to it.
    assert query(e, "meta.test")["addresses"] == ["169.254.169.254"]
    assert probe(e, "tcp", "meta.test", PORT)[0] == 3
    assert counters(w)["deny 169.254.169.254/32"] >= 1
    # Only the rule's port and protocol: meta.test:7000/tcp says nothing about UDP.
    c = counters(w)
    assert c["allow ok.test"] >= 2 and c["allow *.wild.test"] >= 1
    assert c["dns forwarder"] >= 8
    # The forwarder's counters reach the parent's UAPI, which status and metrics read.
    extra = uapi_get(str(w.parent_uapi()))["extra"]
    assert int(extra["wgvsock_dns_refused"]) == 4  # bad.wild, other, wild, target.test
    assert int(extra["wgvsock_dns_queries"]) >= 12


def test_ttl_expiry_removes_the_address(named: World) -> None:
    w = named
    e = w.enclave
    assert probe(e, "tcp", "short.test", PORT) == (0, "srv 198.51.100.1")
    timeout, _ = elements(w, 3)["198.51.100.5"]
    assert timeout == 2  # TTL 1 + test grace 1
    wait_for(lambda: "198.51.100.5" not in elements(w, 3), 10, "short.test's address to expire")
    assert probe(e, "tcp", "198.51.100.5", PORT)[0] == 3
    # A new answer brings it back.
    assert query(e, "short.test")["addresses"] == ["198.51.100.5"]
    assert probe(e, "tcp", "198.51.100.5", PORT) == (0, "srv 198.51.100.1")


HOSTILE = r"""
import os, socket, struct, sys, time
import dns.message
target = ("10.77.0.1", 53)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
good = dns.message.make_query("ok.test", "A").to_wire()
for _ in range(200):                                    # random bytes
    u.sendto(os.urandom(int.from_bytes(os.urandom(1)) + 1), target)
for n in range(1, len(good)):                           # every truncation of a real query
    u.sendto(good[:n], target)
r = dns.message.make_response(dns.message.from_wire(good)).to_wire()
u.sendto(r, target)                                     # a response, not a query
u.sendto(good + os.urandom(60000), target)              # huge
for i in range(1000):                                   # many at once, half of them allowed
    name = f"n{i}.wild.test" if i % 2 else f"n{i}.ok.test"
    u.sendto(dns.message.make_query(name, "A").to_wire(), target)
for payload in (os.urandom(300), struct.pack("!H", 65535) + b"x" * 10, struct.pack("!H", 5)):
    t = socket.create_connection(target, timeout=5)     # TCP: garbage, a short message, hang
    t.sendall(payload)
    t.close()
hung = [socket.create_connection(target, timeout=5) for _ in range(40)]  # idle clients
time.sleep(0.5)
for t in hung:
    t.close()
print("sent")
"""


# One query as a hostile enclave might shape it for the resolver: CD (validation off), a huge
# EDNS payload, Client Subnet and an option of its own, a record of its own; ID and case its.
SHAPED = r"""
import json, sys
import dns.edns, dns.flags, dns.message, dns.query, dns.rrset
q = dns.message.make_query("oK.TeSt", "A", use_edns=0, payload=65000, options=[
    dns.edns.ECSOption("203.0.113.0", 24), dns.edns.GenericOption(65001, b"x")])
q.id = 4242
q.flags |= dns.flags.CD
q.additional.append(dns.rrset.from_text("ns.evil.", 60, "IN", "A", "203.0.113.8"))
ask = dns.query.tcp if sys.argv[1] == "tcp" else dns.query.udp
r = ask(q, "10.77.0.1", timeout=5)
print(json.dumps({"id": r.id, "rcode": r.rcode(), "question": r.question[0].name.to_text(),
                  "addresses": [rd.address for rrset in r.answer for rd in rrset]}))
"""


def test_hostile_queries_do_not_stop_the_forwarder(named: World) -> None:
    w = named
    e = w.enclave
    res = e.run(PY, "-c", HOSTILE, timeout=60)
    assert res.stdout.strip() == "sent"
    # A query shaped for the resolver still gets its answer, under its own ID and spelling
    # (the resolver, dnsmasq here, gets a query of the forwarder's own).
    for proto in ("udp", "tcp"):
        assert json.loads(e.run(PY, "-c", SHAPED, proto, timeout=30).stdout) == {
            "id": 4242, "rcode": 0, "question": "oK.TeSt.", "addresses": ["198.51.100.2"]}
    # Still answering, on both transports, and the parent is still up.
    assert query(e, "ok.test")["addresses"] == ["198.51.100.2"]
    assert query(e, "ok.test", proto="tcp")["addresses"] == ["198.51.100.2"]
    assert query(e, "other.test")["rcode"] == "REFUSED"
    assert probe(e, "tcp", "ok.test", PORT) == (0, "srv 198.51.100.1")


def test_table_put_back_gets_its_addresses_again(named: World) -> None:
    """`parent up` puts a deleted table back, with the addresses its forwarder had added
    (before: empty name sets, so an allowed name failed until the enclave looked it up
    again)."""
    w = named
    e = w.enclave
    assert probe(e, "tcp", "ok.test", PORT) == (0, "srv 198.51.100.1")
    w.parent.run("nft", "delete", "table", "inet", firewall.table_name(w.name))
    wait_for(lambda: firewall.exists(w.name, netns=w.parent.name)
             and firewall.read_counters(w.name, netns=w.parent.name).get("allow ok.test")
             is not None, 20, "parent up to put its table back")
    assert "198.51.100.2" in elements(w, 0)
    # By address, with no new lookup: the address came back with the table.
    assert probe(e, "tcp", "198.51.100.2", PORT) == (0, "srv 198.51.100.1")


def test_a_loopback_resolver_in_the_parent_s_resolv_conf_answers_for_the_enclave(
        lab: Lab) -> None:
    """Review question: of the parent's /etc/resolv.conf nameservers only its own addresses
    are left out, so systemd-resolved's stub 127.0.0.53 is kept, though the enclave cannot
    reach the parent's loopback. It need not: the DNS forwarder runs on the parent and asks
    from there, and the enclave is given the forwarder's tunnel address, never these."""
    with World(lab, parent_env={"WGVSOCK_LOG_FILE": str(lab.tmp / "parent.log")}) as w:
        start_dnsmasq(lab, w.internet)
        # The stub: listening on 127.0.0.53 only, asking the internet's dnsmasq.
        stub_log = open(lab.tmp / "stub.log", "ab")  # noqa: SIM115 - closed by the process
        w.parent.popen(
            shutil.which("dnsmasq") or "dnsmasq", "--keep-in-foreground",
            "--conf-file=/dev/null", "--no-hosts", "--no-resolv", "--no-poll", "--pid-file",
            "--user=root", "--listen-address=127.0.0.53", "--bind-interfaces", "--port=53",
            f"--server={DNS}", "--log-facility=-", "--log-queries",
            stdout=stub_log, stderr=stub_log)
        stub_log.close()
        wait_for(lambda: "127.0.0.53:53" in w.parent.run("ss", "-lunH", check=False).stdout,
                 10, "the stub resolver to listen")
        w.profile.write_text(PROFILE.format(name=w.name, sock=lab.tmp / "sock",
                                            key=lab.tmp / "parent.key", dns=DNS, port=PORT)
                             .replace(f"    resolver: {DNS}\n", ""))
        assert "resolver:" not in w.profile.read_text()
        conf = lab.tmp / "parent-resolv.conf"
        conf.write_text("nameserver 127.0.0.53\n")
        # The parent's own resolv.conf, in a mount namespace of its own (bound over
        # /etc/resolv.conf there only); the background parent stays in it.
        up = w.parent.run("unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(conf),
                          WGVSOCK, "parent", "up", "--profile", str(w.profile),
                          env=w.env_for("parent"), check=False, timeout=60)
        assert up.returncode == 0, up.stderr
        w.start_enclave()
        wait_for(lambda: "nameserver 10.77.0.1" in w.resolv.read_text(), 30,
                 "the enclave to write resolv.conf")
        assert query(w.enclave, "ok.test") == {"rcode": "NOERROR",
                                               "addresses": ["198.51.100.2"]}
        assert "ok.test" in (lab.tmp / "stub.log").read_text()  # asked through the stub
        assert "upstream 127.0.0.53" in (lab.tmp / "parent.log").read_text()
        assert w.parent_cmd("down").returncode == 0
