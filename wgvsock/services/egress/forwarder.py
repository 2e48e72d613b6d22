"""The parent's DNS forwarder: the enclave's resolver when the profile allows egress by name.

Modelled on the idea of Cilium's toFQDNs policy: the only way the enclave learns an address
it may reach by name is a DNS answer that passed through here. For each query from the tunnel:

* a name that a deny rule matches, or that no allow rule matches, gets REFUSED (counted) —
  unless the profile allows every address (0.0.0.0/0), when only denied names are;
* an allowed name is forwarded to the parent's own resolver; before the answer goes back,
  the A/AAAA addresses it holds for the name (following its CNAME chain), but none that
  stays on the parent (:func:`stays_local`), are put into the nftables set of every allow
  rule the name matched, each with a timeout of its TTL plus the grace period. Only then
  does the enclave see the answer, so its first connection finds the address allowed.

Everything the enclave sends is hostile until parsed by dnspython: a packet that does not
parse is dropped and counted, never fatal. Of an allowed query only the question goes on: the
resolver gets a query of ours (our ID, RD, EDNS with a 1232-byte payload and no options, CD
clear so that it validates DNSSEC), and the enclave gets the resolver's records in a response
of ours to its own query. Memory and concurrency are bounded (queries in flight, TCP clients,
TCP idle time, tracked addresses) and every upstream query has a timeout.

The forwarder is an asyncio loop in one thread of `parent up`; nft runs in a thread of its
own so that a slow nft never stalls the loop, one run for all the answers that came while the
previous run went on. :class:`Stats` holds the counters that
`wgvsock status` and the metrics read.

The forwarder remembers, for each address it put into a set, the answers that put it there
(the asked name, whether it came through CNAMEs, and when the answer's TTL runs out) and the
expiry it last gave the element. When the parent replaces its table (`parent reload` with
new name rules or grace, or putting back a table someone flushed), :meth:`Forwarder.rebuild`
hands the new table the addresses that some answer still vouches for under the new rules (its
name allowed; one that came through CNAMEs only while the deny rules are the same, since its
chain was checked against those), so allowed names keep working without a new lookup; set
updates wait for the swap, and one computed under the old rules is dropped (its query gets
SERVFAIL and the client asks again).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import dns.asyncquery
import dns.edns
import dns.entropy
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from ...threads import NamedThread
from ..firewall import name_set
from .names import Labels, NamePolicy, labels_of
from .refusals import Refusals

IPAddress = IPv4Address | IPv6Address
#: (set, address, timeout in seconds): what the forwarder asks nft to add.
Element = tuple[str, IPAddress, int]
#: What is remembered of an answer: the asked name, and whether CNAMEs led to the addresses.
Answer = tuple[Labels, bool]

DNS_PORT = 53
UPSTREAM_TIMEOUT = 2.0  # per upstream server; a client's own retry is usually 5 s
MAX_IN_FLIGHT = 128  # queries being answered at once; more UDP queries are dropped
MAX_TCP_CLIENTS = 32
TCP_IDLE = 10.0  # RFC 7766 suggests a few seconds between a client's queries
MAX_UDP_QUERY = 4096  # a real query is well under 512 bytes; bigger ones are not worth parsing
# The EDNS payload we ask the resolver for and advertise to the enclave (DNS flag day 2020):
# an answer this size needs no IP fragments, which an off-path forger finds easier to fake.
# A longer one comes over TCP.
EDNS_PAYLOAD = 1232
_UDP_MAX = 65507  # the most a UDP datagram carries over IPv4 (65527 over IPv6)
MAX_CNAME_HOPS = 16
MAX_TTL = 86400  # an absurd TTL must not pin an address in the set for years
MAX_TRACKED = 65536  # (address, answer) pairs remembered, all sets together
MAX_ANSWERS = 16  # answers remembered per address (different names that share it)
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux's value; Python 3.11 lacks the name


def _udp_limit(query: dns.message.Message) -> int:
    """The most a reply to QUERY over UDP may hold: its EDNS payload (RFC 6891 reads one under
    512 as 512), and no more than a datagram carries."""
    return max(512, min(query.payload, _UDP_MAX) if query.edns >= 0 else 512)


@dataclass
class Stats:
    """The forwarder's counters since `parent up`. Plain ints, updated on the forwarder's
    thread; a reader on another thread sees each one whole."""

    queries: int = 0           # DNS messages received (UDP datagrams and TCP messages)
    refused: int = 0           # names answered REFUSED: denied, or matched by no allow rule
    forwarded: int = 0         # allowed queries answered by the upstream resolver
    upstream_failures: int = 0  # allowed queries no upstream answered usably in time (SERVFAIL)
    dropped: int = 0           # malformed, oversized, or over the concurrency limits
    addresses_added: int = 0   # set elements added or refreshed
    addresses_skipped: int = 0  # answer addresses kept out of the sets (see stays_local)
    set_failures: int = 0      # nft refused an update (SERVFAIL to the client)


def system_resolvers(exclude: Sequence[IPAddress] = ()) -> list[IPAddress]:
    """The nameservers of this namespace's /etc/resolv.conf, minus EXCLUDE (our own
    addresses: forwarding to ourselves would loop)."""
    try:
        conf = dns.resolver.Resolver(configure=True)
    except (dns.resolver.NoResolverConfiguration, OSError):
        return []
    out = []
    for text in conf.nameservers:
        try:
            addr = ipaddress.ip_address(str(text))
        except ValueError:  # a scoped fe80::1%eth0 or a DoH URL: not something we forward to
            continue
        if addr not in exclude and addr not in out:
            out.append(addr)
    return out


def cname_chain(response: dns.message.Message, qname: dns.name.Name) -> list[dns.name.Name]:
    """QNAME and the names its CNAME records in RESPONSE lead to, in order."""
    cnames = {rrset.name: rrset[0].target for rrset in response.answer
              if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == dns.rdatatype.CNAME
              and len(rrset) > 0}
    chain = [qname]
    for _ in range(MAX_CNAME_HOPS):
        if chain[-1] not in cnames or cnames[chain[-1]] in chain:
            break
        chain.append(cnames[chain[-1]])
    return chain


def answer_addresses(response: dns.message.Message,
                     qname: dns.name.Name) -> list[tuple[IPAddress, int]]:
    """The A/AAAA addresses RESPONSE gives for QNAME, through its CNAME chain, with TTLs.
    Records for other names are ignored: only the chain that starts at the allowed name
    says anything about it. An address's TTL is the shortest of its record's and those of
    the CNAMEs that led to it (RFC 2181 §5.2): once an alias expires, the name may point
    elsewhere, and resolvers drop the cached address with it."""
    chain = cname_chain(response, qname)
    cname_ttl = {rrset.name: rrset.ttl for rrset in response.answer
                 if rrset.rdclass == dns.rdataclass.IN
                 and rrset.rdtype == dns.rdatatype.CNAME and len(rrset) > 0}
    # The TTL an address owned by each name of the chain may have at most.
    cap: dict[dns.name.Name, int] = {}
    ttl = 2**31 - 1  # the largest TTL (RFC 2181 §8); MAX_TTL is applied where sets are filled
    for name in chain:
        cap[name] = ttl
        ttl = min(ttl, cname_ttl.get(name, ttl))
    out: list[tuple[IPAddress, int]] = []
    for rrset in response.answer:
        if (rrset.rdclass == dns.rdataclass.IN and rrset.name in cap
                and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)):
            ttl = min(rrset.ttl, cap[rrset.name])
            out += [(ipaddress.ip_address(rd.address), ttl) for rd in rrset]
    return out


def stays_local(addr: IPAddress) -> bool:
    """Whether ADDR is never a destination beyond the parent: unspecified, loopback,
    multicast, the limited broadcast, IPv6 link-local (which the kernel never forwards), or
    an IPv4-mapped IPv6 form of one of those. Such an address in an allowed answer is not put
    into a set: whoever answers for the name chooses the addresses, and these could only
    reach the parent and its link, never the service the name stands for."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr == _LIMITED_BROADCAST:
        return True
    return addr.is_unspecified or addr.is_loopback or addr.is_multicast or (
        addr.version == 6 and addr.is_link_local)


_LIMITED_BROADCAST = IPv4Address("255.255.255.255")


def _seconds(span: float) -> int:
    """SPAN rounded up to whole seconds, without float noise (now + 86400 - now is not
    always 86400.0)."""
    return math.ceil(round(span, 6))


#: A set update: (the rules' generation it was computed under, the (set, address, TTL)
#: elements it wants, the answer that vouches for them).
_Update = tuple[int, list[Element], Answer]


def _settle(futures: list[asyncio.Future[int | None]],
            outcome: list[int | None] | Exception) -> None:
    for n, f in enumerate(futures):
        if f.done():  # its query was cancelled (the forwarder closing)
            continue
        if isinstance(outcome, Exception):
            f.set_exception(outcome)
        else:
            f.set_result(outcome[n])


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.fwd._udp_query(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a reply to a client that went away: nothing to do


class Forwarder:
    """Listens on LISTEN (the parent's tunnel addresses), UDP and TCP, for queries from
    CLIENTS (the enclave's addresses), forwards allowed names to UPSTREAM and hands the
    answers' addresses to UPDATE_SETS (blocking; it runs in a worker thread) before replying."""

    def __init__(self, *, listen: Sequence[IPAddress], upstream: Sequence[IPAddress],
                 policy: NamePolicy, update_sets: Callable[[list[Element]], None],
                 grace: int, log: logging.Logger | None = None, port: int = DNS_PORT,
                 upstream_port: int = DNS_PORT, timeout: float = UPSTREAM_TIMEOUT,
                 max_in_flight: int = MAX_IN_FLIGHT, max_tcp_clients: int = MAX_TCP_CLIENTS,
                 tcp_idle: float = TCP_IDLE,
                 clients: Sequence[IPAddress] | None = None,
                 stats: Stats | None = None,
                 refusals: Refusals | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not upstream:
            raise ValueError("no upstream resolver")
        self.listen = list(listen)
        self.upstream = [str(a) for a in upstream]
        # (generation, policy) in one tuple, read and replaced whole: an answer's set update
        # is valid only while the generation it was computed under is current.
        self._rules: tuple[int, NamePolicy] = (0, policy)
        self.update_sets = update_sets
        self.grace = grace
        self.log = log or logging.getLogger("wgvsock.dns")
        self.port = port
        self.upstream_port = upstream_port
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.max_tcp_clients = max_tcp_clients
        self.tcp_idle = tcp_idle
        # Only the enclave may ask: the tunnel address is reachable from the parent's other
        # interfaces too, and nobody else should fill the enclave's sets. None: anyone (tests).
        self.clients = None if clients is None else {str(a) for a in clients}
        self.stats = stats or Stats()  # a forwarder started again goes on counting
        self.refusals = refusals
        self._clock = clock
        self._in_flight = 0
        self._tcp_clients = 0
        self._tasks: set[asyncio.Task] = set()
        # (set, address) -> {an answer that put it there: when that answer's TTL runs out},
        # and (set, address) -> the expiry last given to the element in nft (both on
        # self._clock). Changed only under _sets_lock, together with the sets themselves.
        self._live: dict[tuple[str, IPAddress], dict[Answer, float]] = {}
        self._written: dict[tuple[str, IPAddress], float] = {}
        self._pairs = 0  # sum of len(answers) over _live
        self._sets_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closers: list[Callable[[], object]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dns-nft")
        # Set updates waiting for nft, and whether a drain of them is under way: the answers
        # that come while nft runs go to it together in the next run (one run costs a
        # process, some 10 ms; one per answer capped the fresh names a second).
        self._queue: list[tuple[_Update, asyncio.Future[int | None]]] = []
        self._queue_lock = threading.Lock()
        self._draining = False
        self._warned: set[str] = set()

    # -- life cycle -------------------------------------------------------------------------

    def _bind(self) -> list[tuple[str, socket.socket]]:
        socks: list[tuple[str, socket.socket]] = []
        try:
            for addr in self.listen:
                family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
                for kind, stype in (("udp", socket.SOCK_DGRAM), ("tcp", socket.SOCK_STREAM)):
                    s = socket.socket(family, stype)
                    socks.append((kind, s))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    # An IPv6 tunnel address may still be tentative (DAD) when `up` starts.
                    s.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
                    s.bind((str(addr), self.port))
                    if kind == "tcp":
                        s.listen(self.max_tcp_clients)
                    s.setblocking(False)
        except OSError as e:
            for _, s in socks:
                s.close()
            raise OSError(e.errno, f"DNS forwarder cannot listen on port {self.port}: "
                                   f"{e.strerror}") from None
        return socks

    def start(self) -> None:
        """Binds (raising OSError, e.g. when port 53 is taken) and starts the thread."""
        socks = self._bind()
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(socks))
            except BaseException as e:  # reported to start(), which raises it
                failure.append(e)
            ready.set()
            if not failure:
                loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()
            for _, s in socks:  # those no server took over yet
                s.close()

        self._thread = NamedThread(target=run, name="dns-forwarder", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            self.close()
            raise OSError("DNS forwarder did not start within 10 s")
        if failure:
            self._thread.join(10)
            self._loop = self._thread = None
            self.close()
            raise OSError(f"DNS forwarder failed to start: {failure[0]}")
        self.log.info("DNS forwarder on %s port %d, upstream %s",
                      ", ".join(map(str, self.listen)), self.port, ", ".join(self.upstream))

    async def _serve(self, socks: list[tuple[str, socket.socket]]) -> None:
        loop = asyncio.get_running_loop()
        for kind, s in socks:
            if kind == "udp":
                transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=s)
                self._closers.append(transport.close)
            else:
                server = await asyncio.start_server(self._tcp_client, sock=s)
                self._closers.append(server.close)

    async def _shutdown(self) -> None:
        for close in self._closers:
            close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop = self._thread = None

    @property
    def policy(self) -> NamePolicy:
        return self._rules[1]

    def rebuild(self, apply: Callable[[list[Element]], None], *,
                policy: NamePolicy | None = None, grace: int | None = None) -> int:
        """Replaces the table: calls APPLY (on this thread) with the name-set elements the new
        table should start with: each address a remembered answer still vouches for under
        POLICY, in the sets of the rules that allow its name now, until the latest such
        answer's TTL plus GRACE (defaults: the current ones). No set update runs meanwhile. If
        APPLY raises, nothing changes here either. Returns how many elements were carried."""
        new = policy or self.policy
        grace = self.grace if grace is None else grace
        same_deny = new.deny == self.policy.deny
        with self._sets_lock:
            now = self._clock()
            live: dict[tuple[str, IPAddress], dict[Answer, float]] = {}
            for (_, addr), answers in self._live.items():
                for answer, end in answers.items():
                    asked, aliased = answer
                    # An answer through CNAMEs was checked against the old deny rules only.
                    if end + grace - now < 1 or (aliased and not same_deny):
                        continue
                    for i in new.allowed_by(asked):
                        kept = live.setdefault((name_set(i, addr.version), addr), {})
                        kept[answer] = max(kept.get(answer, 0.0), end)
            written = {key: max(answers.values()) + grace for key, answers in live.items()}
            apply([(set_, addr, _seconds(expiry - now))
                   for (set_, addr), expiry in written.items()])
            self._rules = (self._rules[0] + 1, new)
            self._live, self._written = live, written
            self._pairs = sum(map(len, live.values()))
            self.grace = grace
        return len(live)

    def set_upstream(self, upstream: Sequence[IPAddress]) -> None:
        """New upstream resolvers, for the queries from now on."""
        if not upstream:
            raise ValueError("no upstream resolver")
        self.upstream = [str(a) for a in upstream]

    # -- receiving --------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _udp_query(self, proto: _Udp, data: bytes, addr) -> None:
        self.stats.queries += 1
        if (len(data) > MAX_UDP_QUERY or self._in_flight >= self.max_in_flight
                or (self.clients is not None and addr[0] not in self.clients)):
            self.stats.dropped += 1
            return
        # Counted here, not when the task first runs: a burst arrives within one loop turn.
        self._in_flight += 1
        self._spawn(self._udp_answer(proto, data, addr))

    async def _udp_answer(self, proto: _Udp, data: bytes, addr) -> None:
        try:
            reply = await self._answer(data, tcp=False)
        finally:
            self._in_flight -= 1
        if reply is not None and proto.transport is not None:
            proto.transport.sendto(reply, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("",)
        if self._tcp_clients >= self.max_tcp_clients or (
                self.clients is not None and peer[0] not in self.clients):
            self.stats.dropped += 1
            writer.close()
            return
        self._tcp_clients += 1
        task = asyncio.current_task()
        if task is not None:  # so that close() cancels it with the rest
            self._tasks.add(task)
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                size = int.from_bytes(head, "big")
                data = await asyncio.wait_for(reader.readexactly(size), self.tcp_idle)
                self.stats.queries += 1
                if self._in_flight >= self.max_in_flight:
                    self.stats.dropped += 1
                    break
                self._in_flight += 1
                try:
                    reply = await self._answer(data, tcp=True)
                finally:
                    self._in_flight -= 1
                if reply is None:  # not DNS: this client gets nothing more
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await asyncio.wait_for(writer.drain(), self.tcp_idle)
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass  # the client went away, stalled, or sent half a message
        finally:
            self._tcp_clients -= 1
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    # -- answering --------------------------------------------------------------------------

    async def _answer(self, data: bytes, *, tcp: bool) -> bytes | None:
        try:
            return await self._answer_checked(data, tcp)
        except Exception as e:  # a bug must cost one query, never the forwarder
            self.stats.dropped += 1
            self._warn_once(f"bug:{type(e).__name__}", "DNS forwarder: query failed: %r", e)
            return None

    async def _answer_checked(self, data: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # dnspython raises many types for garbage; all mean "not DNS"
            self.stats.dropped += 1
            return None
        if query.flags & dns.flags.QR:  # a response sent to us: never answer one
            self.stats.dropped += 1
            return None
        if query.edns > 0:
            # RFC 6891 §6.1.3: a version we do not speak gets BADVERS with our OPT (version
            # 0), so the client retries with 0; a version-0 answer would be read as if it
            # spoke the client's.
            return self._reply(query, dns.rcode.BADVERS)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return self._reply(query, dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY
                               else dns.rcode.FORMERR)
        question = query.question[0]
        generation, policy = self._rules
        labels = labels_of(question.name.labels)
        if question.rdclass != dns.rdataclass.IN:
            self._refused(question.name, f"class {dns.rdataclass.to_text(question.rdclass)}")
            return self._reply(query, dns.rcode.REFUSED, dns.edns.EDECode.NOT_SUPPORTED,
                               "only class IN is forwarded")
        if not policy.resolves(labels):
            denied = policy.denied(labels)
            self._refused(question.name, "denied" if denied else "not allowed")
            return self._reply(query, dns.rcode.REFUSED, dns.edns.EDECode.BLOCKED,
                               "denied by parent.egress.deny" if denied
                               else "not in parent.egress.allow")
        # Empty for a name resolved only because every address is allowed: no set to fill.
        rules = policy.allowed_by(labels)
        response = await self._ask_upstream(query, tcp)
        if response is None:
            self.stats.upstream_failures += 1
            return self._reply(query, dns.rcode.SERVFAIL, dns.edns.EDECode.NETWORK_ERROR,
                               "the parent's resolver did not answer")
        if response.rcode() == dns.rcode.NOERROR:
            # An allowed name that is an alias of a denied one would reach the denied name's
            # addresses: the deny list holds along the whole chain.
            chain = cname_chain(response, question.name)
            via = [n for n in chain[1:] if policy.denied(labels_of(n.labels))]
            if via:
                target = via[0].to_text(omit_final_dot=True)
                self._refused(question.name, f"alias of {target}")
                return self._reply(query, dns.rcode.REFUSED, dns.edns.EDECode.BLOCKED,
                                   f"alias of {target}, which parent.egress.deny names")
            found = answer_addresses(response, question.name)
            kept = [(addr, ttl) for addr, ttl in found if not stays_local(addr)]
            if rules:
                self.stats.addresses_skipped += len(found) - len(kept)
            found = kept
            answer = (labels, len(chain) > 1)
            if found and rules and not await self._allow(generation, rules, answer, found):
                return self._reply(query, dns.rcode.SERVFAIL, dns.edns.EDECode.OTHER,
                                   "the parent could not update its firewall")
        self.stats.forwarded += 1
        reply = self._skeleton(query)
        # AA, RA and AD are the resolver's to say; TC is ours (below), the rest the client's.
        reply.flags |= response.flags & (dns.flags.AA | dns.flags.RA | dns.flags.AD)
        reply.set_rcode(response.rcode())  # 0-15: _ask_upstream took no extended rcode
        reply.answer = response.answer
        reply.authority = response.authority
        reply.additional = response.additional  # dnspython keeps OPT and TSIG apart
        # A client may offer up to 65535 bytes, more than a datagram holds: past that sendto
        # refused the answer, and the client got nothing rather than TC.
        limit = 65535 if tcp else _udp_limit(query)
        try:
            return reply.to_wire(max_size=limit)
        except dns.exception.TooBig:
            short = self._skeleton(query)
            short.flags |= dns.flags.TC  # the client retries over TCP
            return short.to_wire()

    def _refused(self, name: dns.name.Name, why: str) -> None:
        self.stats.refused += 1
        if self.refusals is not None:
            self.refusals.name(name.to_text(omit_final_dot=True), why)

    def _skeleton(self, query: dns.message.Message) -> dns.message.Message:
        """An empty response to the client's QUERY: its ID, its question as it spelled it
        (some clients check the letter case they chose, "0x20"), its RD and CD (RFC 4035
        §3.2.2 has CD copied, though the resolver validated anyway), and EDNS only if it
        spoke EDNS, with its DO bit (RFC 3225 §3)."""
        reply = dns.message.make_response(query, our_payload=EDNS_PAYLOAD)
        reply.flags |= query.flags & dns.flags.CD
        if query.edns >= 0:
            reply.ednsflags |= query.ednsflags & dns.flags.DO
        return reply

    def _reply(self, query: dns.message.Message, rcode: int,
               ede: dns.edns.EDECode | None = None, why: str = "") -> bytes:
        """An empty response with RCODE and, for a client that spoke EDNS, an Extended DNS
        Error (RFC 8914) EDE saying WHY: `dig` and resolvers in the enclave show it, so its
        app's operator reads that the parent's policy refused a name, not that DNS is broken.
        (The resolver's own EDEs do not pass: they are about its exchange with us.)"""
        response = self._skeleton(query)
        response.set_rcode(rcode)
        if ede is None or query.edns < 0:
            return response.to_wire()
        limit = _udp_limit(query)
        # A long name and an alias target in WHY may not fit the client's payload: dnspython
        # then raised TooBig and the client got no answer at all. WHY is cut to fit, with
        # "..." for what is missing, or left out when too little of it would be left. (Over
        # TCP too: the client's payload is what it said it takes.)
        text = why
        while True:
            response.use_edns(0, response.ednsflags, EDNS_PAYLOAD, query.payload,
                              options=[dns.edns.EDEOption(ede, text)] if text else [])
            wire = response.to_wire(max_size=65535)
            over = len(wire) - limit
            if over <= 0 or not text:
                return wire
            keep = len(text.encode()) - over - 3
            text = (text.encode()[:keep].decode(errors="ignore") + "...") if keep >= 16 else ""

    async def _ask_upstream(self, query: dns.message.Message,
                            tcp: bool) -> dns.message.Message | None:
        """The resolver's answer to QUERY's one question, or None. The resolver gets a
        query of ours with nothing of the enclave's but the question and two bits that ask
        for more and turn nothing off: AD (tell me if you validated) and DO (send RRSIGs,
        which a validating stub needs). The enclave's own ID would let it tell an accomplice
        off the path what a forged answer must carry, and a forged answer's addresses would
        land in the allow sets; its CD would turn off the resolver's DNSSEC validation for
        exactly those answers; its EDNS payload (up to 65535) would invite fragmented answers,
        easier to forge; its EDNS options (Client Subnet, anything) and records are not the
        resolver's business."""
        question = query.question[0]
        ours = dns.message.make_query(
            question.name, question.rdtype, question.rdclass, use_edns=0,
            payload=EDNS_PAYLOAD, id=dns.entropy.random_16(),
            flags=dns.flags.RD | (query.flags & dns.flags.AD),
            want_dnssec=query.edns >= 0 and bool(query.ednsflags & dns.flags.DO))
        for server in self.upstream:
            try:
                if tcp:
                    response = await dns.asyncquery.tcp(ours, server, timeout=self.timeout,
                                                        port=self.upstream_port)
                else:  # an answer over 1232 bytes comes back truncated: ask again over TCP
                    response, _ = await dns.asyncquery.udp_with_fallback(
                        ours, server, timeout=self.timeout, port=self.upstream_port,
                        ignore_unexpected=True)
            except (dns.exception.DNSException, OSError, EOFError, ValueError) as e:
                self._warn_once(f"upstream:{server}",
                                "DNS forwarder: upstream %s failed: %s (further failures "
                                "are only counted)", server, e or type(e).__name__)
                continue
            if response.rcode() > 15:
                # BADVERS, BADCOOKIE...: about our EDNS exchange with this server, not about
                # the question, and not something a client without EDNS could be told.
                self._warn_once(f"rcode:{server}",
                                "DNS forwarder: upstream %s answered %s (further such "
                                "answers are only counted)", server,
                                dns.rcode.to_text(response.rcode()))
                continue
            return response
        return None

    async def _allow(self, generation: int, rules: list[int], answer: Answer,
                     found: list[tuple[IPAddress, int]]) -> bool:
        """Puts FOUND (the addresses of ANSWER, for an allowed name) into the sets of RULES,
        for their TTLs plus the grace. False when nft refused, or when the table was replaced
        since RULES were chosen (GENERATION)."""
        wanted = [(name_set(i, addr.version), addr, min(ttl, MAX_TTL))
                  for addr, ttl in found for i in rules]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int | None] = loop.create_future()
        with self._queue_lock:
            self._queue.append(((generation, wanted, answer), done))
            start, self._draining = not self._draining, True
        if start:
            try:
                self._pool.submit(self._drain, loop)
            except RuntimeError:  # the pool was shut down: the forwarder is closing
                with self._queue_lock:
                    self._draining = False
                return False
        try:
            added = await done
        except Exception as e:  # FirewallError, or nft missing: the answer would be useless
            self.stats.set_failures += 1
            self._warn_once("nft", "DNS forwarder: cannot add addresses to the nft sets: %s", e)
            return False
        if added is None:
            return False
        self.stats.addresses_added += added
        return True

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hands what waits for nft to it, one run for all that waited, until nothing does.
        Runs in the nft pool."""
        while True:
            with self._queue_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._draining = False
                    return
            try:
                outcome: list[int | None] | Exception = self._commit_all([u for u, _ in batch])
            except Exception as e:
                outcome = e
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_settle, [f for _, f in batch], outcome)

    def _commit(self, generation: int, wanted: list[tuple[str, IPAddress, int]],
                answer: Answer) -> int | None:
        """_commit_all of one update."""
        return self._commit_all([(generation, wanted, answer)])[0]

    def _commit_all(self, updates: list[_Update]) -> list[int | None]:
        """For each update (GENERATION, WANTED, ANSWER): remembers that ANSWER vouches for
        each (set, address, TTL) of WANTED until its TTL runs out (counted from now: nft may
        have kept us waiting), and has nft add or refresh each element that would otherwise
        die before that end plus half the grace (so repeated answers cost no nft run each),
        to the latest end any remembered answer gives it plus the grace; one nft run for all
        the updates. For each, None when the table was replaced after WANTED was chosen (its
        set names would mean other rules now), else how many elements went to nft for it.
        Raises what nft raised, for all. Runs in the nft pool (tests: anywhere)."""
        with self._sets_lock:
            now = self._clock()
            current = [u[0] == self._rules[0] for u in updates]
            # (set, address) -> the end an update gives it, per update and over all of them.
            each: list[dict[tuple[str, IPAddress], float]] = []
            ends: dict[tuple[str, IPAddress], float] = {}
            owner: dict[tuple[str, IPAddress], int] = {}  # the update an element counts for
            for n, ((_, wanted, _), ok) in enumerate(zip(updates, current, strict=True)):
                mine: dict[tuple[str, IPAddress], float] = {}
                if ok:
                    for set_, addr, ttl in wanted:  # an address twice: its longest TTL
                        mine[set_, addr] = max(mine.get((set_, addr), 0.0), now + ttl)
                    for key, end in mine.items():
                        ends[key] = max(ends.get(key, 0.0), end)
                        owner.setdefault(key, n)
                each.append(mine)
            elements: list[Element] = []
            added = [0] * len(updates)
            for key, end in ends.items():
                if self._written.get(key, 0.0) < end + self.grace / 2:
                    known = max(self._live.get(key, {}).values(), default=0.0)
                    expiry = max(known, end) + self.grace
                    elements.append((key[0], key[1], max(1, _seconds(expiry - now))))
                    added[owner[key]] += 1
            if elements:
                self.update_sets(elements)
            if self._pairs + len(ends) > MAX_TRACKED:
                self._forget_expired(now)
            for set_, addr, timeout in elements:
                self._written[set_, addr] = now + timeout
            for (_, _, answer), mine in zip(updates, each, strict=True):
                for key, end in mine.items():
                    answers = self._live.setdefault(key, {})
                    if answer not in answers:
                        self._pairs += 1
                    answers[answer] = max(answers.get(answer, 0.0), end)
                    if len(answers) > MAX_ANSWERS:
                        del answers[min(answers, key=answers.__getitem__)]
                        self._pairs -= 1
        return [n if ok else None for n, ok in zip(added, current, strict=True)]

    def _forget_expired(self, now: float) -> None:
        """Drops the answers of elements that have expired; if that is not enough, all of
        them (a reload would then not carry those addresses). The expiries written to nft are
        kept while the elements live (bounded by the sets' size): without them the next
        answer for an address could write a shorter timeout than one already handed out."""
        self._written = {k: t for k, t in self._written.items() if t > now}
        live = {k: v for k, v in self._live.items() if k in self._written}
        if sum(map(len, live.values())) > MAX_TRACKED // 2:
            live = {}
        self._live = live
        self._pairs = sum(map(len, live.values()))

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned and len(self._warned) < 64:
            self._warned.add(key)
            self.log.warning(msg, *args)
