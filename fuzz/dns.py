"""Target `dns-forwarder`: a hostile enclave's queries and a hostile resolver's answers through
the parent's DNS forwarder (wgvsock.services.egress.forwarder), whose answers decide which
addresses the enclave may reach.

An input is `u16 query length, query, u8 flags, answer`: the query as the enclave sent it
(flags bit 0: over TCP), and the resolver's answer (empty: the resolver does not answer). The
forwarder runs in this process without sockets: `_answer_checked` is called directly, the
resolver is dnspython's query functions replaced for the target's lifetime, and nft is a
recorder. The answer gets the ID of the query the forwarder sent, as a real server's would;
whether its question matches is up to the input (dnspython's own check, mimicked: a mismatch
is a resolver that never answers). A truncated answer over UDP is asked for again over TCP
(dnspython's udp_with_fallback), and the same answer comes back.

A reference written here from the README's rules says what must happen, and anything else is
a finding: a query that does not parse, or is a response, gets no reply; an EDNS version
above 0 BADVERS (RFC 6891), with version 0 and without asking the resolver; another opcode
NOTIMP, not one question FORMERR; a name of another class, not allowed, or denied REFUSED
without asking the resolver; an allowed one is asked once (twice when a UDP answer is
truncated) with a query of the forwarder's own: the question, RD, the enclave's AD and DO and
nothing else of it (CD clear, EDNS payload 1232, no options, no records); no answer, or one
with an extended rcode, SERVFAIL; an answer whose CNAME chain passes through a denied name
REFUSED; else the addresses of the chain's A/AAAA records, and only those, go into the sets
of exactly the rules that allow the name, each with its TTL (at most a day, and at most that
of any CNAME that led to it) plus the grace, before the reply goes back with the enclave's ID,
its question as spelled, its RD, CD and DO, and EDNS only if it used EDNS. No exception may
escape.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct
from typing import Any

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from wgvsock.services.egress import forwarder
from wgvsock.services.egress.names import NamePattern, NamePolicy, NameRule
from wgvsock.services.firewall import name_set

from .harness import Target, quiet
from .mutate import havoc

_HEAD = struct.Struct(">H")
GRACE = 60
DAY = 86400  # the longest TTL an address is kept for (the README's rule, not the module's)
# (pattern, allowed?) as the profile would list them; the reference matches them on its own.
ALLOW = ("ok.test", "*.wild.test", "alias.test", "api.example.com", "*.example.com")
DENY = ("bad.wild.test", "end.test", "deep.x.example.com")
NAMES = ("ok.test", "OK.Test.", "a.wild.test", "x.y.wild.test", "wild.test", "bad.wild.test",
         "BAD.wild.test", "alias.test", "end.test", "mid.test", "api.example.com",
         "www.example.com", "deep.x.example.com", "a.deep.x.example.com", "example.com",
         "other.test", "test", ".", "x" * 63 + ".test", "xn--bcher-kva.example.com",
         "a\\.b.wild.test", "a\\000.wild.test", "\\195\\188.wild.test")
RDTYPES = ("A", "AAAA", "A", "AAAA", "CNAME", "TXT", "ANY", "MX")
TTLS = (0, 1, 30, 300, 86400, 86401, 2**31 - 1, 2**32 - 1)
ADDRESSES = ("192.0.2.1", "192.0.2.2", "198.51.100.9", "169.254.169.254", "2001:db8::1",
             "::ffff:192.0.2.1", "0.0.0.0", "255.255.255.255")



def _local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The model's own list of answer addresses that stay out of the sets (README, "Egress by
    host name"): unspecified, loopback, multicast, 255.255.255.255 and IPv6 link-local, also
    written IPv4-mapped."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (str(addr) == "255.255.255.255" or addr.is_unspecified or addr.is_loopback
            or addr.is_multicast or (addr.version == 6 and addr.is_link_local))

class _Upstream:
    """The resolver: answers the next query with `answer` (wire bytes), or not at all."""

    def __init__(self) -> None:
        self.answer: bytes | None = None
        self.asked: list[dns.message.Message] = []

    async def tcp(self, q: dns.message.Message, where: str, *_: Any,
                  **__: Any) -> dns.message.Message:
        self.asked.append(q)
        if self.answer is None:
            raise dns.exception.Timeout
        r = dns.message.from_wire(self.answer)  # garbage: a DNSException, as dnspython's own
        r.id = q.id
        if not q.is_response(r):  # dnspython's udp()/tcp() would not take it either
            raise dns.exception.Timeout
        return r

    async def udp(self, q: dns.message.Message, where: str, timeout: float | None = None,
                  port: int = 53, source: Any = None, source_port: int = 0,
                  ignore_unexpected: bool = False, one_rr_per_rrset: bool = False,
                  ignore_trailing: bool = False, raise_on_truncation: bool = False,
                  *_: Any, **__: Any) -> dns.message.Message:
        r = await self.tcp(q, where)
        if raise_on_truncation and r.flags & dns.flags.TC:
            raise dns.message.Truncated(message=r)
        return r


def _labels(name: dns.name.Name) -> tuple[str, ...]:
    """The name's labels, ASCII letters lowercased; other bytes kept, so a label with one
    can never equal a pattern's (all ASCII), though a wildcard above it still matches."""
    return tuple(label.lower().decode("latin-1") for label in name.labels if label)


def _matches(pattern: str, labels: tuple[str, ...]) -> bool:
    want = tuple(pattern.split("."))
    if want[0] == "*":
        return len(labels) > len(want) - 1 and labels[len(labels) - len(want) + 1:] == want[1:]
    return labels == want


def reference_rules(name: dns.name.Name) -> list[int]:
    if _denied(name):
        return []
    return [i for i, p in enumerate(ALLOW) if _matches(p, _labels(name))]


def _denied(name: dns.name.Name) -> bool:
    return any(_matches(p, _labels(name)) for p in DENY)


def reference_chain(response: dns.message.Message, qname: dns.name.Name) -> list[dns.name.Name]:
    targets: dict[dns.name.Name, dns.name.Name] = {}
    for rrset in response.answer:
        if (rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == dns.rdatatype.CNAME
                and len(rrset) and rrset.name not in targets):
            targets[rrset.name] = rrset[0].target
    chain = [qname]
    while len(chain) <= forwarder.MAX_CNAME_HOPS and chain[-1] in targets \
            and targets[chain[-1]] not in chain:
        chain.append(targets[chain[-1]])
    return chain


class DnsForwarderTarget(Target):
    name = "dns-forwarder"
    count = 60_000
    shard_size = 10_000

    def __init__(self, rng: random.Random, workdir) -> None:
        super().__init__(rng, workdir)
        self.upstream = _Upstream()
        self._saved = (dns.asyncquery.udp, dns.asyncquery.tcp)
        dns.asyncquery.udp = self.upstream.udp  # type: ignore[assignment]
        dns.asyncquery.tcp = self.upstream.tcp  # type: ignore[assignment]
        self.updates: list[list] = []
        policy = NamePolicy([NameRule(NamePattern.parse(p)) for p in ALLOW],
                            [NameRule(NamePattern.parse(p)) for p in DENY])
        self.fwd = forwarder.Forwarder(
            listen=[ipaddress.ip_address("127.0.0.1")],
            upstream=[ipaddress.ip_address("192.0.2.53")], policy=policy,
            update_sets=self.updates.append, grace=GRACE)
        self.loop = asyncio.new_event_loop()
        self._quiet = quiet("wgvsock.dns")
        self._quiet.__enter__()

    def close(self) -> None:
        dns.asyncquery.udp, dns.asyncquery.tcp = self._saved  # type: ignore[assignment]
        self.fwd.close()
        self.loop.close()
        self._quiet.__exit__(None, None, None)

    # -- inputs ------------------------------------------------------------------------------

    def _query(self, rng: random.Random) -> dns.message.Message:
        q = dns.message.make_query(rng.choice(NAMES), rng.choice(RDTYPES),
                                   use_edns=rng.choice((None, 0)))
        if rng.random() < 0.05:
            q.question[0].rdclass = dns.rdataclass.CH  # type: ignore[misc]
        # What a hostile enclave might add for the resolver to see: none of it may pass.
        q.flags ^= rng.choice((0, 0, dns.flags.RD, dns.flags.CD, dns.flags.AD))
        if q.edns >= 0:
            options = rng.choice(([], [], [dns.edns.ECSOption("203.0.113.0", 24)],
                                  [dns.edns.GenericOption(65001, b"x" * rng.randrange(40))]))
            q.use_edns(0, rng.choice((0, dns.flags.DO)),
                       rng.choice((512, 1232, 4096, 65000)), options=options)
        if rng.random() < 0.1:
            q.additional.append(dns.rrset.from_text("ns.evil.", 60, "IN", "A", "203.0.113.8"))
        return q

    def _answer(self, rng: random.Random, q: dns.message.Message) -> dns.message.Message:
        r = dns.message.make_response(q)
        if rng.random() < 0.1:
            r.set_rcode(rng.choice((dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED)))
        if rng.random() < 0.05:  # over UDP: the forwarder asks again over TCP
            r.flags |= dns.flags.TC
        qname = q.question[0].name if q.question else dns.name.root
        chain = [qname]
        for _ in range(rng.choice((0, 0, 1, 2, 3, 17))):  # CNAMEs, sometimes past the limit
            target = dns.name.from_text(rng.choice((*NAMES, "mid.test", "end.test")))
            r.answer.append(dns.rrset.from_text(chain[-1], rng.choice(TTLS), "IN", "CNAME",
                                                target.to_text()))
            chain.append(target)
            if rng.random() < 0.1:  # a loop back
                r.answer.append(dns.rrset.from_text(target, 60, "IN", "CNAME",
                                                    qname.to_text()))
        for _ in range(rng.randint(0, 4)):
            owner = rng.choice([*chain, dns.name.from_text(rng.choice(NAMES))])
            addr = rng.choice(ADDRESSES)
            kind = "AAAA" if ":" in addr else "A"
            if rng.random() < 0.05:  # an address record of another class: not an address
                packed = ipaddress.ip_address(addr).packed
                r.answer.append(dns.rrset.from_text(owner, 60, "HS", kind,
                                                    f"\\# {len(packed)} {packed.hex()}"))
            else:
                r.answer.append(dns.rrset.from_text(owner, rng.choice(TTLS), "IN", kind, addr))
        return r

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        q = self._query(rng)
        r = self._answer(rng, q)
        # Not the payloads the messages advertise: a resolver's answer may be any size.
        query, answer = q.to_wire(max_size=65535), r.to_wire(max_size=65535)
        tcp = rng.randrange(2)
        roll = rng.random()
        if roll < 0.5:
            kind = "valid"
        elif roll < 0.65:
            kind, answer = "no-answer", b""
        elif roll < 0.8:
            kind, query = "mutated-query", havoc(rng, query, max_len=600)
        elif roll < 0.95:
            kind, answer = "mutated-answer", havoc(rng, answer, max_len=2000)
        else:
            kind, query = "random-query", rng.randbytes(rng.randrange(64))
        return kind, _HEAD.pack(len(query)) + query + bytes([tcp]) + answer

    # -- the oracle --------------------------------------------------------------------------

    def run(self, data: bytes) -> None:
        (n,) = _HEAD.unpack_from(data)
        query = data[2:2 + n]
        tcp = len(data) > 2 + n and bool(data[2 + n] & 1)
        answer = data[3 + n:]
        self.upstream.answer = answer or None
        self.upstream.asked.clear()
        self.updates.clear()
        # Every answer adds its addresses afresh.
        self.fwd._live.clear()
        self.fwd._written.clear()
        self.fwd._pairs = 0
        reply = self.loop.run_until_complete(self.fwd._answer_checked(query, tcp))
        self.check(query, tcp, reply)

    def check(self, query: bytes, tcp: bool, reply: bytes | None) -> None:
        asked = self.upstream.asked
        try:
            q = dns.message.from_wire(query)
        except Exception:
            assert reply is None and not asked, "answered something that is not a DNS query"
            return
        if q.flags & dns.flags.QR:
            assert reply is None and not asked, "answered a response"
            return
        assert reply is not None, "no reply to a query"
        r = dns.message.from_wire(reply)
        assert r.id == q.id, "the reply does not carry the enclave's ID"
        assert r.flags & dns.flags.QR, "the reply is not a response"
        if q.edns > 0:
            assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and not asked, \
                "an EDNS version above 0 did not get BADVERS with version 0"
            return
        if q.opcode() != dns.opcode.QUERY:
            assert r.rcode() == dns.rcode.NOTIMP and not asked
            return
        if len(q.question) != 1:
            assert r.rcode() == dns.rcode.FORMERR and not asked
            return
        question = q.question[0]
        rules = reference_rules(question.name) if question.rdclass == dns.rdataclass.IN else []
        if not rules:
            assert r.rcode() == dns.rcode.REFUSED, "a name not allowed was not refused"
            assert not asked, "a name not allowed was sent to the resolver"
            assert not self.updates
            return
        assert [n.labels for n in (x.name for x in r.question)] == [question.name.labels], \
            "the reply's question is not the enclave's as it spelled it"
        assert r.flags & (dns.flags.RD | dns.flags.CD) == q.flags & (dns.flags.RD | dns.flags.CD)
        assert (r.edns >= 0) == (q.edns >= 0), "EDNS in the reply but not in the query or back"
        client_do = q.ednsflags & dns.flags.DO if q.edns >= 0 else 0
        if r.edns >= 0:
            assert r.ednsflags & dns.flags.DO == client_do, "the client's DO was not echoed"
        sent = asked[0] if asked else None
        answer = self._parsed_answer(sent) if sent is not None else None
        retried = not tcp and answer is not None and bool(answer.flags & dns.flags.TC)
        assert len(asked) == 1 + retried, f"asked the resolver {len(asked)} times"
        assert sent is not None and all(a is sent for a in asked)
        assert sent.question == q.question, "asked the resolver another question"
        assert sent.flags == dns.flags.RD | (q.flags & dns.flags.AD), \
            f"the resolver got flags {sent.flags!r}"
        assert (sent.edns, sent.payload, list(sent.options)) == (0, 1232, []), \
            "the resolver got EDNS other than ours"
        assert sent.ednsflags == client_do, "the resolver got EDNS flags other than DO"
        assert not (sent.answer or sent.authority or sent.additional), \
            "the resolver got records besides the question"
        if not tcp:
            limit = max(512, q.payload if q.edns >= 0 else 512)
            assert len(reply) <= limit, f"a UDP reply of {len(reply)} > {limit} bytes"
        if answer is None or answer.rcode() > 15:
            assert r.rcode() == dns.rcode.SERVFAIL and not self.updates
            return
        want: dict[tuple[str, str], int] = {}  # per set and address, the longest TTL
        if answer.rcode() == dns.rcode.NOERROR:
            chain = reference_chain(answer, question.name)
            if any(_denied(c) for c in chain[1:]):
                assert r.rcode() == dns.rcode.REFUSED, "an alias of a denied name got through"
                assert not self.updates
                return
            # An address lives no longer than any CNAME that led to its name (RFC 2181).
            alias_ttl: dict[dns.name.Name, int] = {}
            for rrset in answer.answer:
                if (rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == dns.rdatatype.CNAME
                        and len(rrset) and rrset.name not in alias_ttl):
                    alias_ttl[rrset.name] = rrset.ttl
            led_by = {link: [alias_ttl[n] for n in chain[:k] if n in alias_ttl]
                      for k, link in enumerate(chain)}
            for rrset in answer.answer:
                if (rrset.rdclass == dns.rdataclass.IN and rrset.name in chain
                        and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)):
                    for rd in rrset:
                        addr = ipaddress.ip_address(rd.address)
                        if _local(addr):
                            continue  # never a set's: it could only reach the parent
                        ttl = max(1, min(rrset.ttl, *led_by[rrset.name], DAY) + GRACE)
                        for i in rules:
                            key = (name_set(i, addr.version), str(addr))
                            want[key] = max(want.get(key, 0), ttl)
        got = sorted((s, str(a), t) for update in self.updates for s, a, t in update)
        due = sorted((s, a, t) for (s, a), t in want.items())
        assert got == due, f"set updates {got} where {due} were due"
        if not r.flags & dns.flags.TC:  # a truncated reply is NOERROR, the client asks by TCP
            assert r.rcode() == answer.rcode(), "the resolver's rcode was not passed on"

    def _parsed_answer(self, sent: dns.message.Message) -> dns.message.Message | None:
        """The answer as the forwarder got it from the stand-in resolver, or None."""
        if self.upstream.answer is None:
            return None
        try:
            a = dns.message.from_wire(self.upstream.answer)
        except Exception:
            return None
        a.id = sent.id
        return a if sent.is_response(a) else None
