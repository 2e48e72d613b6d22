"""Issue 14, part 1: host-name entries in the profile, how names match, and how they render
into the parent's nftables table (no root needed)."""

from __future__ import annotations

import ipaddress

import pytest

from wgvsock.services import firewall
from wgvsock.services.egress.names import (
    NamePattern,
    NamePolicy,
    NameRule,
    NameRuleError,
    labels_of,
)
from wgvsock.services.profile import (
    AWS_DNS_V4,
    ProfileError,
    Rule,
    dump_profile,
    parse_egress_entry,
    parse_profile,
)


def labels(text: str) -> tuple[str, ...]:
    return labels_of([p.encode() for p in text.split(".")] + [b""])


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("api.stripe.com", "api.stripe.com", True),
    ("api.stripe.com", "API.Stripe.COM", True),          # case never matters
    ("api.stripe.com.", "api.stripe.com", True),         # nor a trailing dot
    ("API.STRIPE.COM", "api.stripe.com", True),
    ("api.stripe.com", "x.api.stripe.com", False),       # exact means exact
    ("api.stripe.com", "stripe.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),          # any depth below
    ("*.example.com", "example.com", False),             # not the apex
    ("*.example.com", "badexample.com", False),          # label boundaries, not suffixes
    ("*.example.com", "a.example.com.evil", False),
    ("*.Example.COM.", "X.EXAMPLE.com", True),
    ("bücher.example", "xn--bcher-kva.example", True),   # IDNA: the profile may say Unicode
    ("BÜCHER.example", "XN--BCHER-KVA.EXAMPLE", True),
    ("*.bücher.example", "shop.xn--bcher-kva.example", True),
    ("xn--bcher-kva.example", "xn--bcher-kva.example", True),
    ("_acme-challenge.example.com", "_acme-challenge.example.com", True),
])
def test_name_matching(pattern: str, name: str, matches: bool) -> None:
    assert NamePattern.parse(pattern).matches(labels(name)) is matches


@pytest.mark.parametrize(("text", "a_label"), [
    # IDNA 2008 / UTS 46 non-transitional, what resolvers and browsers send. The standard
    # library's IDNA 2003 codec mapped ß to ss and a final sigma to the medial one: another
    # domain entirely.
    ("faß.de", "xn--fa-hia.de"),
    ("ςυμβολή.gr", "xn--jxah1acqpv.gr"),
    ("Bücher.example", "xn--bcher-kva.example"),
])
def test_unicode_names_are_encoded_as_resolvers_do(text: str, a_label: str) -> None:
    pattern = NamePattern.parse(text)
    assert str(pattern) == a_label
    assert pattern.matches(labels(a_label))
    assert not NamePattern.parse("faß.de").matches(labels("fass.de"))


def test_a_stray_joiner_is_refused_not_dropped() -> None:
    # IDNA 2003 deleted U+200D, so "exa<ZWJ>mple.com" silently meant example.com.
    with pytest.raises(NameRuleError, match="not a valid IDNA label"):
        NamePattern.parse("exa\u200dmple.com")


def test_query_labels_are_raw_bytes_lowercased_ascii_only() -> None:
    assert labels_of([b"WWW", b"Example", b"com", b""]) == ("www", "example", "com")
    # A non-ASCII byte in a query label can never equal an A-label.
    assert not NamePattern.parse("xn--bcher-kva.example").matches(
        labels_of([b"b\xfccher", b"example", b""]))


@pytest.mark.parametrize(("text", "message"), [
    ("a*.example.com", "'*' is only allowed as the whole first label"),
    ("*.*.example.com", "'*' is only allowed"),
    ("*.", "names nothing"),
    ("foo..com", "empty label"),
    ("-a.com", "not a valid label"),
    ("a-.com", "not a valid label"),
    ("a b.com", "not a valid label"),
    ("x" * 64 + ".com", "longer than 63"),
    (".".join(["abcdefgh"] * 30) + ".com", "longer than 253"),
    # A letter O or l in an IPv4 address would otherwise make it a host name (and switch the
    # profile to the DNS forwarder).
    ("10.0.0.O", "looks like a mistyped IPv4 address, not a host name — did you mean 10.0.0.0"),
    ("192.168.l.1", "did you mean 192.168.1.1"),
    ("*.10.0.0.o", "did you mean 10.0.0.0"),
    ("1O.0.I0.1", "did you mean 10.0.10.1"),
    ("10.0.0O", "mistyped IPv4 address, not a host name — write an IPv4 address"),
])
def test_bad_patterns(text: str, message: str) -> None:
    with pytest.raises(NameRuleError, match=message):
        NamePattern.parse(text)


def test_policy_deny_wins_and_reports_every_matching_allow_rule() -> None:
    allow = [NameRule(NamePattern.parse("*.example.com")),
             NameRule(NamePattern.parse("api.example.com"), (443, 443), "tcp")]
    policy = NamePolicy(allow, [NameRule(NamePattern.parse("bad.example.com"))])
    assert policy.allowed_by(labels("api.example.com")) == [0, 1]
    assert policy.allowed_by(labels("www.example.com")) == [0]
    assert policy.allowed_by(labels("bad.example.com")) == []
    assert policy.allowed_by(labels("example.org")) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("api.stripe.com", "api.stripe.com"),
    ("api.stripe.com:443", "api.stripe.com:443"),
    ("api.stripe.com:443/TCP", "api.stripe.com:443/tcp"),
    ("*.example.com:8000-8999/udp", "*.example.com:8000-8999/udp"),
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("localhost", "localhost"),
    # Digits and letters that look like them, but not an IPv4 address's shape.
    ("io.io", "io.io"),
    ("1.li", "1.li"),
    ("0x10.example", "0x10.example"),
    ("101.oil.io", "101.oil.io"),
])
def test_entries_that_are_names(text: str, expected: str) -> None:
    entry = parse_egress_entry(text)
    assert isinstance(entry, NameRule)
    assert str(entry) == expected


@pytest.mark.parametrize("text", ["10.0.0.0/8", "10.0.0.1", "10.0.0.0/8:443/tcp", "::/0",
                                  "fd00::/8", "[2001:db8::/32]:443", "1.2.3.4:80"])
def test_entries_that_are_networks(text: str) -> None:
    assert isinstance(parse_egress_entry(text), Rule)


def profile(egress: str, enclave: str = "") -> str:
    return f"name: x\nparent:\n  egress:\n{egress}\nenclave:\n  address: 10.77.0.2/30\n{enclave}"


def test_profile_with_names() -> None:
    p = parse_profile(profile(
        '    allow: [api.stripe.com, "*.s3.us-east-1.amazonaws.com", 10.0.0.0/8]\n'
        "    deny: [evil.s3.us-east-1.amazonaws.com]\n"))
    e = p.parent.egress
    assert [str(r) for r in e.allow] == ["10.0.0.0/8"]
    assert [str(r) for r in e.allow_names] == ["api.stripe.com", "*.s3.us-east-1.amazonaws.com"]
    assert [str(r) for r in e.deny_names] == ["evil.s3.us-east-1.amazonaws.com"]
    assert e.uses_names and e.dns_grace == 60 and e.resolver == []
    # The credential endpoints are denied as always.
    assert "169.254.169.254/32" in [str(r) for r in e.deny]
    # Names make the parent's forwarder the enclave's resolver.
    assert [str(d) for d in p.enclave.dns] == ["10.77.0.1"]
    assert parse_profile(dump_profile(p)) == p


def test_profile_names_only_allow_no_cidr_by_default() -> None:
    p = parse_profile(profile("    allow: [api.stripe.com]\n"))
    assert p.parent.egress.allow == []


def test_deny_names_with_every_address_allowed_are_a_block_list() -> None:
    """With the default allow (every address), denying a name must not refuse every other
    name: the forwarder resolves all names but the denied ones."""
    from wgvsock.roles.parent import _name_policy

    for egress in ("    deny: [tracker.example]\n",
                   "    allow: [0.0.0.0/0/tcp]\n    deny: ['*.tracker.example']\n",
                   "    allow: [api.example.com, 0.0.0.0/0]\n    deny: [tracker.example]\n"):
        p = parse_profile(profile(egress))
        assert p.parent.egress.resolves_every_name
        assert [str(d) for d in p.enclave.dns] == ["10.77.0.1"]
        policy = _name_policy(p)
        assert policy.resolves(labels("www.example.org"))
        assert not policy.resolves(labels("x.tracker.example" if "*" in egress
                                          else "tracker.example"))
    # A names-only allow list still refuses the rest.
    p = parse_profile(profile("    allow: [a.example]\n    deny: [b.a.example]\n"))
    assert not p.parent.egress.resolves_every_name
    assert not _name_policy(p).resolves(labels("www.example.org"))


def test_policy_resolving_unlisted_names_keeps_denied_ones_out() -> None:
    policy = NamePolicy([NameRule(NamePattern.parse("api.example.com"))],
                        [NameRule(NamePattern.parse("*.tracker.example"))],
                        resolve_unlisted=True)
    assert policy.resolves(labels("example.org")) and policy.allowed_by(labels("example.org")) == []
    assert policy.allowed_by(labels("api.example.com")) == [0]
    assert not policy.resolves(labels("a.tracker.example"))
    assert not NamePolicy([], []).resolves(labels("example.org"))


def test_profile_resolver_grace_and_explicit_parent_dns() -> None:
    p = parse_profile(profile("    allow: [a.example]\n    resolver: [10.0.0.2, 10.0.0.3]\n"
                              "    dns_grace: 120\n", "  dns: parent\n"))
    assert [str(r) for r in p.parent.egress.resolver] == ["10.0.0.2", "10.0.0.3"]
    assert p.parent.egress.dns_grace == 120
    assert [str(d) for d in p.enclave.dns] == ["10.77.0.1"]
    assert parse_profile(dump_profile(p)) == p
    t = parse_profile(profile("    allow: [a.example]\n    test_dns_grace: 1\n"))
    assert t.parent.egress.dns_grace == 1
    assert parse_profile(dump_profile(t)) == t
    # Without names, nothing changes.
    assert parse_profile(profile("    allow: [10.0.0.0/8]\n")).enclave.dns == [AWS_DNS_V4]


@pytest.mark.parametrize(("egress", "enclave", "message"), [
    ("    allow: ['a*.com']\n", "", "allow[0]: 'a*.com': '*' is only allowed"),
    ("    allow: ['x.com:0']\n", "", "port 0 in 'x.com:0' is out of range"),
    ("    allow: ['x.com/icmp']\n", "", "protocol 'icmp' in 'x.com/icmp' is not tcp or udp"),
    ("    allow: [10.0.0.0/8]\n", "  dns: parent\n", "answers only for host names"),
    ("    allow: [a.example]\n", "  dns: 1.1.1.1\n", "write `dns: parent`"),
    ("    allow: [a.example]\n    dns_grace: 5\n", "", "dns_grace: 5 is out of range"),
    ("    allow: [a.example]\n    resolver: dns.google\n", "", "is not an IP address"),
    ("    allow: [10.0.0.O]\n", "",
     "allow[0]: '10.0.0.O' looks like a mistyped IPv4 address, not a host name — did you "
     "mean 10.0.0.0?"),
    ("    allow: ['10.0.0.O:443/tcp']\n", "", "did you mean 10.0.0.0?"),
    # A denied name's queries are refused whatever the port: a port would promise more.
    ("    deny: ['tracker.example:443/tcp']\n", "",
     "deny[0]: 'tracker.example:443/tcp': a port or protocol on a denied host name"),
    ("    deny: ['tracker.example/udp']\n", "", "is not honoured"),
    # Nothing lets a name through: the forwarder would refuse every query.
    ("    allow: [10.0.0.0/8]\n    deny: [tracker.example]\n", "",
     "deny: host names here with none in parent.egress.allow"),
    ("    allow: ['0.0.0.0/0:443/tcp']\n    deny: [tracker.example]\n", "",
     "or allow 0.0.0.0/0 to resolve every name not denied"),
])
def test_profile_errors(egress: str, enclave: str, message: str) -> None:
    with pytest.raises(ProfileError) as e:
        parse_profile(profile(egress, enclave))
    assert message in str(e.value)
    assert "Traceback" not in str(e.value)


def test_render_name_sets_rules_and_forwarder_port() -> None:
    p = parse_profile(profile('    allow: [api.stripe.com:443/tcp, "*.example.com"]\n'))
    spec = firewall.FirewallSpec(
        name="x", tunnel_interface="wg0", enclave_addresses=["10.77.0.2"],
        allow=p.parent.egress.allow, deny=p.parent.egress.deny,
        allow_names=p.parent.egress.allow_names, dns_forwarder=["10.77.0.1"])
    text = firewall.render_ruleset(spec)
    for i in (0, 1):
        for v, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            assert f"set name{i}_v{v} {{\n\t\ttype {kind}\n\t\tflags timeout\n\t\tsize 65536" \
                in text
    assert ('ip daddr @name0_v4 tcp dport 443 counter name "egress_allowed" counter accept '
            'comment "allow api.stripe.com:443/tcp"') in text
    assert ('ip6 daddr @name1_v6 counter name "egress_allowed" counter accept '
            'comment "allow *.example.com"') in text
    # Deny rules (the metadata service) come before the name rules.
    assert text.index("deny 169.254.169.254/32") < text.index("@name0_v4")
    assert ('ip daddr 10.77.0.1 meta l4proto { tcp, udp } th dport 53 counter accept '
            'comment "dns forwarder"') in text
    # Without names: no sets, no port 53.
    plain = firewall.render_ruleset(firewall.FirewallSpec(
        name="x", tunnel_interface="wg0", enclave_addresses=["10.77.0.2"]))
    assert "name0" not in plain and "dport 53" not in plain


def test_a_long_name_rule_is_counted_under_its_full_name_in_the_metrics() -> None:
    """Its nft comment is cut to nft's 128 bytes; the Prometheus label keeps the whole rule."""
    from types import SimpleNamespace

    from wgvsock.services.metrics.counters import Reading
    from wgvsock.services.metrics.prometheus import ParentCollector

    long = ".".join(["a" * 60, "b" * 60, "c" * 60, "example.com"])
    p = parse_profile(profile(f"    allow: ['{long}:443/tcp', api.example.com]\n"))
    spec = firewall.FirewallSpec(
        name="x", tunnel_interface="wg0", enclave_addresses=["10.77.0.2"],
        allow_names=p.parent.egress.allow_names, dns_forwarder=["10.77.0.1"])
    comments = [c.split('"', 1)[0] for c in firewall.render_ruleset(spec).split('comment "')[1:]]
    assert max(len(c.encode()) for c in comments) <= 128
    cut = firewall.rule_comment(f"allow {long}:443/tcp")
    assert cut in comments and len(cut) == 128
    reading = Reading({cut: firewall.Counter(4, 400),
                       "allow api.example.com": firewall.Counter(1, 100)}, None)
    parent = SimpleNamespace(profile=p, device=None, counters=SimpleNamespace(
        read=lambda: reading))
    family = {m.name: m for m in ParentCollector(parent).collect()}["wgvsock_egress_rule_packets"]
    got = {s.labels["rule"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert got == {f"{long}:443/tcp": 4, "api.example.com": 1}


def test_add_to_sets_refuses_what_is_not_a_name_set() -> None:
    with pytest.raises(ValueError, match="not a name set"):
        firewall.add_to_sets("x", [("enclave_v4", "10.0.0.1", 5)])  # type: ignore[list-item]


def _dns_check(egress: str):
    """`parent doctor`'s DNS forwarder line for a profile with this egress section."""
    from wgvsock.roles.parent import local_checks

    return {c.name: c for c in local_checks(parse_profile(profile(egress)))}.get(
        "DNS forwarder")


def _resolv_conf(monkeypatch, conf: list[str]) -> None:
    """/etc/resolv.conf's nameservers are `conf`, as it is at each look (change it in place)."""
    from wgvsock.services.egress import forwarder

    monkeypatch.setattr(forwarder, "system_resolvers", lambda exclude=(): [
        ipaddress.ip_address(a) for a in conf if ipaddress.ip_address(a) not in exclude])


def test_doctor_checks_the_forwarders_resolver(monkeypatch) -> None:
    assert _dns_check("    allow: [10.0.0.0/8]\n") is None
    check = _dns_check("    allow: [a.example]\n    resolver: 10.0.0.2\n")
    assert check.ok and check.detail == "forwards allowed names to 10.0.0.2"
    _resolv_conf(monkeypatch, [])
    check = _dns_check("    allow: [a.example]\n")
    assert check.ok is False and "set parent.egress.resolver" in check.detail


def test_resolv_conf_resolvers_in_the_tunnel_are_left_out_and_said(monkeypatch, caplog) -> None:
    """Review finding: of /etc/resolv.conf's nameservers only the parent's own addresses were
    left out, while parent.egress.resolver may name none in the tunnel subnet: a resolv.conf
    naming the enclave's address made the forwarder ask the enclave, whose answers decide
    which addresses its names open. Loopback ones (systemd-resolved's 127.0.0.53) stay: the
    forwarder runs on the parent and asks from there, and the enclave never gets them."""
    import logging

    from wgvsock.roles import parent as parent_mod
    from wgvsock.roles.common import RoleError

    conf = ["10.77.0.1", "10.77.0.2", "127.0.0.53", "10.77.0.3", "::1"]
    _resolv_conf(monkeypatch, conf)
    p = parse_profile(profile("    allow: [a.example]\n"))
    check = _dns_check("    allow: [a.example]\n")
    assert check.ok, check.detail
    assert check.detail.startswith("forwards allowed names to 127.0.0.53, ::1; left out of "
                                   "/etc/resolv.conf's nameservers: 10.77.0.2 is in the tunnel "
                                   "subnet 10.77.0.0/30, the enclave's own address"), check.detail
    assert "10.77.0.3 is in the tunnel subnet 10.77.0.0/30, no host there" in check.detail
    with caplog.at_level(logging.WARNING, logger="wgvsock.parent"):
        assert parent_mod._upstream(p) == [ipaddress.ip_address("127.0.0.53"),
                                           ipaddress.ip_address("::1")]
    assert "10.77.0.2 is in the tunnel subnet" in caplog.text
    conf[:] = ["10.77.0.2"]
    check = _dns_check("    allow: [a.example]\n")
    assert check.ok is False and "names no resolver the DNS forwarder may ask" in check.detail
    assert "10.77.0.2 is in the tunnel subnet" in check.detail
    assert check.detail.endswith("set parent.egress.resolver")
    with pytest.raises(RoleError, match=r"enclave's own address.*set parent\.egress\.resolver"):
        parent_mod._upstream(p)


def test_resolv_conf_resolvers_that_name_no_host_are_left_out_and_said(monkeypatch,
                                                                        caplog) -> None:
    """Review finding: unspecified and multicast nameservers of /etc/resolv.conf were kept,
    while parent.egress.resolver may name neither. To 0.0.0.0 or :: the kernel sends to
    loopback, whose answer dnspython drops as from another address (a 2 s timeout per
    query); to a multicast group, dnspython takes an answer from any host in it, and those
    answers open addresses to the enclave."""
    import logging

    from wgvsock.roles import parent as parent_mod
    from wgvsock.roles.common import RoleError

    conf = ["0.0.0.0", "224.0.0.251", "127.0.0.53", "::", "ff02::fb", "255.255.255.255",
            "10.0.0.2"]
    _resolv_conf(monkeypatch, conf)
    p = parse_profile(profile("    allow: [a.example]\n"))
    check = _dns_check("    allow: [a.example]\n")
    assert check.ok, check.detail
    assert check.detail.startswith("forwards allowed names to 127.0.0.53, 10.0.0.2; left out "
                                   "of /etc/resolv.conf's nameservers: 0.0.0.0 is the "
                                   "unspecified address"), check.detail
    for said in ("224.0.0.251 is a multicast address", ":: is the unspecified address",
                 "ff02::fb is a multicast address",
                 "255.255.255.255 is the limited broadcast address"):
        assert said in check.detail, check.detail
    with caplog.at_level(logging.WARNING, logger="wgvsock.parent"):
        assert parent_mod._upstream(p) == [ipaddress.ip_address("127.0.0.53"),
                                           ipaddress.ip_address("10.0.0.2")]
    assert "0.0.0.0 is the unspecified address" in caplog.text
    conf[:] = ["0.0.0.0", "ff02::fb"]
    check = _dns_check("    allow: [a.example]\n")
    assert check.ok is False and "names no resolver the DNS forwarder may ask" in check.detail
    assert check.detail.endswith("set parent.egress.resolver"), check.detail
    with pytest.raises(RoleError, match=r"unspecified address.*set parent\.egress\.resolver"):
        parent_mod._upstream(p)
