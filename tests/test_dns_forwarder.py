"""Issue 14, part 1: the DNS forwarder on its own, on loopback, with a stand-in upstream built
from dnspython. Its counters (Stats) are what `wgvsock status` and the metrics read; the end
to end tests with dnsmasq and nftables are tests/net/test_egress_names.py."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from wgvsock.services.egress import forwarder
from wgvsock.services.egress.forwarder import Forwarder, answer_addresses
from wgvsock.services.egress.names import NamePattern, NamePolicy, NameRule
from wgvsock.services.egress.refusals import Refusals
from wgvsock.ui.nslab import wait_for

LOOP = "127.0.0.1"

RECORDS = {
    "ok.test.": ["ok.test. 300 IN A 192.0.2.1", "ok.test. 300 IN A 192.0.2.2"],
    "v6.test.": ["v6.test. 30 IN AAAA 2001:db8::1"],
    "alias.test.": ["alias.test. 60 IN CNAME mid.test.", "mid.test. 60 IN CNAME end.test.",
                    "end.test. 20 IN A 192.0.2.9", "stray.test. 60 IN A 192.0.2.66"],
    "big.test.": [f"big.test. 300 IN A 192.0.2.{i}" for i in range(1, 100)],
    "twin.test.": ["twin.test. 30 IN A 192.0.2.1"],  # ok.test's first address too
    # Whoever answers for an allowed name may write anything, the parent's neighbourhood too.
    "local.test.": ["local.test. 300 IN A 255.255.255.255", "local.test. 300 IN A 0.0.0.0",
                    "local.test. 300 IN A 127.0.0.53", "local.test. 300 IN A 224.0.0.251",
                    "local.test. 300 IN A 192.0.2.3"],
    "local6.test.": ["local6.test. 300 IN AAAA ::", "local6.test. 300 IN AAAA ::1",
                     "local6.test. 300 IN AAAA ff02::1", "local6.test. 300 IN AAAA fe80::1",
                     "local6.test. 300 IN AAAA ::ffff:127.0.0.1",
                     "local6.test. 300 IN AAAA 2001:db8::3"],
}


def rr(text: str) -> dns.rrset.RRset:
    name, ttl, rdclass, rdtype, value = text.split()
    return dns.rrset.from_text(name, int(ttl), rdclass, rdtype, value)


class Upstream:
    """Answers RECORDS over UDP and TCP; `silent` makes it ignore every query. Over UDP an
    answer larger than the query's EDNS payload (512 without EDNS) is truncated, as a real
    server's would be. It keeps every query it was sent, as sent."""

    def __init__(self) -> None:
        for _ in range(20):  # the UDP port's TCP twin may be taken: try another
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((LOOP, 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((LOOP, self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(8)
        self.silent = False
        self.rcode: int | None = None  # answer every query with this rcode instead
        self.queries = 0
        self.ids: list[int] = []  # the IDs of the queries it was sent
        self.received: list[tuple[str, dns.message.Message]] = []  # ("udp" or "tcp", query)
        # Cleared, each answer waits until it is set again (an answer held in flight).
        self.gate = threading.Event()
        self.gate.set()
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def response(self, wire: bytes, kind: str = "udp") -> bytes:
        q = dns.message.from_wire(wire)
        self.ids.append(q.id)
        self.received.append((kind, q))
        r = dns.message.make_response(q)
        if self.rcode is not None:
            r.set_rcode(self.rcode)
            return r.to_wire()
        for text in RECORDS.get(q.question[0].name.to_text().lower(), []):
            r.answer.append(rr(text))
        if kind == "tcp":
            return r.to_wire(max_size=65535)
        try:
            return r.to_wire(max_size=max(512, q.payload) if q.edns >= 0 else 512)
        except dns.exception.TooBig:
            short = dns.message.make_response(q)
            short.flags |= dns.flags.TC
            return short.to_wire()

    def _serve_udp(self) -> None:
        while True:
            try:
                wire, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            self.queries += 1
            self.gate.wait()
            if not self.silent:
                self.udp.sendto(self.response(wire), peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                wire, _ = dns.query.receive_tcp(conn, time.time() + 5)
                self.queries += 1
                if not self.silent:
                    dns.query.send_tcp(conn, self.response(wire.to_wire(), "tcp"))

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOP, 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, **kw) -> None:
        self.upstream = Upstream()
        self.updates: list[list] = []
        self.fail_nft = False
        self.refusals = Refusals()
        allow = [NameRule(NamePattern.parse(p)) for p in ("*.test", "ok.test")]
        deny = [NameRule(NamePattern.parse("bad.test"))]
        for attempt in range(5):  # a free port can be taken between looking and binding
            self.port = free_port()
            self.fwd = Forwarder(listen=[ipaddress.ip_address(LOOP)],
                                 upstream=[ipaddress.ip_address(LOOP)],
                                 policy=NamePolicy(allow, deny), update_sets=self.update,
                                 grace=60, port=self.port, upstream_port=self.upstream.port,
                                 refusals=self.refusals, **{"timeout": 0.5, **kw})
            try:
                self.fwd.start()
                break
            except OSError:
                self.fwd.close()
                if attempt == 4:
                    raise

    def update(self, elements: list) -> None:
        if self.fail_nft:
            raise RuntimeError("nft refused")
        self.updates.append(elements)

    def ask(self, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype)
        if tcp:
            return dns.query.tcp(q, LOOP, timeout=5, port=self.port)
        return dns.query.udp(q, LOOP, timeout=5, port=self.port)

    def close(self) -> None:
        self.fwd.close()
        self.upstream.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


def test_allowed_answer_fills_the_sets_before_the_reply(h: Harness) -> None:
    r = h.ask("OK.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert sorted(rd.address for rd in r.answer[0]) == ["192.0.2.1", "192.0.2.2"]
    # Both rules match ok.test: both sets, TTL 300 + grace 60.
    assert sorted((s, str(a), t) for s, a, t in h.updates[0]) == [
        ("name0_v4", "192.0.2.1", 360), ("name0_v4", "192.0.2.2", 360),
        ("name1_v4", "192.0.2.1", 360), ("name1_v4", "192.0.2.2", 360)]
    # Asked again right away: the elements outlive the answer already, so no nft run.
    h.ask("ok.test", tcp=True)
    assert len(h.updates) == 1
    r = h.ask("v6.test", "AAAA")
    assert [(s, str(a), t) for s, a, t in h.updates[1]] == [("name0_v6", "2001:db8::1", 90)]
    s = h.fwd.stats
    assert (s.queries, s.forwarded, s.refused, s.addresses_added) == (3, 3, 0, 5)


def test_addresses_that_never_leave_the_parent_stay_out_of_the_sets(h: Harness) -> None:
    """Broadcast, unspecified, loopback, multicast and IPv6 link-local addresses in an
    allowed answer are nobody's destination beyond the parent: the sets never take them, so
    a name's DNS cannot aim the enclave at the parent's own neighbourhood. The answer itself
    goes back unchanged (a DNS filter's 0.0.0.0 sinkhole is a normal answer)."""
    r = h.ask("local.test")
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 5
    r6 = h.ask("local6.test", "AAAA")
    assert r6.rcode() == dns.rcode.NOERROR and len(r6.answer[0]) == 6
    added = {(s, str(a)) for update in h.updates for s, a, _ in update}
    assert added == {("name0_v4", "192.0.2.3"), ("name0_v6", "2001:db8::3")}
    assert h.fwd.stats.addresses_skipped == 9
    assert h.fwd.stats.addresses_added == 2


def rules(allow: Sequence[str], deny: Sequence[str] = ()) -> NamePolicy:
    return NamePolicy([NameRule(NamePattern.parse(p)) for p in allow],
                      [NameRule(NamePattern.parse(p)) for p in deny])


def test_a_new_table_starts_with_the_addresses_the_new_rules_allow(h: Harness) -> None:
    """`parent reload` (and a table put back after a flush) replace the nft table: the
    addresses of names the new rules still allow go into the new table at once, in the sets
    of the rules that allow them now, with what is left of their timeouts."""
    h.ask("ok.test")
    h.ask("v6.test", "AAAA")
    h.ask("alias.test")
    tables: list[list] = []
    # Rule 0 is now ok.test alone, rule 1 *.test; alias.test is denied.
    carried = h.fwd.rebuild(tables.append, policy=rules(["ok.test", "*.test"], ["alias.test"]))
    got = sorted((s, str(a)) for s, a, _ in tables[0])
    assert got == [("name0_v4", "192.0.2.1"), ("name0_v4", "192.0.2.2"),
                   ("name1_v4", "192.0.2.1"), ("name1_v4", "192.0.2.2"),
                   ("name1_v6", "2001:db8::1")]
    assert carried == 5
    assert all(t in (359, 360) for s, _, t in tables[0] if s.endswith("v4"))
    # The new table has them, so asking again costs no nft run; the denied name is refused.
    updates = len(h.updates)
    h.ask("ok.test")
    assert len(h.updates) == updates
    assert h.ask("alias.test").rcode() == dns.rcode.REFUSED
    # The same policy again (a flushed table put back) carries the same addresses.
    h.fwd.rebuild(tables.append)
    assert sorted((s, str(a)) for s, a, _ in tables[1]) == got


def test_a_new_table_keeps_no_address_of_a_newly_denied_alias_target(h: Harness) -> None:
    """alias.test -> mid.test -> end.test (192.0.2.9): denying end.test must take its address
    out at once, although the name that was asked, alias.test, is still allowed."""
    h.ask("alias.test")
    tables: list[list] = []
    h.fwd.rebuild(tables.append, policy=rules(["*.test"], ["end.test"]))
    assert tables == [[]]
    assert h.ask("alias.test").rcode() == dns.rcode.REFUSED


def test_a_shared_address_stays_while_any_name_that_gave_it_is_allowed(h: Harness) -> None:
    h.ask("ok.test")  # 192.0.2.1 and .2, TTL 300
    h.ask("twin.test")  # 192.0.2.1, TTL 30: remembered beside ok.test's answer
    tables: list[list] = []
    h.fwd.rebuild(tables.append, policy=rules(["*.test"], ["ok.test"]))
    # ok.test denied: .2 goes; .1 stays for twin.test, until twin.test's TTL plus the grace.
    assert [(s, str(a)) for s, a, _ in tables[0]] == [("name0_v4", "192.0.2.1")]
    assert 88 <= tables[0][0][2] <= 90
    h.fwd.rebuild(tables.append, policy=rules(["*.test"], ["twin.test"]))
    # And the other way round: ok.test's longer TTL decides.
    h.ask("ok.test")
    h.fwd.rebuild(tables.append, policy=rules(["*.test"], ["twin.test"]))
    assert sorted((s, str(a)) for s, a, _ in tables[2]) == [("name0_v4", "192.0.2.1"),
                                                           ("name0_v4", "192.0.2.2")]


def test_a_new_table_takes_the_new_grace(h: Harness) -> None:
    """Carried elements end at their answers' TTL plus the grace in force from now on: a
    shorter grace must not leave them the old, longer one."""
    h.ask("ok.test")  # TTL 300, grace 60
    tables: list[list] = []
    h.fwd.rebuild(tables.append, grace=5)
    assert {t for _, _, t in tables[0]} <= {304, 305}
    h.fwd.rebuild(tables.append, grace=3600)
    assert {t for _, _, t in tables[1]} <= {3899, 3900}
    # And the answers from now on: a refresh is due before TTL + grace / 2.
    assert h.fwd.grace == 3600


@pytest.mark.parametrize(("ttl", "every"), [(5, 5), (60, 10), (300, 25), (60, 31)])
def test_an_address_asked_for_again_and_again_never_lapses(ttl: int, every: int) -> None:
    """Answers that need no nft run are remembered too, and must not move the point where
    the element is refreshed: it follows the expiry last written to nft. (It once followed
    the answers, so a name asked more often than every grace / 2 lost its address after its
    first TTL plus the grace, for good; a review found that.)"""
    now = [1000.0]
    nft: dict[tuple[str, str], float] = {}
    writes: list[list] = []

    def update(elements: list) -> None:
        writes.append(elements)
        for set_, addr, timeout in elements:
            nft[set_, str(addr)] = now[0] + timeout

    fwd = Forwarder(listen=[ipaddress.ip_address(LOOP)], upstream=[ipaddress.ip_address(LOOP)],
                    policy=rules(["ok.test"]), update_sets=update, grace=60,
                    clock=lambda: now[0])
    addr = ipaddress.ip_address("192.0.2.1")
    try:
        for _ in range(600 // every):
            fwd._commit(0, [("name0_v4", addr, ttl)], (("ok", "test"), False))
            expiry = nft["name0_v4", "192.0.2.1"]
            assert expiry >= now[0] + ttl + 30, f"element ends at {expiry - 1000:.0f} s, " \
                f"asked at {now[0] - 1000:.0f} s with TTL {ttl}"
            now[0] += every
        assert len(writes) < 600 // every or every > 30  # repeated answers cost no nft run each
    finally:
        fwd.close()


def test_forgetting_answers_never_shortens_an_element(monkeypatch) -> None:
    """When too many answers are remembered they are forgotten, but not the expiry written
    to nft: the next answer for an address must not cut short what an earlier, longer TTL
    handed out (a review found that)."""
    monkeypatch.setattr(forwarder, "MAX_TRACKED", 40)
    now = [1000.0]
    nft: dict[tuple[str, str], float] = {}

    def update(elements: list) -> None:
        for set_, addr, timeout in elements:
            nft[set_, str(addr)] = now[0] + timeout

    fwd = Forwarder(listen=[ipaddress.ip_address(LOOP)], upstream=[ipaddress.ip_address(LOOP)],
                    policy=rules(["*.test"]), update_sets=update, grace=60,
                    clock=lambda: now[0])
    try:
        fwd._commit(0, [("name0_v4", ipaddress.ip_address("192.0.2.1"), 3600)],
                    (("a", "test"), False))
        for i in range(100):  # a flood of other names: the answers are forgotten
            fwd._commit(0, [("name0_v4", ipaddress.ip_address(f"198.51.100.{i}"), 3600)],
                        ((f"n{i}", "test"), False))
        now[0] += 100
        fwd._commit(0, [("name0_v4", ipaddress.ip_address("192.0.2.1"), 5)],
                    (("b", "test"), False))
        assert nft["name0_v4", "192.0.2.1"] >= 1000 + 3600
        assert fwd._pairs == sum(map(len, fwd._live.values())) <= 40
    finally:
        fwd.close()


def test_answers_that_come_while_nft_runs_share_its_next_run() -> None:
    """One nft run costs some 10-15 ms (a process): one run per fresh answer capped a
    DNS-heavy enclave at about 70 new names a second, each waiting for all before it. The
    answers that arrive while a run is under way go to nft together in the next one."""
    import asyncio

    entered, release = threading.Event(), threading.Event()
    calls: list[list] = []

    def update(elements: list) -> None:
        calls.append(elements)
        entered.set()
        assert release.wait(30)

    fwd = Forwarder(listen=[ipaddress.ip_address(LOOP)], upstream=[ipaddress.ip_address(LOOP)],
                    policy=rules(["*.test"]), update_sets=update, grace=60)

    async def main() -> list[bool]:
        def allow(i: int) -> asyncio.Task:
            return asyncio.ensure_future(fwd._allow(
                0, [0], ((f"n{i}", "test"), False),
                [(ipaddress.ip_address(f"198.51.100.{i}"), 60)]))
        first = allow(0)
        while not entered.is_set():  # the first run is under way (nft is slow)
            await asyncio.sleep(0.01)
        rest = [allow(i) for i in range(1, 20)]
        await asyncio.sleep(0.2)  # let each reach its wait for nft
        release.set()
        return list(await asyncio.wait_for(asyncio.gather(first, *rest), 60))

    try:
        assert asyncio.run(main()) == [True] * 20
        assert len(calls) == 2, [len(c) for c in calls]  # 20 before: one run per answer
        assert sorted(str(a) for c in calls for _, a, _ in c) == sorted(
            f"198.51.100.{i}" for i in range(20))
        assert fwd.stats.addresses_added == 20
    finally:
        release.set()
        fwd.close()


def test_a_table_that_nft_refuses_changes_nothing(h: Harness) -> None:
    h.ask("ok.test")

    def refuse(elements: list) -> None:
        raise RuntimeError("nft refused the table")

    with pytest.raises(RuntimeError):
        h.fwd.rebuild(refuse, policy=rules(["nothing.test"]))
    # Still the old rules and the old sets: ok.test is allowed and needs no new nft run.
    updates = len(h.updates)
    assert h.ask("ok.test").rcode() == dns.rcode.NOERROR
    assert len(h.updates) == updates
    assert h.fwd.policy.allowed_by(("ok", "test")) == [0, 1]


def test_an_answer_in_flight_across_a_new_table_is_not_added(h: Harness) -> None:
    """Its rules were chosen under the old table, whose set numbers may mean other rules
    now: the update is dropped and the client gets SERVFAIL, so it asks again."""
    h.upstream.gate.clear()
    result: list[dns.message.Message] = []
    asker = threading.Thread(target=lambda: result.append(h.ask("ok.test")))
    asker.start()
    try:
        wait_for(lambda: h.upstream.queries == 1, 5, "the query to reach the upstream")
        h.fwd.rebuild(lambda elements: None, policy=rules(["ok.test"]))
    finally:
        h.upstream.gate.set()
        asker.join(10)
    assert result[0].rcode() == dns.rcode.SERVFAIL
    assert h.updates == []
    r = h.ask("ok.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert sorted((s, str(a)) for s, a, _ in h.updates[0]) == [
        ("name0_v4", "192.0.2.1"), ("name0_v4", "192.0.2.2")]


def test_an_alias_of_a_denied_name_is_refused(h: Harness) -> None:
    """alias.test is allowed, but its CNAME chain reaches end.test, which is denied: its
    address is the denied name's, so the answer is refused and nothing is added."""
    h.fwd.rebuild(lambda elements: None, policy=rules(["*.test"], ["end.test"]))
    assert h.ask("alias.test").rcode() == dns.rcode.REFUSED
    assert h.ask("end.test").rcode() == dns.rcode.REFUSED
    assert h.updates == []
    assert h.fwd.stats.refused == 2
    assert [(r.what, r.rule) for r in h.refusals.recent()] == [
        ("end.test", "denied"), ("alias.test", "alias of end.test")]
    # A denied name in the middle of the chain counts too.
    h.fwd.rebuild(lambda elements: None, policy=rules(["*.test"], ["mid.test"]))
    assert h.ask("alias.test").rcode() == dns.rcode.REFUSED
    h.fwd.rebuild(lambda elements: None, policy=rules(["*.test"]))
    assert h.ask("alias.test").rcode() == dns.rcode.NOERROR
    assert [str(a) for _, a, _ in h.updates[0]] == ["192.0.2.9"]


def test_a_forwarder_that_fails_to_start_leaves_no_socket_open(monkeypatch) -> None:
    import os

    async def broken(self, socks) -> None:
        raise RuntimeError("no loop for you")

    monkeypatch.setattr(Forwarder, "_serve", broken)
    before = len(os.listdir("/proc/self/fd"))
    fwd = Forwarder(listen=[ipaddress.ip_address(LOOP)], upstream=[ipaddress.ip_address(LOOP)],
                    policy=rules(["ok.test"]), update_sets=lambda elements: None, grace=60,
                    port=free_port())
    with pytest.raises(OSError, match="failed to start: no loop for you"):
        fwd.start()
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before, 5,
             "the forwarder's sockets and loop to be closed")


def test_the_resolver_sees_our_query_ids_and_the_enclave_its_own(h: Harness) -> None:
    """An enclave that chose the IDs the resolver sees could tell an accomplice what a forged
    answer (whose addresses would be allowed) must carry."""
    for tcp in (False, True, False):
        q = dns.message.make_query("ok.test", "A")
        q.id = 4242
        ask = dns.query.tcp if tcp else dns.query.udp
        r = ask(q, LOOP, timeout=5, port=h.port)
        assert r.id == 4242 and r.rcode() == dns.rcode.NOERROR
    assert len(h.upstream.ids) == 3 and h.upstream.ids != [4242] * 3
    assert len(set(h.upstream.ids)) > 1


def enclave_query(name: str = "Ok.TeSt", **edns) -> dns.message.Message:
    """A query as a hostile enclave might send it: CD set, a huge EDNS payload, EDNS
    options (one of them Client Subnet) and records of its own in every section."""
    q = dns.message.make_query(name, "A", use_edns=0, payload=65000, options=[
        dns.edns.GenericOption(65001, b"accomplice"),
        dns.edns.ECSOption("203.0.113.0", 24)], **edns)
    q.id = 4242
    q.flags |= dns.flags.CD
    q.answer.append(rr("ok.test. 300 IN A 203.0.113.7"))
    q.authority.append(rr("test. 300 IN NS ns.evil."))
    q.additional.append(rr("ns.evil. 300 IN A 203.0.113.8"))
    return q


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_the_resolver_gets_the_question_and_nothing_else_of_the_enclave(h: Harness,
                                                                        tcp: bool) -> None:
    """CD=1 would turn off the resolver's DNSSEC validation for the very answers that fill
    the allow sets; a payload of 65000 invites fragmented answers, easier to forge; EDNS
    options (Client Subnet) and extra records are the enclave's to choose, not the
    resolver's to see. The resolver gets a query of ours: the question, RD, EDNS with a
    payload of 1232 and nothing more (before: the enclave's query with only its ID
    replaced; a review found that)."""
    ask = dns.query.tcp if tcp else dns.query.udp
    r = ask(enclave_query(), LOOP, timeout=5, port=h.port)
    [(kind, sent)] = h.upstream.received
    assert kind == ("tcp" if tcp else "udp")
    assert sent.id != 4242
    assert sent.flags & dns.flags.RD and not sent.flags & dns.flags.CD
    assert sent.opcode() == dns.opcode.QUERY
    assert (sent.edns, sent.payload, list(sent.options)) == (0, 1232, [])
    assert not sent.ednsflags & dns.flags.DO
    assert (sent.answer, sent.authority, sent.additional) == ([], [], [])
    assert [(q.name, q.rdtype, q.rdclass) for q in sent.question] == [
        (dns.name.from_text("ok.test"), dns.rdatatype.A, dns.rdataclass.IN)]
    # The enclave gets its answer under its own ID, its question as it spelled it (0x20).
    assert r.id == 4242 and r.rcode() == dns.rcode.NOERROR
    assert [q.name.to_text() for q in r.question] == ["Ok.TeSt."]
    assert r.flags & dns.flags.RD and r.flags & dns.flags.CD  # echoed (RFC 4035 §3.2.2)
    assert sorted(rd.address for rrset in r.answer for rd in rrset) == ["192.0.2.1",
                                                                      "192.0.2.2"]
    assert (r.authority, r.additional, r.edns, list(r.options)) == ([], [], 0, [])
    # Only the resolver's addresses went into the sets, none of the enclave's records.
    assert sorted({str(a) for update in h.updates for _, a, _ in update}) == [
        "192.0.2.1", "192.0.2.2"]


def test_the_reply_follows_the_clients_query(h: Harness) -> None:
    """RD is the client's, EDNS only for a client that spoke it, and DO (which asks for the
    RRSIGs a validating stub needs and turns nothing off) passes both ways."""
    q = dns.message.make_query("ok.test", "A")
    q.flags = dns.flags.Flag(0)  # RD=0, no EDNS
    r = dns.query.udp(q, LOOP, timeout=5, port=h.port)
    assert r.id == q.id and r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2
    assert not r.flags & (dns.flags.RD | dns.flags.CD) and r.edns == -1
    sent = h.upstream.received[-1][1]
    assert sent.flags & dns.flags.RD and (sent.edns, sent.payload) == (0, 1232)
    r = dns.query.udp(dns.message.make_query("ok.test", "A", want_dnssec=True), LOOP,
                      timeout=5, port=h.port)
    assert r.ednsflags & dns.flags.DO and r.edns == 0
    sent = h.upstream.received[-1][1]
    assert sent.ednsflags & dns.flags.DO and list(sent.options) == []


def test_an_edns_version_above_0_gets_badvers(h: Harness) -> None:
    """Before: a client's EDNS version 1 got a version-0 answer, read as if it were in the
    client's version. RFC 6891 §6.1.3: BADVERS, with our OPT saying version 0, and the
    resolver is not asked."""
    q = dns.message.make_query("ok.test", "A", use_edns=1)
    r = dns.query.udp(q, LOOP, timeout=5, port=h.port)
    assert r.id == q.id and r.rcode() == dns.rcode.BADVERS and r.edns == 0
    assert not r.answer and h.upstream.received == [] and h.updates == []
    r = dns.query.udp(dns.message.make_query("ok.test", "A", use_edns=0), LOOP, timeout=5,
                      port=h.port)
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2


def test_an_answer_too_big_for_1232_bytes_is_fetched_over_tcp(h: Harness) -> None:
    """The resolver may send us at most 1232 bytes over UDP; a longer answer comes over TCP
    from it, and the client gets it whole if it fits the client's own EDNS payload."""
    q = dns.message.make_query("big.test", "A", use_edns=0, payload=4096)
    r = dns.query.udp(q, LOOP, timeout=5, port=h.port)
    assert r.id == q.id and not r.flags & dns.flags.TC and len(r.answer[0]) == 99
    assert [(kind, sent.payload) for kind, sent in h.upstream.received] == [("udp", 1232),
                                                                          ("tcp", 1232)]
    assert len(h.updates[0]) == 99  # the whole answer's addresses, not a truncated one's


def test_an_extended_rcode_of_the_resolver_is_servfail(h: Harness) -> None:
    """BADVERS, BADCOOKIE and the like speak of our EDNS exchange with the resolver, not of
    the client's question, and need an OPT record the client may not have: SERVFAIL."""
    h.upstream.rcode = dns.rcode.BADVERS
    for q in (dns.message.make_query("ok.test", "A"),
              dns.message.make_query("ok.test", "A", use_edns=0)):
        r = dns.query.udp(q, LOOP, timeout=5, port=h.port)
        assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL
    assert h.fwd.stats.upstream_failures == 2 and h.updates == []


def test_denied_and_unknown_names_are_refused_and_counted(h: Harness) -> None:
    for name, tcp in (("bad.test", False), ("example.com", True), ("test", False)):
        assert h.ask(name, tcp=tcp).rcode() == dns.rcode.REFUSED
    assert h.upstream.queries == 0
    assert h.fwd.stats.refused == 3
    assert [(r.kind, r.what, r.rule, r.count) for r in h.refusals.recent()] == [
        ("dns", "test", "not allowed", 1), ("dns", "example.com", "not allowed", 1),
        ("dns", "bad.test", "denied", 1)]
    h.ask("bad.test")
    assert h.refusals.recent()[0].what == "bad.test" and h.refusals.recent()[0].count == 2
    assert h.updates == []


def test_unlisted_names_resolve_when_every_address_is_allowed(h: Harness) -> None:
    """deny names with a catch-all allow CIDR: a block list. Other names are forwarded (and
    need no set: every address is allowed already); denied ones are still refused."""
    h.fwd.rebuild(lambda elements: None,
                  policy=NamePolicy([], [NameRule(NamePattern.parse("bad.test"))],
                                    resolve_unlisted=True))
    updates = len(h.updates)
    r = h.ask("ok.test")
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2
    assert len(h.updates) == updates
    assert h.ask("bad.test").rcode() == dns.rcode.REFUSED
    assert h.ask("alias.test").rcode() == dns.rcode.NOERROR


def test_cname_chain_only() -> None:
    q = dns.message.make_query("alias.test", "A")
    r = dns.message.make_response(q)
    for text in RECORDS["alias.test."]:
        r.answer.append(rr(text))
    assert [(str(a), t) for a, t in answer_addresses(r, q.question[0].name)] == [
        ("192.0.2.9", 20)]  # stray.test is in the answer but not in the chain


def test_an_address_through_a_cname_lives_no_longer_than_the_cname() -> None:
    """RFC 2181 §5.2 / what resolvers cache: the answer is only good while every record that
    led to the address is, so a short-lived CNAME cuts the address's TTL."""
    q = dns.message.make_query("api.example.com", "A")
    r = dns.message.make_response(q)
    for text in ("api.example.com. 30 IN CNAME lb.example.net.",
                 "lb.example.net. 86400 IN A 192.0.2.1"):
        r.answer.append(rr(text))
    assert [(str(a), t) for a, t in answer_addresses(r, q.question[0].name)] == [
        ("192.0.2.1", 30)]
    # The shortest along a longer chain; a CNAME outside the chain does not count.
    q = dns.message.make_query("a.test", "A")
    r = dns.message.make_response(q)
    for text in ("a.test. 600 IN CNAME b.test.", "b.test. 45 IN CNAME c.test.",
                 "c.test. 300 IN A 192.0.2.3", "x.test. 5 IN CNAME c.test."):
        r.answer.append(rr(text))
    assert [(str(a), t) for a, t in answer_addresses(r, q.question[0].name)] == [
        ("192.0.2.3", 45)]


def test_upstream_silence_is_servfail_in_bounded_time(h: Harness) -> None:
    h.upstream.silent = True
    start = time.monotonic()
    assert h.ask("ok.test").rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - start < 3
    assert h.fwd.stats.upstream_failures == 1


def test_nft_failure_is_servfail(h: Harness) -> None:
    h.fail_nft = True
    assert h.ask("ok.test").rcode() == dns.rcode.SERVFAIL
    assert h.fwd.stats.set_failures == 1


def test_big_answer_is_truncated_over_udp_and_whole_over_tcp(h: Harness) -> None:
    r = h.ask("big.test")
    assert r.flags & dns.flags.TC and not r.answer
    assert len(h.ask("big.test", tcp=True).answer[0]) == 99


def test_hostile_input_is_dropped_and_counted(h: Harness) -> None:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    good = dns.message.make_query("ok.test", "A").to_wire()
    junk = [b"", b"\x00", b"\xff" * 11, good[:5], good[:-1], good + b"\x00" * 5000,
            dns.message.make_response(dns.message.from_wire(good)).to_wire()]
    for payload in junk:
        u.sendto(payload, (LOOP, h.port))
    for payload in (b"\x00\x05abc", b"\xff\xff" + b"x" * 100, b"\x00\x0bhello world"):
        with socket.create_connection((LOOP, h.port), timeout=5) as t:
            t.sendall(payload)
    wait_for(lambda: h.fwd.stats.dropped >= len(junk), 5, "the junk to be dropped")
    assert h.ask("ok.test").rcode() == dns.rcode.NOERROR
    assert h.ask("ok.test", tcp=True).rcode() == dns.rcode.NOERROR
    u.close()


def test_concurrency_and_tcp_clients_are_bounded() -> None:
    h = Harness(max_in_flight=2, max_tcp_clients=2, tcp_idle=0.5)
    try:
        h.upstream.silent = True  # every allowed query waits for the 0.5 s timeout
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(20):
            u.sendto(dns.message.make_query(f"n{i}.ok.test", "A").to_wire(), (LOOP, h.port))
        wait_for(lambda: h.fwd.stats.queries == 20, 5, "the queries to arrive")
        assert h.fwd.stats.dropped == 18
        wait_for(lambda: h.fwd.stats.upstream_failures == 2, 5, "the two in flight to end")
        # Two idle TCP clients fill the slots, a third is closed at once; idle ones time out.
        idle = [socket.create_connection((LOOP, h.port), timeout=5) for _ in range(2)]
        wait_for(lambda: h.fwd._tcp_clients == 2, 5, "both TCP clients to be accepted")
        third = socket.create_connection((LOOP, h.port), timeout=5)
        assert third.recv(1) == b""
        for t in idle:
            assert t.recv(1) == b""  # closed after tcp_idle
        third.close()
        h.upstream.silent = False
        assert h.ask("ok.test", tcp=True).rcode() == dns.rcode.NOERROR
        u.close()
        for t in idle:
            t.close()
    finally:
        h.close()


def test_port_taken_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOP, 0))
        port = s.getsockname()[1]
        fwd = Forwarder(listen=[ipaddress.ip_address(LOOP)], upstream=[ipaddress.ip_address(LOOP)],
                        policy=NamePolicy([], []), update_sets=lambda e: None, grace=60,
                        port=port)
        with pytest.raises(OSError, match=f"DNS forwarder cannot listen on port {port}"):
            fwd.start()
        fwd.close()


def test_only_the_enclave_may_ask() -> None:
    h = Harness(clients=[ipaddress.ip_address("127.0.0.2")])
    try:
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(dns.message.make_query("ok.test", "A"), LOOP, timeout=0.5,
                          port=h.port)
        with socket.create_connection((LOOP, h.port), timeout=5) as t:
            assert t.recv(1) == b""  # closed at once
        assert h.fwd.stats.dropped == 2 and h.upstream.queries == 0
    finally:
        h.close()


def test_an_allowed_name_asked_in_another_class_is_refused_saying_so(h: Harness,
                                                                     caplog) -> None:
    """Before: refused as "not allowed", and the log advised adding an allow entry that
    was there already (review finding)."""
    import logging

    q = dns.message.make_query("ok.test", "TXT", rdclass=dns.rdataclass.CH)
    with caplog.at_level(logging.WARNING, "wgvsock.refused"):
        assert dns.query.udp(q, LOOP, timeout=5, port=h.port).rcode() == dns.rcode.REFUSED
    assert [(r.what, r.rule) for r in h.refusals.recent()] == [("ok.test", "class CH")]
    assert "a query of class CH; only class IN is forwarded" in caplog.text


def test_a_flood_of_refused_names_hides_no_other_refusal(h: Harness, caplog) -> None:
    """The enclave can have the forwarder refuse thousands of names a second (REFUSED needs
    no upstream). Before, they shared one record of 256 and one log budget with the
    firewall's refusals: a try at the metadata service between two such floods left no log
    line (its was suppressed) and no record (pushed out), only a counter. Each kind has a
    record and a log budget of its own now, the credential endpoints apart from other
    denies."""
    import logging

    from wgvsock.services import nflog
    from wgvsock.services.egress.refusals import LIMIT

    clock = [1000.0]  # frozen: no log budget comes back during the test
    h.fwd.refusals = refusals = Refusals(clock=lambda: clock[0])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)

    def flood(first: int) -> None:
        for i in range(first, first + LIMIT + 50):
            u.sendto(dns.message.make_query(f"n{i}.example", "A").to_wire(), (LOOP, h.port))
            assert dns.message.from_wire(u.recv(512)).rcode() == dns.rcode.REFUSED

    imds = nflog.Flow("tcp", ipaddress.ip_address("10.77.0.2"),
                      ipaddress.ip_address("169.254.169.254"), 80)
    try:
        with caplog.at_level(logging.WARNING, "wgvsock.refused"):
            flood(0)
            refusals.packet("credentials 169.254.169.254/32", imds)  # as the log reader does
            flood(1000)
    finally:
        u.close()
    assert h.fwd.stats.refused == 2 * (LIMIT + 50)
    assert "tcp 169.254.169.254:80" in [r.what for r in refusals.recent(10 * LIMIT)]
    assert "is a credential endpoint (169.254.169.254)" in caplog.text
    assert len([r for r in refusals.recent(10 * LIMIT) if r.kind == "dns"]) == LIMIT
    assert len(caplog.records) <= 21


def test_a_refusal_or_failure_says_why_to_a_client_that_speaks_edns(h: Harness) -> None:
    """RFC 8914 Extended DNS Errors: `dig` and resolvers in the enclave show them, so whoever
    runs the enclave's app learns that the parent's policy refused a name, not that DNS is
    broken. Before, REFUSED and SERVFAIL came bare (the forwarder's EDE, left open by an
    earlier review). A client without EDNS gets no OPT record, as before."""
    from dns.edns import EDECode

    def ede(name: str, rdclass: str = "IN") -> list[tuple[int, str | None]]:
        q = dns.message.make_query(name, "A", rdclass=rdclass, use_edns=0)
        r = dns.query.udp(q, LOOP, timeout=5, port=h.port)
        return [(e.code, e.text) for e in r.extended_errors()]

    assert ede("bad.test") == [(EDECode.BLOCKED, "denied by parent.egress.deny")]
    assert ede("example.com") == [(EDECode.BLOCKED, "not in parent.egress.allow")]
    assert ede("ok.test", "CH") == [(EDECode.NOT_SUPPORTED, "only class IN is forwarded")]
    h.fwd.rebuild(lambda elements: None, policy=rules(["*.test"], ["end.test"]))
    assert ede("alias.test") == [(EDECode.BLOCKED,
                                  "alias of end.test, which parent.egress.deny names")]
    h.upstream.silent = True
    assert ede("ok.test") == [(EDECode.NETWORK_ERROR, "the parent's resolver did not answer")]
    h.upstream.silent = False
    h.fail_nft = True
    assert ede("ok.test") == [(EDECode.OTHER, "the parent could not update its firewall")]
    r = h.ask("example.com")  # no EDNS
    assert r.rcode() == dns.rcode.REFUSED and r.edns == -1


def test_an_answer_too_big_for_any_datagram_is_truncated_not_lost(h: Harness,
                                                                 monkeypatch) -> None:
    """A client may offer an EDNS payload of up to 65535 bytes, more than a UDP datagram
    holds (65507 over IPv4). Before: an answer between the two was cut to the client's
    payload, sendto refused it (EMSGSIZE) and the client got nothing (egress review); now it
    gets TC and asks again over TCP, as for any answer too big for it."""
    texts = [f'huge.test. 60 IN TXT "{i:03d}{"x" * 247}"' for i in range(249)]
    monkeypatch.setitem(RECORDS, "huge.test.", texts)
    q = dns.message.make_query("huge.test", "TXT", use_edns=0, payload=65535)
    r = dns.query.udp(q, LOOP, timeout=5, port=h.port)
    assert r.flags & dns.flags.TC and not r.answer
    whole = dns.query.tcp(q, LOOP, timeout=5, port=h.port)
    assert len(whole.answer[0]) == 249 and 65507 < len(whole.to_wire()) <= 65535


def test_a_refusal_fits_the_clients_payload_with_its_ede_cut(h: Harness, monkeypatch) -> None:
    """A long name refused as the alias of a long denied one: the EDE (which names the
    target) made the reply over 512 bytes, past a client that offered 512, which then had to
    drop it or ask again over TCP. Now the text is cut to fit (or left out), the rcode kept."""
    long = ".".join(["a" * 60] * 4) + ".test"  # 250 bytes on the wire
    target = ".".join(["b" * 60] * 4) + ".test"
    monkeypatch.setitem(RECORDS, f"{long}.", [f"{long}. 60 IN CNAME {target}.",
                                              f"{target}. 60 IN A 192.0.2.9"])
    h.fwd.rebuild(lambda elements: None, policy=rules(["*.test"], [target]))
    q = dns.message.make_query(long, "A", use_edns=0, payload=512)
    wire = dns.query.udp(q, LOOP, timeout=5, port=h.port, ignore_trailing=True).to_wire()
    assert len(wire) <= 512, len(wire)
    r = dns.message.from_wire(wire)
    assert r.rcode() == dns.rcode.REFUSED and r.edns == 0 and not r.flags & dns.flags.TC
    [ede] = r.extended_errors()
    assert ede.text is not None and f"alias of {target[:150]}" in ede.text
    assert ede.text.endswith("..."), ede.text
    # With room for it, the whole text.
    q = dns.message.make_query(long, "A", use_edns=0, payload=1232)
    [ede] = dns.query.udp(q, LOOP, timeout=5, port=h.port).extended_errors()
    assert ede.text == f"alias of {target}, which parent.egress.deny names"
