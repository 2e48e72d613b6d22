"""Profiles: defaults, every kind of refusal (with file, line, key and reason), round trips."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.unsayable import Unsayable
from wgvsock import cli
from wgvsock.services.profile import (
    DEFAULT_MAX_CONNECTIONS,
    Attestation,
    EnclaveLaunch,
    EnclaveUser,
    HostRoutes,
    Ingress,
    IPRule,
    Problem,
    Profile,
    ProfileError,
    Rule,
    Transport,
    check_host,
    check_host_warnings,
    check_routes,
    dump_profile,
    load_profile,
    local_networks,
    main_check,
    parse_profile,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "parent" / "profile.example.yaml", ROOT / "enclave" / "profile.example.yaml"]
UNIX_PROFILE = ROOT / "tests" / "data" / "profile-unix.yaml"
PCR = "ab" * 48
PARENT_PUB = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
FILE = "t.yaml"

net = ipaddress.ip_network
iface = ipaddress.ip_interface
ip = ipaddress.ip_address


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def line_with(text: str, needle: str) -> int:
    """The 1-based line of TEXT holding NEEDLE, so expected lines follow the YAML as written."""
    lines = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"needle {needle!r} must occur once"
    return lines[0]


def problems(text: str) -> list[Problem]:
    with pytest.raises(ProfileError) as info:
        parse_profile(text, FILE)
    err = info.value
    assert str(err) == "\n".join(str(p) for p in err.problems)
    return err.problems


def warned(text: str, key: str, reason: str, needle: str | None = None) -> Problem:
    """Assert TEXT is taken with exactly one warning about KEY, on NEEDLE's line."""
    found = parse_profile(text, FILE).warnings
    assert len(found) == 1, "\n".join(map(str, found))
    p = found[0]
    assert p.key == key
    assert reason in p.reason, str(p)
    if needle is not None:
        assert p.line == line_with(text, needle), str(p)
    assert " — " in str(p)  # every warning says what to do
    return p


def refused(text: str, key: str, reason: str, needle: str | None = None) -> Problem:
    """Assert TEXT is refused with exactly one problem about KEY, on NEEDLE's line."""
    found = problems(text)
    assert len(found) == 1, "\n".join(map(str, found))
    p = found[0]
    assert p.file == FILE
    assert p.key == key
    assert reason in p.reason, str(p)
    if needle is not None:
        assert p.line == line_with(text, needle), str(p)
    assert str(p).startswith(f"{FILE}:{p.line}: {key}: ")
    assert " — " in str(p)  # every refusal says how to fix it
    return p


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_of_a_minimal_profile():
    p = parse_profile("name: payments\n", FILE)
    assert (p.version, p.name, p.interface, p.mtu, p.path) == (1, "payments", "wg0", 1420, FILE)
    # Privileged vsock ports: an unprivileged host process cannot bind them.
    assert p.transport == Transport("vsock", 820, 821, 3, "/run/wgvsock/payments", None)
    assert p.transport.port < 1024 and p.transport.control_port < 1024
    assert p.parent.addresses == [iface("10.77.0.1/30")]
    assert p.parent.private_key == "/etc/wgvsock/payments.key"
    assert p.parent.egress.nat is True
    assert p.parent.egress.interface is None
    assert p.parent.egress.allow == [Rule(net("0.0.0.0/0"))]
    assert p.parent.egress.deny == CREDENTIAL_DENY
    assert p.parent.public_key is None
    assert p.parent.ingress == []
    assert p.parent.enclave is None
    assert p.enclave.addresses == [iface("10.77.0.2/30")]
    assert p.enclave.dns == [ip("169.254.169.253")]
    assert p.enclave.routes == [net("0.0.0.0/0")]
    assert p.attestation == Attestation(False, {}, 300)


def test_control_port_defaults_to_port_plus_one():
    p = parse_profile("name: a\ntransport: {port: 6000}\n")
    assert (p.transport.port, p.transport.control_port) == (6000, 6001)
    p = parse_profile("name: a\ntransport: {port: 6000, control_port: 7000}\n")
    assert p.transport.control_port == 7000


def test_empty_values_mean_defaults():
    p = parse_profile("name: a\ninterface:\ntransport:\nparent:\n  egress:\nattestation:\n")
    assert p == parse_profile("name: a\n")


def test_one_side_address_derives_the_other():
    p = parse_profile("name: a\nparent: {address: 10.9.0.1/30}\n")
    assert p.enclave.addresses == [iface("10.9.0.2/30")]
    p = parse_profile("name: a\nenclave: {address: 10.9.0.1/30}\n")
    assert p.parent.addresses == [iface("10.9.0.2/30")]


def test_ipv6_defaults_follow_the_enclave_addresses():
    text = y("""
        name: a
        parent: {address: [10.77.0.1/30, "fd77::1/126"]}
        enclave: {address: [10.77.0.2/30, "fd77::2/126"]}
    """)
    p = parse_profile(text)
    assert p.enclave.routes == [net("0.0.0.0/0"), net("::/0")]
    assert p.parent.egress.allow == [Rule(net("0.0.0.0/0")), Rule(net("::/0"))]
    # The metadata service has an IPv6 address too on Nitro instances.
    assert p.parent.egress.deny == CREDENTIAL_DENY
    assert p.enclave.dns == [ip("169.254.169.253")]


def test_ipv6_only_profile():
    p = parse_profile('name: a\nparent: {address: "fd77::1/126"}\n')
    assert p.enclave.addresses == [iface("fd77::2/126")]
    assert p.enclave.routes == [net("::/0")]
    assert p.enclave.dns == [ip("fd00:ec2::253")]


CREDENTIALS = ["169.254.169.254/32", "fd00:ec2::254/128", "169.254.170.2/32", "169.254.170.23/32",
               "fd00:ec2::23/128"]
CREDENTIAL_DENY = [Rule(net(c)) for c in CREDENTIALS]


@pytest.mark.parametrize(("allow", "lifted"), [
    ("[169.254.169.254/32]", ["169.254.169.254/32"]),
    ("[0.0.0.0/0, 169.254.169.254/32:80/tcp]", ["169.254.169.254/32"]),
    ("[169.254.170.2/32:80/tcp]", ["169.254.170.2/32"]),
    ('["fd00:ec2::254/128"]', ["fd00:ec2::254/128"]),
    ("[169.254.0.0/16]", ["169.254.169.254/32", "169.254.170.2/32", "169.254.170.23/32"]),
    # A catch-all says nothing about the metadata service: it stays denied.
    ("[0.0.0.0/0]", []),
    ("[128.0.0.0/1]", []),
    ('[10.0.0.0/8, "::/0"]', []),
])
def test_metadata_service_denied_unless_allowed_explicitly(allow, lifted):
    p = parse_profile(f"name: a\nparent: {{egress: {{allow: {allow}}}}}\n")
    assert [str(r) for r in p.parent.egress.deny] == [c for c in CREDENTIALS if c not in lifted]


@pytest.mark.parametrize("deny", ["[]", "[10.0.0.0/8]", "[169.254.170.2/32:80/tcp]"])
def test_own_deny_list_keeps_the_credential_endpoints_denied(deny):
    # Issue 12, item 1: a profile that wrote its own deny list used to lose the IMDS deny.
    p = parse_profile(f"name: a\nparent: {{egress: {{deny: {deny}}}}}\n")
    own = [] if deny == "[]" else [deny.strip("[]")]
    assert [str(r) for r in p.parent.egress.deny] == [*own, *CREDENTIALS]


def test_explicit_deny_is_kept_even_when_allow_names_the_metadata_service():
    text = ("name: a\nparent: {egress: {allow: [169.254.0.0/16:80/tcp], "
            "deny: [169.254.169.254/32]}}\n")
    egress = parse_profile(text).parent.egress
    assert "169.254.169.254/32" in [str(r) for r in egress.deny]
    assert [str(r) for r in egress.lifted] == ["169.254.170.2/32:80/tcp",
                                               "169.254.170.23/32:80/tcp"]
    # Allowing exactly what deny names: deny wins, as it says, and a warning names both.
    text = "name: a\nparent: {egress: {allow: [169.254.169.254/32], deny: [169.254.169.254/32]}}\n"
    assert [str(r) for r in parse_profile(text).parent.egress.deny] == CREDENTIALS
    p = warned(text, "parent.egress.allow[0]", "never allowed")
    assert "deny[0]" in p.reason


def test_profile_check_prints_the_effective_deny_list(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("name: a\nparent: {egress: {deny: []}}\n")
    assert main_check([str(path)]) == 0
    out = capsys.readouterr().out
    dumped = yaml.safe_load(out)["parent"]["egress"]["deny"]
    assert dumped == CREDENTIALS
    assert "effective" in out
    # The dump reads back to the same profile (the forced entries are not doubled).
    assert parse_profile(out, str(path)) == parse_profile(path.read_text(), str(path))


def test_the_effective_deny_list_shows_an_endpoint_lifted_for_one_port_as_denied_for_the_rest(
        tmp_path, capsys):
    """Review finding: the effective deny list shown (`profile check`, the demo) left out a
    credential endpoint an allow entry lifts for one port, as if the enclave could reach all
    of it: the table drops the rest of its traffic."""
    text = ('name: a\nparent: {egress: {allow: [0.0.0.0/0, "169.254.169.254/32:80/tcp", '
            '"169.254.170.2/32:80", "169.254.170.2/32:8080-8090/udp", 169.254.170.23/32]}}\n')
    egress = parse_profile(text).parent.egress
    assert egress.effective_deny() == [
        "fd00:ec2::254/128", "fd00:ec2::23/128",
        "169.254.169.254/32 (all but tcp port 80, which parent.egress.allow names)",
        "169.254.170.2/32 (all but port 80 or udp ports 8080-8090, which parent.egress.allow "
        "names)"]  # 169.254.170.23 is lifted whole
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main_check([str(path)]) == 0
    out = capsys.readouterr().out
    assert ("# denied too, but for what an allow rule names:\n"
            "#   169.254.169.254/32 (all but tcp port 80, which parent.egress.allow names)\n"
            ) in out, out
    # Said in a comment, not in deny, where it would read back as denied whole.
    assert parse_profile(out, str(path)) == parse_profile(text, str(path))
    assert parse_profile("name: a\n").parent.egress.effective_deny() == CREDENTIALS


def test_full_profile():
    text = y(f"""
        version: 1
        name: full-1
        interface: wgp0
        mtu: 1380
        transport: {{kind: tcp, port: 5000, control_port: 5001, host: 192.0.2.1}}
        parent:
          address: 10.9.0.1/29
          private_key: ssm:/wgvsock/full
          egress:
            nat: false
            interface: eth0
            allow: [10.0.0.0/8:443/tcp, "[2001:db8::/32]:53/udp"]
            deny: [10.0.0.5/32]
          ingress:
            - {{listen: 8443, to: 443}}
            - {{listen: 8443, protocol: udp}}
          enclave: {{eif: /opt/app.eif, cpu_count: 4, memory_mib: 2048, cid: 16}}
        enclave:
          address: 10.9.0.6/29
          dns: [10.9.0.1]
          routes: [10.0.0.0/8]
        attestation:
          require: true
          pcrs: {{0: {PCR.upper()}, PCR8: "0x{PCR}"}}
          max_age: 60
    """)
    p = parse_profile(text, "full.yaml")
    assert p.transport == Transport("tcp", 5000, 5001, 3, "/run/wgvsock/full-1", "192.0.2.1")
    assert p.parent.private_key == "ssm:/wgvsock/full"
    assert p.parent.egress.nat is False and p.parent.egress.interface == "eth0"
    assert [str(r) for r in p.parent.egress.allow] == ["10.0.0.0/8:443/tcp",
                                                       "[2001:db8::/32]:53/udp"]
    assert p.parent.ingress == [Ingress(8443, 443, "tcp"), Ingress(8443, 8443, "udp")]
    assert p.parent.enclave == EnclaveLaunch("/opt/app.eif", 4, 2048, 16, False)
    assert p.enclave.dns == [ip("10.9.0.1")]  # reachable through the tunnel subnet itself
    assert p.attestation == Attestation(True, {0: PCR, 8: PCR}, 60)
    assert p.line_of("parent.egress.allow[1]") == line_with(text, "allow:")
    assert p.line_of("attestation.pcrs.0") == line_with(text, "pcrs:")


def test_pcr_of_only_digits_stays_text():
    # YAML 1.1 would read an all-digit value as an integer and drop its leading zeros.
    value = "0" * 95 + "7"
    p = parse_profile(f"name: a\nattestation: {{pcrs: {{2: {value}}}}}\n")
    assert p.attestation.pcrs == {2: value}


def test_a_plain_value_yaml_cannot_build_is_still_text_where_text_is_read():
    # YAML 1.1 guesses a date in 2024-02-30 and a value in "=", and cannot build either:
    # read as text, each is what was written. Only a tag someone wrote must
    # fit (`name: !!int abc` is refused, below in BAD).
    assert parse_profile("name: 2024-02-30\n").name == "2024-02-30"
    with pytest.raises(ProfileError) as e:  # read as text, then judged as a name
        parse_profile("name: =\n")
    assert "name: '=' is not a valid name" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Examples and round trips


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_profiles_load(path):
    p = load_profile(path)
    assert p.path == str(path)
    assert p.name == "payments"
    assert p.transport.kind == "vsock"
    assert p.parent.ingress == [Ingress(8443, 443, "tcp")]


def test_the_examples_pcr_placeholder_uncommented_says_what_goes_there():
    """The example's commented `0: 000...0` placeholder, uncommented, was refused as a
    debug-mode PCR; now it is a word, refused with where the real value comes from."""
    text = EXAMPLES[0].read_text()
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("  # pcrs:"))
    assert lines[at - 1] == "  pcrs: {}\n"
    lines[at - 1:at + 2] = ["  pcrs:\n", lines[at + 1].replace("#   0:", "    0:", 1)]
    with pytest.raises(ProfileError) as e:
        parse_profile("".join(lines), FILE)
    [problem] = e.value.problems
    assert problem.key == "attestation.pcrs.0" and problem.line == at + 1
    assert "nitro-cli describe-eif" in problem.hint and "96 hex digits" in problem.hint


def test_a_second_profile_copied_from_the_example_has_its_own_key_and_sockets():
    """The example set private_key /etc/wgvsock/payments.key and transport.path
    /run/wgvsock/payments outright: a second profile copied from it, renamed, shared the
    first's key (one identity for two parents) and, with unix, its socket directory."""
    text = EXAMPLES[0].read_text()
    assert "\nname: payments\n" in text
    first = parse_profile(text, FILE)
    other = parse_profile(text.replace("\nname: payments\n", "\nname: billing\n")
                          .replace("kind: vsock ", "kind: unix  "), FILE)
    assert first.parent.private_key == "/etc/wgvsock/payments.key"
    assert other.parent.private_key == "/etc/wgvsock/billing.key"
    assert other.transport.path == "/run/wgvsock/billing"


def test_examples_are_the_same_file():
    assert EXAMPLES[0].read_bytes() == EXAMPLES[1].read_bytes()


def test_unix_profile_for_end_to_end_tests():
    p = load_profile(UNIX_PROFILE)
    assert p.transport.kind == "unix"
    assert p.transport.path.startswith("/")


ROUND_TRIP = [
    "name: a\n",
    'name: a\nparent: {address: [10.1.2.1/24, "fd00:1::1/64"]}\n'
    'enclave: {address: [10.1.2.9/24, "fd00:1::9/64"]}\n',
    "name: a\nparent: {egress: {allow: [169.254.169.254/32:80/tcp]}}\n",
    f"name: a\nattestation: {{require: true, pcrs: {{4: {'0' * 96}, 0: {PCR}}}}}\n",
    "name: a\nparent: {enclave: {eif: /x.eif, debug: true}, "
    "ingress: [{listen: 1, to: 2, protocol: udp}]}\nattestation: {allow_debug: true}\n",
    f"name: a\nparent: {{public_key: {PARENT_PUB}}}\n"
    f"attestation: {{require: true, pcrs: {{0: {PCR}}}, test_root_ca: /t/root.pem}}\n",
    "name: a\ntransport: {kind: tcp, host: '2001:db8::1', port: 1}\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_dump_parse_round_trip(text):
    p = parse_profile(text, "rt.yaml")
    dumped = dump_profile(p)
    again = parse_profile(dumped, "rt.yaml")
    assert again == p
    assert dump_profile(again) == dumped


@pytest.mark.parametrize("path", [*EXAMPLES, UNIX_PROFILE], ids=str)
def test_dump_round_trip_of_files(path):
    p = load_profile(path)
    assert parse_profile(dump_profile(p), str(path)) == p


def test_enclave_cid_is_read_and_round_trips():
    profile = parse_profile("name: a\nparent:\n  enclave_cid: 16\n")
    assert profile.parent.enclave_cid == 16
    assert parse_profile(dump_profile(profile)).parent.enclave_cid == 16
    assert parse_profile("name: a\n").parent.enclave_cid is None


def test_dump_fills_every_default():
    dumped = dump_profile(parse_profile("name: a\n"))
    for key in ("version:", "interface:", "mtu:", "kind:", "port:", "control_port:",
                "parent_cid:", "path:", "host:", "address:", "private_key:", "nat:", "allow:",
                "deny:", "ingress:", "dns:", "routes:", "require:", "pcrs:", "max_age:"):
        assert key in dumped


# ---------------------------------------------------------------------------------------------
# Rules


@pytest.mark.parametrize(("text", "network", "ports", "protocol", "canonical"), [
    ("10.0.0.0/8", "10.0.0.0/8", None, None, None),
    ("10.0.0.0/8:443", "10.0.0.0/8", (443, 443), None, None),
    ("10.0.0.0/8:1000-2000/udp", "10.0.0.0/8", (1000, 2000), "udp", None),
    ("10.0.0.0/8/tcp", "10.0.0.0/8", None, "tcp", None),
    ("192.0.2.7", "192.0.2.7/32", None, None, "192.0.2.7/32"),
    ("[10.0.0.0/8]:22/TCP", "10.0.0.0/8", (22, 22), "tcp", "10.0.0.0/8:22/tcp"),
    ("2001:db8::/32", "2001:db8::/32", None, None, None),
    ("::/0", "::/0", None, None, None),
    ("[2001:db8::/32]:443/tcp", "2001:db8::/32", (443, 443), "tcp", None),
    ("[2001:db8::/32]:1-65535", "2001:db8::/32", (1, 65535), None, None),
    ("2001:db8::/32/udp", "2001:db8::/32", None, "udp", None),
    ("[2001:db8::/32]", "2001:db8::/32", None, None, "2001:db8::/32"),
])
def test_rule_parse_and_str(text, network, ports, protocol, canonical):
    r = Rule.parse(text)
    assert r == Rule(net(network), ports, protocol)
    assert str(r) == (canonical or text)
    assert Rule.parse(str(r)) == r


@pytest.mark.parametrize(("text", "reason"), [
    ("10.0.0.1/8", "host bits set"),
    ("10.0.0.0/8:0", "out of range"),
    ("10.0.0.0/8:65536", "out of range"),
    ("10.0.0.0/8:2000-1000", "backwards"),
    ("10.0.0.0/8:http", "bad port"),
    ("10.0.0.0/8/icmp", "not tcp or udp"),
    ("2001:db8::/32:443", "needs brackets"),
    ("[2001:db8::/32:443", "without ']'"),
    ("[2001:db8::/32]443", "after ']'"),
    ("example.com", "not an IP network"),
])
def test_rule_parse_refuses(text, reason):
    with pytest.raises(ValueError, match=reason):
        Rule.parse(text)


# ---------------------------------------------------------------------------------------------
# Refusals: every one names file, line, key and reason


def test_a_later_releases_profile_says_to_upgrade_not_to_change_the_version():
    # Before: "version 2 is not supported — this wgvsock reads version 1; write version: 1",
    # which would have this release read a later format as if it were its own.
    p = refused("name: a\nversion: 2\n", "version", "a later wgvsock's profile format",
                "version:")
    assert "upgrade it" in p.hint and "write version" not in p.hint
    # A key a later release added: the hint says so beside the keys this one knows.
    p = refused("name: a\nparent:\n  tomorrow: 1\n", "parent.tomorrow", "unknown key")
    assert "known keys here" in p.hint and "later wgvsock" in p.hint


def test_unknown_key_suggests_the_closest():
    text = "name: a\ninterfce: wg1\n"
    p = refused(text, "interfce", "unknown key 'interfce'", "interfce")
    assert "did you mean 'interface'" in p.hint
    text = y("""
        name: a
        parent:
          egress:
            alow: [10.0.0.0/8]
    """)
    p = refused(text, "parent.egress.alow", "unknown key", "alow")
    assert "'allow'" in p.hint
    p = refused("name: a\nzzzzzz: 1\n", "zzzzzz", "unknown key")
    assert "known keys here" in p.hint



@pytest.mark.parametrize("name", ["-wg0", ".wg0"])
def test_an_interface_name_starting_with_dash_or_dot_is_refused_saying_why(name):
    # The hint listed the characters allowed ('.' and '-' among them) and not that the first
    # may be neither, so `.wg0`, all of those characters, was refused with no reason to see.
    p = refused(f"name: a\ninterface: '{name}'\n", "interface", "not a valid interface name",
                "interface:")
    assert "starting with a letter, a digit or '_'" in p.hint


BAD = [
    # (yaml, key, reason, needle naming the line)
    ("interface: wg0\n", "name", "missing", None),
    ("name: Payments\n", "name", "not a valid name", "name:"),
    ("name: -a\n", "name", "not a valid name", "name:"),
    ("name: forwarding\n", "name", "'forwarding' is reserved", "name:"),
    (f"name: {'a' * 32}\n", "name", "not a valid name", "name:"),
    ("name: [a]\n", "name", "expected a string, got a list", "name:"),
    ("name: a\nversion: 0\n", "version", "not supported", "version:"),
    ("name: a\nversion: '1'\n", "version", "expected an integer, got a string", "version:"),
    ("name: a\nmtu: big\n", "mtu", "expected an integer", "mtu:"),
    ("name: a\nmtu: 575\n", "mtu", "out of range", "mtu:"),
    ("name: a\nmtu: 65536\n", "mtu", "out of range", "mtu:"),
    # str.isdigit() takes it, int() does not: the stream transport's hint read it with int()
    # and raised ValueError.
    ("name: a\nmtu: \u00b2\n", "mtu", "expected an integer", "mtu:"),
    ("name: a\nmtu: 1279\nparent: {address: 'fd77::1/126'}\n", "mtu", "IPv6 minimum", "mtu:"),
    ("name: a\ninterface: wireguard-payments\n", "interface", "longer than 15", "interface:"),
    ("name: a\ninterface: 'wg 0'\n", "interface", "not a valid interface name", "interface:"),
    ("name: a\ninterface: wg/0\n", "interface", "not a valid interface name", "interface:"),
    ("name: a\ninterface: all\n", "interface", "'all' is reserved", "interface:"),
    ("name: a\nparent:\n  egress: {interface: default}\n", "parent.egress.interface",
     "'default' is reserved", "interface:"),
    ("name: a\ntransport: [vsock]\n", "transport", "expected a mapping, got a list",
     "transport:"),
    ("name: a\ntransport:\n  kind: udp\n", "transport.kind", "not one of", "kind:"),
    ("name: a\ntransport:\n  port: 4294967295\n", "transport.port", "out of range", " port:"),
    ("name: a\ntransport:\n  port: 0\n", "transport.port", "out of range", " port:"),
    ("name: a\ntransport:\n  kind: unix\n  port: 65536\n", "transport.port", "out of range",
     " port:"),
    ("name: a\ntransport:\n  kind: tcp\n  host: 192.0.2.1\n  port: 70000\n", "transport.port",
     "out of range", " port:"),
    ("name: a\ntransport:\n  port: 7\n  control_port: 7\n", "transport.control_port",
     "control_port equals port", "control_port:"),
    ("name: a\ntransport:\n  kind: tcp\n  host: 192.0.2.1\n  port: 65535\n",
     "transport.control_port", "default control_port", " port:"),
    ("name: a\ntransport:\n  kind: tcp\n", "transport.host", "required when transport.kind is tcp",
     "transport:"),
    ("name: a\ntransport:\n  kind: tcp\n  host: parent.local\n", "transport.host",
     "not an IP address", "host:"),
    ("name: a\ntransport:\n  path: run/x\n", "transport.path", "not an absolute path", "path:"),
    ("name: a\ntransport:\n  parent_cid: 4294967295\n", "transport.parent_cid", "out of range",
     "parent_cid:"),
    ("name: a\nparent:\n  enclave_cid: 3\n", "parent.enclave_cid", "out of range",
     "enclave_cid:"),
    ("name: a\nparent:\n  enclave_cid: 16\n  enclave: {eif: /x.eif}\n", "parent.enclave_cid",
     "set together with parent.enclave", "enclave_cid:"),
    ("name: a\nparent:\n  address: 10.77.0.300/30\n", "parent.address", "not an address",
     "address:"),
    ("name: a\nparent:\n  address: 10.77.0.1\n", "parent.address", "no prefix length",
     "address:"),
    ("name: a\nparent:\n  address: 10.77.0.1/32\n", "parent.address", "no room", "address:"),
    ("name: a\nparent:\n  address: 10.77.0.0/30\n", "parent.address", "network address",
     "address:"),
    # A /0 tunnel overlaps every network of every host: `parent up` refused it (check_host's
    # overlap with one of this host's networks), `profile check` without --host passed it.
    ("name: a\nparent:\n  address: 10.0.0.1/0\n", "parent.address",
     "tunnel subnet 0.0.0.0/0 overlaps every network of this host", "address:"),
    ("name: a\nenclave:\n  address: ['fd77::2/0']\n", "enclave.address[0]",
     "tunnel subnet ::/0 overlaps every network of this host", "address:"),
    ("name: a\nparent:\n  address: {ip: 10.77.0.1/30}\n", "parent.address",
     "expected a list, got a mapping", "address:"),
    ("name: a\nparent:\n  address: []\n", "parent.address", "no address given", "address:"),
    ("name: a\nparent:\n  address:\n    - 10.77.0.1/30\n    - 10.78.0.1/30\n",
     "parent.address[1]", "second IPv4", "10.78"),
    ("name: a\nparent: {address: 10.77.0.1/30}\nenclave:\n  address: 10.77.1.2/30\n",
     "enclave.address", "outside the tunnel subnet 10.77.0.0/30", "10.77.1.2"),
    ("name: a\nparent: {address: 10.77.0.1/30}\nenclave:\n  address: 10.77.0.1/30\n",
     "enclave.address", "the parent's own address", "  address: 10.77.0.1/30"),
    ("name: a\nparent: {address: 10.77.0.1/30}\nenclave:\n  address: 10.77.0.2/24\n",
     "enclave.address", "prefix /24 differs", "/24"),
    ("name: a\nparent: {address: 10.77.0.1/30}\nenclave:\n  address: [10.77.0.2/30, "
     "'fd77::2/126']\n", "enclave.address", "parent.address has none", "fd77"),
    ("name: a\nparent:\n  private_key: keys/a.key\n", "parent.private_key",
     "not an absolute path", "private_key:"),
    ("name: a\nparent:\n  private_key: 'ssm:'\n", "parent.private_key", "names no parameter",
     "private_key:"),
    ("name: a\nparent:\n  egress:\n    nat: 'yes'\n", "parent.egress.nat",
     "expected true or false", "nat:"),
    ("name: a\nparent:\n  egress:\n    interface: a-very-long-name0\n",
     "parent.egress.interface", "longer than 15", "interface:"),
    ("name: a\ninterface: wg3\nparent:\n  egress:\n    interface: wg3\n",
     "parent.egress.interface", "is the tunnel interface (interface: wg3)", "    interface:"),
    ("name: a\nparent:\n  egress:\n    interface: wg0\n", "parent.egress.interface",
     "is the tunnel interface", "interface:"),
    ("name: a\nparent:\n  egress:\n    allow:\n      - 10.0.0.0/8\n      - 10.0.0.0/8:99999\n",
     "parent.egress.allow[1]", "out of range", "99999"),
    ("name: a\nparent:\n  egress:\n    deny: [10.0.0.1/8]\n", "parent.egress.deny[0]",
     "host bits set", "deny:"),
    ("name: a\nparent:\n  egress:\n    allow: [[2001:db8::/32]]\n", "parent.egress.allow[0]",
     "expected a string, got a list", "allow:"),
    ("name: a\nparent:\n  ingress:\n    - {listen: 0}\n", "parent.ingress[0].listen",
     "out of range", "listen"),
    ("name: a\nparent:\n  ingress:\n    - {listen: 80, to: 65536}\n", "parent.ingress[0].to",
     "out of range", "listen"),
    ("name: a\nparent:\n  ingress:\n    - {listen: 80, protocol: sctp}\n",
     "parent.ingress[0].protocol", "not one of tcp, udp", "sctp"),
    ("name: a\nparent:\n  ingress:\n    - {listen: 80}\n    - {listen: 81}\n    - listen: 80\n",
     "parent.ingress[2].listen", "already used by parent.ingress[0]", "- listen: 80"),
    ("name: a\nparent:\n  ingress:\n    - {to: 80}\n", "parent.ingress[0].listen", "missing",
     "to: 80"),
    ("name: a\nparent:\n  ingress:\n    - 8443:443\n", "parent.ingress[0]",
     "expected a mapping", "8443"),
    ("name: a\ntransport: {kind: tcp, host: 192.0.2.1}\nparent:\n  ingress:\n"
     "    - {listen: 821}\n", "parent.ingress[0].listen", "transport's own port", "821"),
    ("name: a\nparent:\n  enclave:\n    eif: /opt/app.img\n", "parent.enclave.eif",
     "does not end in .eif", "eif:"),
    ("name: a\nparent:\n  enclave:\n    eif: app.eif\n", "parent.enclave.eif",
     "not an absolute path", "eif:"),
    ("name: a\nparent:\n  enclave:\n    cpu_count: 2\n", "parent.enclave.eif", "missing",
     "enclave:"),
    ("name: a\nparent:\n  enclave:\n    eif: /a.eif\n    cid: 3\n", "parent.enclave.cid",
     "out of range", "cid:"),
    ("name: a\nparent:\n  enclave:\n    eif: /a.eif\n    memory_mib: 10\n",
     "parent.enclave.memory_mib", "out of range", "memory_mib:"),
    ("name: a\nenclave:\n  dns: [one.one.one.one]\n", "enclave.dns[0]", "not an IP address",
     "dns:"),
    ("name: a\nenclave:\n  dns: 9.9.9.9\n  routes: [10.0.0.0/8]\n", "enclave.dns",
     "not reachable", "dns:"),
    ("name: a\nenclave:\n  routes:\n    - 10.0.0.1/8\n", "enclave.routes[0]", "host bits",
     "10.0.0.1/8"),
    ("name: a\nenclave:\n  routes:\n    - '::/0'\n", "enclave.routes[0]", "no IPv6 address",
     "::/0"),
    ("name: a\nattestation:\n  require: 1\n", "attestation.require", "expected true or false",
     "require:"),
    ("name: a\nattestation:\n  max_age: 0\n", "attestation.max_age", "out of range",
     "max_age:"),
    ("name: a\nattestation:\n  pcrs: [1]\n", "attestation.pcrs", "expected a mapping",
     "pcrs:"),
    (f"name: a\nattestation:\n  pcrs:\n    32: {PCR}\n", "attestation.pcrs.32",
     "not a PCR index", "32:"),
    (f"name: a\nattestation:\n  pcrs:\n    -1: {PCR}\n", "attestation.pcrs.-1",
     "not a PCR index", "-1:"),
    ("name: a\nattestation:\n  pcrs:\n    0: abcd\n", "attestation.pcrs.0", "4 hex digits",
     "0: abcd"),
    (f"name: a\nattestation:\n  pcrs:\n    0: {'zz' * 48}\n", "attestation.pcrs.0",
     "not hexadecimal", "0: zz"),
    # Issue 12, item 5: a debug-mode enclave is refused unless allow_debug says otherwise.
    (f"name: a\nparent:\n  enclave: {{eif: /a.eif, debug: true}}\nattestation:\n"
     f"  pcrs:\n    0: {PCR}\n", "parent.enclave.debug", "debug-mode enclave", "eif:"),
    # Issue 12, item 5: require without the image's PCR would take any genuine enclave.
    ("name: a\nattestation:\n  require: true\n", "attestation.pcrs",
     "PCR0 (the image) is not pinned", "attestation:"),
    (f"name: a\nattestation:\n  require: true\n  pcrs:\n    1: {PCR}\n", "attestation.pcrs",
     "PCR0 (the image) is not pinned", "pcrs:"),
    # Issue 12, item 10: a stream frame cannot carry more.
    ("name: a\nmtu: 65504\n", "mtu", "65504 is out of range for the vsock stream transport: "
     "a frame holds 65535 bytes and WireGuard adds 32", "mtu:"),
    ("name: a\nparent:\n  public_key: abc\n", "parent.public_key",
     "not a WireGuard public key", "public_key:"),
    ("name: a\nattestation:\n  test_root_ca: root.pem\n", "attestation.test_root_ca",
     "not an absolute path", "test_root_ca:"),
    # A '%' scope id parses in Python but would reach nft and ip(8) as written.
    ("name: a\nparent:\n  egress:\n    allow: ['fd00:ec2::%x/32']\n",
     "parent.egress.allow[0]", "has an IPv6 scope id ('%x')", "allow:"),
    ("name: a\nparent:\n  egress:\n    deny: ['[fd00::%eth0 x;/8]:443/tcp']\n",
     "parent.egress.deny[0]", "scope id", "deny:"),
    ("name: a\nparent:\n  address: ['fd77::1%wg0/126']\n", "parent.address[0]",
     "scope id", "address:"),
    ("name: a\nenclave:\n  routes: ['::%x/0']\n", "enclave.routes[0]", "scope id", "routes:"),
    ("name: a\nenclave:\n  dns: ['fd00:ec2::253%eth0']\n", "enclave.dns[0]", "scope id",
     "dns:"),
    ("name: a\nmtu: 1400\nmtu: 1300\n", "mtu", "given twice (first on line 2)", "1300"),
    ("name: a\nmtu:\nmtu: 1300\n", "mtu", "given twice (first on line 2)", "1300"),
    ("name: a\nmtu: !!float 1400\n", "mtu", "expected an integer, got a number", "mtu:"),
    # Digits other than ASCII's: superscript two passes str.isdigit() but not int(), others
    # (Arabic-Indic, fullwidth) int() reads, so they were a traceback or quietly a number.
    (f"name: a\nattestation:\n  pcrs:\n    '²': {PCR}\n", "attestation.pcrs.²",
     "not a PCR index", "²"),
    (f"name: a\nattestation:\n  pcrs:\n    '\u0660': {PCR}\n", "attestation.pcrs.\u0660",
     "not a PCR index", "\u0660"),
    ("name: a\nparent:\n  egress:\n    allow: ['10.0.0.0/8:\u0664\u0664\u0663']\n",
     "parent.egress.allow[0]", "bad port", "allow:"),
    ("name: a\nparent:\n  egress:\n    allow: ['10.0.0.0/8:²']\n", "parent.egress.allow[0]",
     "bad port", "allow:"),
    ("name: a\nparent:\n  egress:\n    allow: ['api.example.com:\uff14\uff14\uff13/tcp']\n",
     "parent.egress.allow[0]", "bad port", "allow:"),
    ("name: a\nparent:\n  metrics: {listen: '127.0.0.1:\uff19\uff15\uff18\uff16'}\n",
     "parent.metrics.listen", "is not ADDRESS:PORT", "listen"),
    # YAML 1.1 (PyYAML) reads a leading 0 as octal and digits between colons as base 60,
    # YAML 1.2 (other tools) as decimal and a string: neither may be what was meant.
    ("name: a\nmtu: 01400\n", "mtu", "'01400' has a leading zero, which is not allowed "
     "(YAML would read it as octal: 768)", "mtu:"),
    ("name: a\nparent:\n  ingress:\n    - {listen: 10:43}\n", "parent.ingress[0].listen",
     "'10:43' is 643 to YAML (numbers between colons are base 60)", "listen"),
    ("name: a\ntransport:\n  port: 0777\n", "transport.port", "has a leading zero",
     " port:"),
    # Control and other unprintable characters in a path reach error messages, logs and the
    # file system (a line break in a directory `parent up` would make) as they are.
    ('name: a\nparent:\n  private_key: "/etc/wgvsock/a\\nb.key"\n', "parent.private_key",
     "contains an unprintable character ('\\n')", "private_key:"),
    ('name: a\nparent:\n  private_key: "ssm:/a\\x1b[2Jb"\n', "parent.private_key",
     "unprintable character ('\\x1b')", "private_key:"),
    ('name: a\nparent:\n  private_key: "/etc/a\\0b"\n', "parent.private_key",
     "unprintable character ('\\x00')", "private_key:"),
    ('name: a\ntransport:\n  kind: unix\n  path: "/run/a\\tb"\n', "transport.path",
     "unprintable character ('\\t')", "path:"),
    ('name: a\nparent:\n  enclave:\n    eif: "/opt/a\\u202e.eif"\n', "parent.enclave.eif",
     "unprintable character ('\\u202e')", "eif:"),
    ('name: a\nattestation:\n  test_root_ca: "/a\\rb.pem"\n', "attestation.test_root_ca",
     "unprintable character ('\\r')", "test_root_ca:"),
    # A value its explicit tag cannot read: PyYAML's constructors fail each their own way,
    # and !!bool's KeyError and !!timestamp's AttributeError were tracebacks.
    ("name: a\nmtu: !!bool x\n", "mtu", "cannot read 'x' as !!bool", "mtu:"),
    ("name: a\nattestation:\n  require: !!timestamp x\n", "attestation.require",
     "cannot read 'x' as !!timestamp", "require:"),
    ("name: a\nmtu: !!int 0x\n", "mtu", "cannot read '0x' as !!int", "mtu:"),
    # On a string, such a tag was dropped unread.
    ("name: !!int abc\n", "name", "cannot read 'abc' as !!int", "name:"),
    ("name: a\nparent:\n  private_key: !!python/name:os.system /etc/a.key\n",
     "parent.private_key", "cannot read '/etc/a.key' as !!python/name:os.system",
     "private_key:"),
    ("name: a\ntransport:\n  kind: !foo tcp\n", "transport.kind", "cannot read 'tcp' as !foo",
     "kind:"),
]


@pytest.mark.parametrize(("text", "key", "reason", "needle"), BAD,
                         ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_profile_is_refused(text, key, reason, needle):
    refused(text, key, reason, needle)


@pytest.mark.parametrize(("value", "reason", "hint"), [
    # "'00' is 0 to YAML (a leading 0 makes it octal)": true of YAML 1.1, odd to read.
    ("00", "'00' has a leading zero, which is not allowed",
     "write a number in 576..65503 without leading zeros"),
    ("01420", "'01420' has a leading zero, which is not allowed (YAML would read it as "
     "octal: 784)", "write 1420, not 01420"),
])
def test_a_number_with_a_leading_zero_is_refused_as_such(value, reason, hint):
    p = refused(f"name: a\nmtu: {value}\n", "mtu", reason, "mtu:")
    assert (p.reason, p.hint) == (reason, hint)


def test_an_mtu_of_more_digits_than_int_reads_is_refused():
    # The stream transport's hint read it with int() too, which raised ValueError.
    found = problems(f"name: a\nmtu: {'9' * 5000}\n")
    assert [(p.key, p.line) for p in found] == [("mtu", 2)]


def test_a_pcr_index_of_more_digits_than_int_reads_is_refused():
    # int() refuses more than 4300 digits (sys.get_int_max_str_digits): a ValueError that
    # was a traceback rather than a problem with the file.
    # (An explicit key: YAML allows no simple key over 1024 characters.)
    found = problems(f"name: a\nattestation:\n  pcrs:\n    ? {'1' * 5000}\n    : {PCR}\n")
    assert [(p.line, p.reason.endswith("is not a PCR index")) for p in found] == [(4, True)]


NOT_TUNNEL_ENDS = [
    # (address, what the reason says, the example the hint gives for the parent's side)
    ("fe80::1/126", "link-local (fe80::/10): from such an address the enclave could send the "
     "parent router advertisements", "fd77::1/126"),
    ("febf::1/126", "link-local (fe80::/10)", "fd77::1/126"),
    ("169.254.0.1/30", "link-local (169.254.0.0/16), where EC2's metadata service", "10.77.0.1/30"),
    ("ff02::1/126", "multicast (ff00::/8)", "fd77::1/126"),
    ("224.0.0.1/30", "multicast (224.0.0.0/4)", "10.77.0.1/30"),
    ("::1/126", "loopback (::1)", "fd77::1/126"),
    ("127.0.0.2/30", "loopback (127.0.0.0/8)", "10.77.0.1/30"),
    ("::/126", "the unspecified address", "fd77::1/126"),
    ("0.0.0.0/31", "the unspecified address", "10.77.0.1/30"),
    ("::ffff:10.0.0.1/126", "IPv4-mapped (::ffff:0:0/96)", "fd77::1/126"),
]


@pytest.mark.parametrize(("address", "reason", "example"), NOT_TUNNEL_ENDS,
                         ids=[a for a, _, _ in NOT_TUNNEL_ENDS])
def test_tunnel_ends_are_ordinary_unicast_addresses(address, reason, example):
    """The enclave's address is its allowed IP on the parent and the one source the parent's
    table accepts from it: a link-local one would let it send router advertisements."""
    text = f"name: a\nparent:\n  address: ['{address}']\n"
    p = refused(text, "parent.address[0]", reason, "address:")
    assert p.reason.startswith(f"{iface(address)} is ")
    assert p.hint == f"use {'a private' if ':' not in example else 'a unique local (fd00::/8)'} " \
        f"address, e.g. {example}"


def test_an_enclave_end_that_is_no_unicast_address_is_refused():
    text = y("""
        name: a
        parent:
          address: [10.77.0.1/30, "fd77::1/126"]
          egress: {allow: ["0.0.0.0/0", "::/0"]}
        enclave:
          address: [10.77.0.2/30, "fe80::2/126"]
    """)
    # What a reviewer's profile did: the parent's end is fine, the enclave's is link-local.
    p = refused(text, "enclave.address[1]", "link-local (fe80::/10)", "fe80::2")
    assert p.hint == "use an address in parent.address's subnet fd77::/126, e.g. fd77::2/126"
    # Both ends link-local: each is named, and the parent's hint moves the enclave too.
    text = 'name: a\nparent: {address: "fe80::1/126"}\nenclave: {address: "fe80::2/126"}\n'
    found = problems(text)
    assert [(x.key, x.line) for x in found] == [("parent.address", 2), ("enclave.address", 3)]
    assert found[0].hint.endswith("e.g. fd77::1/126 (and move enclave.address with it)")
    assert found[1].hint == "use a unique local (fd00::/8) address, e.g. fd77::2/126"
    # The limited broadcast address, as the other end of a /31.
    refused("name: a\nparent: {address: 255.255.255.254/31}\n"
            "enclave: {address: 255.255.255.255/31}\n", "enclave.address",
            "the limited broadcast address", "enclave:")


@pytest.mark.parametrize(("text", "key", "taken"), [
    # fec0::/10 is no link-local prefix, but the first host of fec0::1/9's subnet is fe80::1.
    ("name: a\nparent: {address: 'fec0::1/9'}\n", "parent.address", "the enclave takes fe80::1/9"),
    ("name: a\nenclave: {address: 169.255.0.1/15}\n", "enclave.address",
     "the parent takes 169.254.0.1/15"),
])
def test_a_derived_tunnel_end_is_checked_too(text, key, taken):
    p = refused(text, key, taken, key.split(".")[0])
    assert "link-local" in p.reason
    assert p.hint.startswith(f"give {'enclave' if key == 'parent.address' else 'parent'}.address")


def test_unicast_tunnel_ends_that_look_unusual_are_fine():
    # Site-local (deprecated, but unicast), global and the first /8: none of them is special
    # to the kernel's router discovery.
    for parent, enclave in (("fec0::1/126", "fec0::2/126"), ("2001:db8::1/126", "2001:db8::2/126"),
                            ("0.0.0.1/30", "0.0.0.2/30"), ("169.253.255.253/30", None)):
        text = f"name: a\nparent: {{address: '{parent}'}}\n"
        if enclave:
            text += f"enclave: {{address: '{enclave}'}}\n"
        assert parse_profile(text).parent.addresses == [iface(parent)]


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("name: a\nparent:\n  address: [10.0.0.1/30\n", 4, "not valid YAML"),
    ("name: a\nparent:\n\taddress: x\n", 3, "not valid YAML"),
    ("name: a\nallow:\n  - [2001:db8::/32]:443/tcp\n", 3, "not valid YAML"),
    ("name: a\n---\nname: b\n", 2, "not valid YAML"),
])
def test_malformed_yaml(text, line, reason):
    [p] = problems(text)
    assert (p.file, p.line) == (FILE, line)
    assert reason in p.reason and p.hint


@pytest.mark.parametrize(("text", "line"), [
    ("[Interface]\nPrivateKey = aGVsbG8=\nAddress = 10.0.0.1/24\n\n[Peer]\n", 1),
    ("# wg0 on the parent\n\n[Interface]\nListenPort = 51820\n", 3),
    ("[Peer]\n", 1),
])
def test_a_wireguard_configuration_is_named_as_one(text, line):
    """`--profile /etc/wireguard/wg0.conf` was "not valid YAML: expected '<document start>',
    but found '<scalar>' — quote values that start with '[' ...": advice for a YAML file, on
    a file that is none."""
    [p] = problems(text)
    assert (p.file, p.line) == (FILE, line)
    assert p.reason == ("this is a WireGuard configuration (wg-quick's [Interface] and [Peer]), "
                        "not a wgvsock profile")
    assert p.hint.startswith("write a profile in YAML, starting from parent/profile.example")


def test_unquoted_ipv6_hint():
    [p] = problems("name: a\nenclave:\n  routes: [::/0]\n")
    assert p.line == 3 and '"::/0"' in p.hint


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("- name: a\n", "expected a mapping, got a list"),
    ("just text\n", "expected a mapping, got a string"),
])
def test_not_a_profile(text, reason):
    [p] = problems(text)
    assert p.file == FILE and p.line == 1 and reason in p.reason


def test_all_problems_are_reported_at_once():
    text = y("""
        name: Bad
        mtu: 10
        transport:
          kind: vsock
          port: 0
        parent:
          adress: 10.0.0.1/30
          ingress:
            - {listen: 70000}
        attestation:
          pcrs: {99: ab}
    """)
    found = problems(text)
    assert [(p.line, p.key) for p in found] == [
        (line_with(text, "name:"), "name"),
        (line_with(text, "mtu:"), "mtu"),
        (line_with(text, " port:"), "transport.port"),
        (line_with(text, "adress:"), "parent.adress"),
        (line_with(text, "listen"), "parent.ingress[0].listen"),
        (line_with(text, "99"), "attestation.pcrs.99"),
    ]


def test_problem_format():
    p = Problem("f.yaml", 7, "parent.egress.allow[2]", "bad", "fix it")
    assert str(p) == "f.yaml:7: parent.egress.allow[2]: bad — fix it"
    assert str(Problem("f.yaml", 0, "", "no such file", "check")) == "f.yaml: no such file — check"


# ---------------------------------------------------------------------------------------------
# Reading files


def test_load_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no such file") as info:
        load_profile(tmp_path / "nope.yaml")
    assert info.value.problems[0].file == str(tmp_path / "nope.yaml")


def test_a_profile_over_64_kib_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """Review finding: a 1 MiB profile of flow collections or thousands of keys took 3-15 s
    to parse (PyYAML's pure-Python composer) before it was refused for what it held."""
    import wgvsock.services.profile as profile_module

    parsed: list[str] = []
    real = profile_module.parse_profile
    monkeypatch.setattr(profile_module, "parse_profile",
                        lambda text, path="<string>": parsed.append(path) or real(text, path))
    path = tmp_path / "big.yaml"
    # What took longest: a flow list nested 31 deep (15 s at 1 MiB here).
    path.write_text("[" * 31 + "a," * (100 << 10) + "a" + "]" * 31)
    size = path.stat().st_size
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert parsed == []
    text = str(info.value)
    assert text.startswith(f"{path}: {size} bytes, larger than the 64 KiB a profile may be"), \
        text
    assert "is this the right file?" in text and "under 64 KiB" in text, text
    # A profile with every option commented, at the limit, is read.
    example = Path(__file__).resolve().parents[1] / "parent" / "profile.example.yaml"
    body = example.read_text()
    path.write_text(body + "#" * (64 * 1024 - len(body.encode()) - 1) + "\n")
    assert path.stat().st_size == 64 * 1024
    load_profile(path)
    assert parsed == [str(path)]


def test_flow_nesting_is_capped_at_twice_what_a_profile_needs(tmp_path):
    """A crafted profile's parse cost grows with its flow nesting (64 KiB of "[[[a]]]," inside
    28 levels took 2.5 s at the old cap of 32). A profile goes 4 deep at most, written wholly as
    JSON: that parses, 8 levels pass the scanner, and the ninth is refused naming the file,
    the line and the cap."""
    import json

    deepest = {"version": 1, "name": "a", "parent": {
        "address": "10.77.0.1/30",
        "egress": {"allow": ["0.0.0.0/0"], "deny": ["10.0.0.0/8"]},
        "ingress": [{"listen": 8443, "to": 8080, "protocol": "tcp"}],
        "metrics": {"cloudwatch": {"namespace": "ns", "interval": 60}}}}
    path = tmp_path / "p.json.yaml"
    path.write_text(json.dumps(deepest) + "\n")
    p = load_profile(path)
    assert p.parent.metrics.cloudwatch.namespace == "ns" and p.parent.ingress[0].to == 8080

    with pytest.raises(ProfileError) as info:
        parse_profile("name: a\nparent:\n  egress:\n    allow: " + "[" * 8 + "]" * 8 + "\n",
                      FILE)
    assert "nested more than" not in str(info.value), info.value  # refused for what it holds
    path.write_text("name: a\nparent:\n  egress:\n    allow: " + "[" * 9 + "]" * 9 + "\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value) == (
        f"{path}:4: [...] or {{...}} nested more than 8 deep, where a profile goes 4 deep at "
        "most — write the settings as indented `key: value` lines; is this the right file?")


def test_load_directory(tmp_path):
    with pytest.raises(ProfileError, match="is a directory"):
        load_profile(tmp_path)


def test_load_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text("name: a\n")
    real_open = os.open

    def deny(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    # Root reads any file, so chmod 000 proves nothing in CI: fake the refusal instead.
    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ProfileError, match="permission denied"):
        load_profile(path)


@pytest.mark.timeout(20)
def test_a_profile_that_is_no_regular_file_is_refused_at_once(tmp_path, capsys):
    """A FIFO blocked `profile check` (and `parent up`) in open() until someone wrote to it;
    /dev/null read as an empty profile."""
    fifo = tmp_path / "p.fifo"
    os.mkfifo(fifo)
    for path, what in ((fifo, "a FIFO (named pipe)"), (Path("/dev/null"), "a character device"),
                       (tmp_path, "a directory")):
        assert main_check([str(path)]) == 1
        assert capsys.readouterr().err == (
            f"{path}: is {what}, not a regular file — a profile must be a regular file: give "
            "the path of its YAML\n")


@pytest.mark.timeout(20)
def test_a_fifo_swapped_in_after_the_stat_is_refused_without_blocking(tmp_path, monkeypatch):
    """What was opened is judged again (fstat), and opened O_NONBLOCK so that the open itself
    does not wait for a writer."""
    fifo, plain = tmp_path / "p.fifo", tmp_path / "p.yaml"
    os.mkfifo(fifo)
    plain.write_text("name: a\n")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(plain if str(p) == str(fifo)
                                                               else p, *a, **k))
    with pytest.raises(ProfileError, match="is a FIFO"):
        load_profile(fifo)


def test_load_not_utf8(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"name: a\n# caf\xe9\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert info.value.problems[0].line == 2
    assert "UTF-8" in info.value.problems[0].reason


def test_load_reports_the_path(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: a\nmtu: 1\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}:2: mtu: ")


# ---------------------------------------------------------------------------------------------
# Host checks


def test_check_host_overlap():
    text = "name: a\nparent:\n  address: 10.77.0.1/30\n"
    p = parse_profile(text, FILE)
    found = check_host(p, [net("192.168.0.0/16"), net("10.0.0.0/8"), net("fd00::/64")])
    assert len(found) == 1
    [problem] = found
    assert (problem.file, problem.line, problem.key) == (FILE, 3, "parent.address")
    assert "overlaps 10.0.0.0/8" in problem.reason
    assert "e.g. 172.30.0.0/30" in problem.hint  # the first free subnet outside 10/8


def test_check_host_clean_and_ipv6():
    p = parse_profile('name: a\nparent: {address: [10.77.0.1/30, "fd77::1/126"]}\n', FILE)
    assert check_host(p, [net("192.0.2.0/24"), net("fd00::/64")]) == []
    found = check_host(p, [net("fd77::/16")])
    assert [x.key for x in found] == ["parent.address[1]"]
    assert found[0].line == 2


def test_check_host_counts_routes_as_taken_too():
    # A route through the host's gateway (VPC peering, VPN) with no address of the host in
    # it: the tunnel's route and it would take each other's traffic. It was not looked at.
    p = parse_profile("name: a\nparent:\n  address: 10.77.0.1/30\n", FILE)
    found = check_host(p, [net("192.0.2.0/24")],
                       [net("0.0.0.0/0"), net("192.0.2.0/24"), net("10.77.0.0/16")])
    [problem] = found
    assert (problem.line, problem.key) == (3, "parent.address")
    assert problem.reason == ("tunnel subnet 10.77.0.0/30 overlaps 10.77.0.0/16, where a "
                              "route of this host goes")
    assert "e.g. 10.99.0.0/30" in problem.hint  # outside the route as well
    # The default route overlaps every subnet and is no clash; a route that is one of the
    # host's networks is said once, as the network.
    assert check_host(p, [net("192.0.2.0/24")], [net("0.0.0.0/0"), net("::/0")]) == []
    [problem] = check_host(p, [net("10.77.0.0/24")], [net("10.77.0.0/24")])
    assert problem.reason.endswith("a network of this host")


def test_check_routes_explains_a_missing_ipv6_default_route():
    text = 'name: a\nparent: {address: [10.77.0.1/30, "fd77::1/126"]}\n'
    p = parse_profile(text, FILE)  # routes default to 0.0.0.0/0 and ::/0
    assert check_routes(p, [net("0.0.0.0/0"), net("::/0")]) == []
    [problem] = check_routes(p, [net("0.0.0.0/0"), net("fd00::/64")])
    assert str(problem) == (
        f"{FILE}:1: enclave.routes: ::/0 sends the enclave's IPv6 traffic to the parent, but "
        "this host has no IPv6 default route — give the instance IPv6 (an IPv6 CIDR on its "
        "subnet and an IPv6 address on its network interface; the route then comes by router "
        "advertisement), or leave ::/0 out of enclave.routes")


def test_check_routes_specific_prefixes_and_the_tunnel():
    text = ('name: a\nparent: {address: [10.77.0.1/30, "fd77::1/126"]}\nenclave:\n'
            '  dns: [10.0.0.2]\n  routes: [10.0.0.0/8, "2001:db8::/32", "fd77::/126"]\n')
    p = parse_profile(text, FILE)
    assert check_routes(p, [net("10.0.0.0/8"), net("2001::/16")]) == []
    [problem] = check_routes(p, [net("10.0.0.0/9"), net("::/0")])
    assert problem.line == 5 and problem.key == "enclave.routes"
    assert "no route to 10.0.0.0/8" in problem.reason


def _rule(priority: int, table: int, src: str | None = None, dst: str | None = None, *,
          version: int = 4, some: bool = False, suppress: int | None = None) -> IPRule:
    return IPRule(version, priority, net(src) if src else None, net(dst) if dst else None,
                  table, None, some, suppress, f"{priority}: rule")


def _main(version: int = 4) -> list[IPRule]:
    return [_rule(32766, 254, version=version), _rule(32767, 253, version=version)]


def test_check_host_judges_policy_routing_by_what_reaches_the_main_table_first():
    """The kernel looks up the tables in the rules' order and takes the first route found:
    a rule ahead of main sends the tunnel's traffic away only where its table has a route for
    the subnet that no throw route passes on, and a rule that has main looked up earlier for
    the whole subnet (wg-quick's suppress_prefixlength 0, a `to SUBNET lookup main`) keeps
    it. Each family by its own rules; the rules after main (the default table's) never."""
    p = parse_profile('name: a\nparent: {address: [10.77.0.1/30, "fd77::1/126"]}\n', FILE)
    default4, default6 = net("0.0.0.0/0"), net("::/0")
    everything = {7: [(default4, "via 192.0.2.1 dev eth1"), (default6, "dev eth1")]}
    wg_quick = HostRoutes(rules=[_rule(32764, 254, suppress=0), _rule(32765, 7, some=True),
                                 _rule(32764, 254, version=6, suppress=0),
                                 _rule(32765, 7, version=6, some=True), *_main(), *_main(6)],
                          tables=everything)
    assert check_host(p, [], wg_quick) == [] and check_host_warnings(p, wg_quick) == []
    # Without the suppress rule, the mark rule takes some of it: both families warned of.
    marked = HostRoutes(rules=[_rule(32765, 7, some=True), _rule(32765, 7, version=6,
                                                                   some=True), *_main()],
                        tables=everything)
    assert check_host(p, [], marked) == []
    assert [w.key for w in check_host_warnings(p, marked)] == ["parent.address[0]",
                                                               "parent.address[1]"]
    # A rule for all traffic to the subnet is refused; one for other sources is none of its
    # business, nor is a table without a route for the subnet, or one that throws it back.
    for table, refused in (([(net("10.0.0.0/8"), "dev eth1")], True),
                           ([(net("192.0.2.0/24"), "dev eth1")], False),
                           ([(default4, "dev eth1"), (net("10.77.0.0/16"), "throw")], False),
                           ([(default4, "dev eth1"), (net("10.77.0.0/29"), "throw"),
                             (net("10.77.0.2/32"), "blackhole")], True)):
        host = HostRoutes(rules=[_rule(100, 7), _rule(101, 8, src="10.1.0.0/16"), *_main()],
                          tables={7: table, 8: [(default4, "dev eth1")]})
        assert bool(check_host(p, [], host)) is refused, table
        assert check_host_warnings(p, host) == []
    # Rescued by a rule that looks main up first for the whole subnet, not half of it.
    for rescue, refused in ((_rule(99, 254, dst="10.77.0.0/30"), False),
                            (_rule(99, 254, dst="10.77.0.0/31"), True),
                            (_rule(101, 254, dst="10.77.0.0/30"), True)):
        host = HostRoutes(rules=[rescue, _rule(100, 7), *_main()], tables=everything)
        assert bool(check_host(p, [], host)) is refused, rescue
    # A plain list of routes (as tests and older callers give) has no rules to judge.
    assert check_host_warnings(p, [net("0.0.0.0/0")]) == []



def test_check_host_a_rule_with_a_mark_for_other_ends_takes_none_of_the_tunnel():
    """A mark, protocol or interface narrows a rule further; only `not` widens it past its
    source and destination: `not from 10.1.0.9 fwmark 0x1` takes all but the marked packets
    from 10.1.0.9, the parent's own connections (looked up from 0.0.0.0) among them."""
    p = parse_profile("name: a\nparent:\n  address: 10.77.0.1/30\n", FILE)
    tables = {7: [(net("0.0.0.0/0"), "dev eth1")]}
    for rule, refused, warned in (
            (_rule(100, 7, src="10.1.0.9/32", some=True), 0, 0),
            (_rule(100, 7, dst="192.0.2.9/32", some=True), 0, 0),
            (IPRule(4, 100, net("10.1.0.9/32"), None, 7, None, True, None,
                    "100: not from 10.1.0.9 fwmark 0x1 lookup 7", True), 1, 0),
            (IPRule(4, 100, net("0.0.0.0/1"), None, 7, None, True, None,
                    "100: not from 0.0.0.0/1 lookup 7", True), 0, 1),
            (IPRule(4, 100, None, net("10.77.0.0/16"), 7, None, True, None,
                    "100: not from all to 10.77.0.0/16 lookup 7", True), 0, 0)):
        host = HostRoutes(rules=[rule, *_main()], tables=tables)
        assert len(check_host(p, [], host)) == refused, rule
        assert len(check_host_warnings(p, host)) == warned, rule


def test_check_host_a_rule_after_one_with_main_for_the_same_packets_takes_none():
    """Tailscale's marked packets look up main (5210) before its unreachable rule (5250)."""
    p = parse_profile("name: a\nparent:\n  address: 10.77.0.1/30\n", FILE)
    mark = frozenset({"FRA_FWMARK=524288", "FRA_FWMASK=16711680"})

    def rule(priority: int, table: int, drop: str | None = None, match=mark,
             src: str | None = None) -> IPRule:
        return IPRule(4, priority, net(src) if src else None, None, table, drop, True, None,
                      f"{priority}: rule", False, match)

    drop = rule(5250, 0, "unreachable")
    for before, warned in (([rule(5210, 254)], 0), ([rule(5210, 254, src="10.77.0.0/29")], 1),
                           ([rule(5210, 254, match=frozenset({"FRA_FWMARK=1"}))], 1),
                           ([], 1), ([rule(5260, 254)], 1)):
        host = HostRoutes(rules=[*before, drop, *_main()])
        assert check_host(p, [], host) == []
        assert len(check_host_warnings(p, host)) == warned, before

def test_check_host_drop_routes_inside_are_refused_around_are_warned_of():
    p = parse_profile("name: a\nparent:\n  address: 10.77.0.1/30\n", FILE)
    for dropping, refused, warned in (({net("10.77.0.0/30"): "prohibit"}, 1, 0),
                                      ({net("10.0.0.0/8"): "unreachable"}, 0, 1),
                                      ({net("0.0.0.0/0"): "unreachable"}, 0, 0),
                                      ({net("10.78.0.0/16"): "blackhole"}, 0, 0),
                                      ({net("fd77::/16"): "blackhole"}, 0, 0)):
        host = HostRoutes(dropping=dropping, rules=_main())
        assert (len(check_host(p, [], host)), len(check_host_warnings(p, host))) == (
            refused, warned), dropping


def test_check_host_with_defaulted_address_points_at_the_file():
    p = parse_profile("name: a\n", FILE)
    [problem] = check_host(p, [net("10.77.0.0/24")])
    assert problem.line == 1 and problem.key == "parent.address"
    assert "10.77.1.0/30" in problem.hint


def test_local_networks_reads_this_namespace():
    nets = local_networks()
    assert all(isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) for n in nets)
    assert not any(n.version == 4 and n.subnet_of(net("127.0.0.0/8")) for n in nets)
    assert net("::1/128") not in nets


# ---------------------------------------------------------------------------------------------
# The command


def test_main_check_prints_the_resolved_profile(capsys):
    assert main_check([str(EXAMPLES[0])]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert parse_profile(out, str(EXAMPLES[0])) == load_profile(EXAMPLES[0])


def test_main_check_bad_profile(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\nmtu: 1\nfoo: 2\n")
    assert main_check([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:2: mtu: 1 is out of range — use 576..65503",
        f"{path}:3: foo: unknown key 'foo' — known keys here: version, name, interface, mtu, "
        "transport, parent, enclave, attestation (a key added by a later wgvsock needs that "
        "wgvsock)",
    ]


def test_main_check_missing_file(tmp_path, capsys):
    assert main_check([str(tmp_path / "none.yaml")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_main_check_host(monkeypatch, capsys):
    import wgvsock.services.profile as profile_module

    seen = []

    def fake(exclude_interface=None):
        seen.append(exclude_interface)
        return [net("10.77.0.0/16")]

    monkeypatch.setattr(profile_module, "local_networks", fake)
    monkeypatch.setattr(profile_module, "local_routes",
                        lambda exclude_interface=None: [net("0.0.0.0/0")])
    assert main_check([str(EXAMPLES[0]), "--host"]) == 1
    assert seen == ["wg0"]  # the profile's own interface is not a clash
    assert "overlaps 10.77.0.0/16" in capsys.readouterr().err
    monkeypatch.setattr(profile_module, "local_networks", lambda exclude_interface=None: [])
    assert main_check([str(EXAMPLES[0]), "--host"]) == 0
    monkeypatch.setattr(profile_module, "local_routes", lambda exclude_interface=None: [])
    assert main_check([str(EXAMPLES[0]), "--host"]) == 1
    assert "no IPv4 default route" in capsys.readouterr().err


@pytest.mark.parametrize(("exc", "said"), [
    (OSError("netlink unavailable"), "netlink unavailable"),
    # Before, its str() raised again in the handler: a traceback, not the line.
    (Unsayable(), "Unsayable (its message cannot be shown: ValueError)"),
], ids=["message", "unsayable"])
def test_main_check_host_netlink_failure(monkeypatch, capsys, exc, said):
    import wgvsock.services.profile as profile_module

    def broken(exclude_interface=None):
        raise exc

    monkeypatch.setattr(profile_module, "local_networks", broken)
    assert main_check([str(EXAMPLES[0]), "--host"]) == 1
    assert capsys.readouterr().err.endswith(f": cannot list this host's networks: {said}\n")


def test_main_check_usage(capsys):
    assert main_check([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_profile_check(capsys):
    assert cli.main(["profile", "check", str(UNIX_PROFILE)]) == 0
    assert "kind: unix" in capsys.readouterr().out
    assert cli.main(["profile"]) == 2
    assert "profile check FILE" in capsys.readouterr().err


def test_profile_type_is_frozen():
    p = parse_profile("name: a\n")
    assert isinstance(p, Profile)
    with pytest.raises(AttributeError):
        p.name = "b"  # type: ignore[misc]


def test_a_problem_shows_the_files_words_on_one_line_escaped(tmp_path):
    # A profile may be someone else's file: a quoted value with a line break or a terminal
    # escape must not start a line of its own or reach the terminal raw.
    path = tmp_path / "p.yaml"
    path.write_text('name: "demo\\nOK profile accepted\\u001b[2J"\n')
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    text = str(e.value)
    assert "'demo\\nOK profile accepted\\x1b[2J' is not a valid name" in text
    assert text.isprintable()


def test_a_lift_keeps_the_naming_entry_s_ports_and_protocol():
    text = ("name: a\nparent: {egress: {allow: [0.0.0.0/0, '169.254.169.0/24:123/udp', "
            "169.254.170.2/32:80/tcp]}}\n")
    egress = parse_profile(text).parent.egress
    assert [str(r) for r in egress.lifted] == ["169.254.169.254/32:123/udp",
                                               "169.254.170.2/32:80/tcp"]
    assert "169.254.169.254/32" not in [str(r) for r in egress.deny]  # the table drops the rest


def test_an_allow_list_emptied_to_null_is_refused_not_taken_as_everything():
    # Every entry commented out leaves `allow:` null, which fell back to 0.0.0.0/0 (review).
    with pytest.raises(ProfileError, match=r"parent.egress.allow: is empty \(null\).*write \[\]"):
        parse_profile("name: a\nparent:\n  egress:\n    allow:\n    #  - 10.0.0.0/8:443/tcp\n")
    assert parse_profile("name: a\nparent: {egress: {allow: []}}\n").parent.egress.allow == []


def test_max_connections_defaults_and_round_trips():
    """parent.egress.max_connections caps the connections the enclave keeps open through
    the parent and to it (each is an entry in the host's conntrack table)."""
    p = parse_profile("name: a\n", FILE)
    assert p.parent.egress.max_connections is DEFAULT_MAX_CONNECTIONS is None  # no limit
    assert "max_connections" not in dump_profile(p)
    q = parse_profile("name: a\nparent:\n  egress:\n    max_connections: 3\n"
                      "    interface: eth9\n", FILE)
    assert q.parent.egress.max_connections == 3
    from wgvsock.roles.parent import Parent

    assert Parent(q).spec().max_connections == 3  # what `parent up` hands the firewall
    assert parse_profile(dump_profile(q), FILE).parent.egress.max_connections == 3
    # Empty means the default, as everywhere in a profile.
    empty = parse_profile("name: a\nparent:\n  egress:\n    max_connections:\n", FILE)
    assert empty.parent.egress.max_connections == DEFAULT_MAX_CONNECTIONS


@pytest.mark.parametrize(("value", "reason"), [
    ("0", "0 is out of range"),
    ("-1", "-1 is out of range"),
    ("16777217", "16777217 is out of range"),
    ("'100'", "expected an integer, got a string"),
    ("1.5", "expected an integer, got a number"),
    ("true", "expected an integer, got true/false"),
])
def test_bad_max_connections_is_refused(value, reason):
    p = refused(f"name: a\nparent:\n  egress:\n    max_connections: {value}\n",
                "parent.egress.max_connections", reason, "max_connections:")
    assert "1..16777216" in p.hint


# A private key of `wg genkey`'s, and the same 32 bytes as UAPI's hex.
_KEY_B64 = "YKdPpRgb+pWQFfkUa9KXSyvzKfHhS8nuzQJmzlniImI="
_KEY_HEX = "60a74fa5181bfa959015f9146bd2974b2bf329f1e14bc9eecd0266ce59e22262"


@pytest.mark.parametrize(("line", "reason"), [
    # The key itself where its file's path belongs: the message quoted it, and `parent up`
    # under systemd put it in the journal.
    (f"  private_key: {_KEY_B64}\n", "is not an absolute path"),
    (f"  private_key: {_KEY_HEX}\n", "is not an absolute path"),
    (f"  private_key: 'file:{_KEY_B64}'\n", "is not an absolute path"),
    (f'  private_key: "{_KEY_B64}\\t"\n', "is not an absolute path"),
    (f"  private_key: !!int {_KEY_B64}\n", "cannot read a value of 44 characters"),
    # One character off, in the public key's place.
    (f"  public_key: {_KEY_B64}x\n", "is not a WireGuard public key"),
    (f"  public_key: {_KEY_B64[:-1]}\n", "is not a WireGuard public key"),
])
def test_a_key_in_a_profile_is_never_quoted_by_its_refusal(line, reason):
    key = "public_key" if "public_key" in line else "private_key"
    p = refused(f"name: a\nparent:\n{line}", f"parent.{key}", reason, f"{key}:")
    # Not in whole nor in part (any 8 characters of it).
    for secret in (_KEY_B64, _KEY_HEX):
        assert not any(secret[i:i + 8] in str(p) for i in range(len(secret) - 8)), str(p)
    assert "characters" in p.reason
    if key == "private_key" and "!!int" not in line:
        assert "never the key itself" in p.hint and "make a new key" in p.hint


def test_a_path_or_name_that_is_no_key_is_still_quoted():
    p = refused("name: a\nparent:\n  private_key: keys/a.key\n", "parent.private_key",
                "'keys/a.key' is not an absolute path")
    assert "e.g. /etc/wgvsock/NAME.key" in p.hint
    refused("name: a\nparent:\n  public_key: abc\n", "parent.public_key",
            "'abc' is not a WireGuard public key")


# ---------------------------------------------------------------------------------------------
# Profiles `profile check` passed that `up` could not serve (review rev-profile)


def test_an_enclave_at_the_ipv6_subnet_router_anycast_address_is_refused():
    # With forwarding on (`parent up` turns it on), the parent's kernel makes the all-zero
    # host of each on-link IPv6 prefix its own anycast address: packets for an enclave at
    # fd77:: are delivered to the parent, never into the tunnel.
    text = y("""
        name: a
        parent: {address: "fd77::1/126"}
        enclave: {address: "fd77::/126"}
    """)
    p = refused(text, "enclave.address", "subnet-router anycast", 'enclave: {address')
    assert "fd77::2/126" in p.hint
    # /127 has no such address (RFC 6164; Linux adds none), and the parent may be it.
    parse_profile('name: a\nparent: {address: "fd77::1/127"}\nenclave: {address: "fd77::/127"}\n',
                  FILE)
    parse_profile('name: a\nparent: {address: "fd77::/126"}\n', FILE)


@pytest.mark.parametrize("address", ["169.0.0.1/8", "128.0.0.1/1", "160.0.0.1/4"])
def test_a_tunnel_subnet_over_the_instance_s_link_local_services_is_refused(address):
    # The tunnel's route would take the host's (and the enclave's) traffic for IMDS, the VPC
    # resolver and the time and credential endpoints.
    text = f"name: a\nparent:\n  address: {address}\n"
    p = refused(text, "parent.address", "169.254.0.0/16", "address:")
    assert "IMDS" in p.reason


def test_an_ipv6_tunnel_subnet_in_ec2_s_service_range_is_refused():
    text = y("""
        name: a
        parent: {address: "fd00:ec2::251/125"}
        enclave: {address: "fd00:ec2::252/125"}
    """)
    found = problems(text)
    assert [p.key for p in found] == ["parent.address"]
    assert "fd00:ec2::/32" in found[0].reason and "e.g. fd77::/126" in found[0].hint


@pytest.mark.parametrize(("resolver", "why"), [
    ("10.77.0.2", "in the tunnel subnet"),  # the enclave would answer the parent's queries
    ("10.77.0.1", "in the tunnel subnet"),  # the forwarder asking itself
    ("0.0.0.0", "unspecified"),
    ("224.0.0.251", "multicast"),
])
def test_a_resolver_the_forwarder_cannot_ask_is_refused(resolver, why):
    text = y(f"""
        name: a
        parent:
          egress:
            allow: [api.example.com]
            resolver: [192.0.2.53, {resolver}]
    """)
    refused(text, "parent.egress.resolver[1]", why, "resolver:")


def test_an_enclave_resolver_inside_the_tunnel_but_at_neither_end_is_refused():
    text = y("""
        name: a
        parent: {address: 10.77.0.1/24}
        enclave:
          dns: [10.77.0.53]
    """)
    refused(text, "enclave.dns[0]", "no host there", "dns:")
    # Either end may answer: the parent's forwarder, or a resolver the enclave runs itself.
    parse_profile("name: a\nparent: {address: 10.77.0.1/24}\nenclave: {dns: [10.77.0.2]}\n",
                  FILE)


def test_a_tcp_transport_host_inside_the_tunnel_is_refused():
    # The enclave reaches the parent over this address to bring the tunnel up.
    text = "name: a\ntransport: {kind: tcp, host: 10.77.0.1}\n"
    refused(text, "transport.host", "inside the tunnel subnet", "host:")
    refused("name: a\ntransport: {kind: tcp, host: 0.0.0.0}\n", "transport.host",
            "unspecified", "host:")


def test_metrics_on_an_ingress_port_is_refused():
    # Ingress DNATs the port on every address of the host but loopback: scrapes would reach
    # the enclave, which could answer them.
    text = y("""
        name: a
        parent:
          ingress: [{listen: 9586, to: 80}]
          metrics: {listen: "0.0.0.0:9586"}
    """)
    refused(text, "parent.metrics.listen", "parent.ingress[0]", "metrics:")
    parse_profile(text.replace("0.0.0.0:9586", "127.0.0.1:9586"), FILE)
    parse_profile(text.replace("{listen: 9586, to: 80}", "{listen: 9586, protocol: udp}"),
                  FILE)


def test_an_allow_entry_a_deny_entry_wholly_covers_is_warned_of():
    # Deny is checked first: the allow entry can never let anything through, so the profile
    # says two things and only one of them holds. Taken (deny wins, as the rule says), with a
    # warning naming both: `profile check` prints it, `parent up` and `reload` log it.
    text = y("""
        name: a
        parent:
          egress:
            allow: [198.51.100.0/24:443/tcp, 192.0.2.0/24]
            deny: [198.51.100.0/23]
    """)
    p = warned(text, "parent.egress.allow[0]", "never allowed", "allow:")
    assert "parent.egress.deny[0]" in p.reason and "198.51.100.0/23" in p.reason
    for deny in ("198.51.100.0/24:443", "198.51.100.0/24/tcp", "198.51.100.0/24:400-500/tcp"):
        warned(text.replace("198.51.100.0/23", deny), "parent.egress.allow[0]",
               "never allowed")
    # Partly covered is a carve-out, which is what deny is for.
    for deny in ("198.51.100.0/25", "198.51.100.0/24:80", "198.51.100.0/24/udp",
                 "198.51.100.0/24:444-500"):
        assert parse_profile(text.replace("198.51.100.0/23", deny), FILE).warnings == []
    assert parse_profile(text.replace("allow: [198.51.100.0/24:443/tcp, ", "allow: ["),
                         FILE).warnings == []


def test_an_allow_list_aliased_as_the_deny_list_is_warned_of():
    text = "name: a\nparent:\n  egress:\n    allow: &x [10.0.0.0/8, 10.1.0.0/16]\n    deny: *x\n"
    found = parse_profile(text, FILE).warnings
    assert [p.key for p in found] == ["parent.egress.allow[0]", "parent.egress.allow[1]"]


@pytest.mark.parametrize(("allow", "deny"), [
    ("api.example.com:443/tcp", "api.example.com"),
    ("api.example.com", '"*.example.com"'),
    ('"*.api.example.com"', '"*.example.com"'),
    ('"*.example.com"', '"*.example.com"'),
])
def test_an_allow_name_a_deny_name_wholly_covers_is_warned_of(allow, deny):
    text = y(f"""
        name: a
        parent:
          egress:
            allow: [other.example.org, {allow}]
            deny: [{deny}]
    """)
    warned(text, "parent.egress.allow[1]", "never allowed", "allow:")


def test_a_deny_name_below_an_allow_wildcard_is_a_carve_out():
    parse_profile('name: a\nparent: {egress: {allow: ["*.example.com"], deny: [a.example.com, '
                  '"*.b.example.com"]}}\n', FILE)
    parse_profile('name: a\nparent: {egress: {allow: [example.com], deny: ["*.example.com"]}}\n',
                  FILE)


@pytest.mark.parametrize("value", ["0820", "0999", "08"])
def test_a_leading_zero_that_is_not_octal_is_named_as_such(value):
    # YAML 1.1 reads 0820 as text (8 is no octal digit): the refusal said "got a string",
    # and "write a number without quotes" of a number written without quotes.
    p = refused(f"name: a\ntransport:\n  port: {value}\n", "transport.port", "leading zero",
                "  port:")
    assert p.hint == f"write {int(value)}, not {value}"
    # Quoted, it is a string, and that is what to say.
    p = refused(f'name: a\ntransport:\n  port: "{value}"\n', "transport.port", "got a string")
    assert "without quotes" in p.hint


def test_a_problem_with_an_aliased_value_points_at_the_alias():
    # An alias is the anchored node itself, with the anchor's line: the problem pointed there.
    text = y("""
        name: a
        transport:
          port: &p 820
          control_port: *p
    """)
    refused(text, "transport.control_port", "equals port", "control_port:")


@pytest.mark.parametrize(("value", "got"), [
    ("8.2e2", "a string"),  # not a float to YAML 1.1, which wants a sign in the exponent
    ("820.0", "a number"),
    (".inf", "a number"),
    ("yes", "true/false"),
])
def test_a_plain_value_that_is_no_integer_is_not_told_to_drop_quotes(value, got):
    p = refused(f"name: a\ntransport:\n  port: {value}\n", "transport.port", f"got {got}",
                "  port:")
    assert value in p.reason and "quotes" not in p.hint
    assert p.hint == "write a whole number in 1..4294967294"


@pytest.mark.parametrize(("dns", "why"), [
    ('"fe80::1"', "link-local"),  # resolv.conf cannot say which link, and the profile no scope
    ("0.0.0.0", "unspecified"),
    ("224.0.0.251", "multicast"),
])
def test_an_enclave_resolver_nothing_can_be_asked_at_is_refused(dns, why):
    text = (f'name: a\nparent: {{address: [10.77.0.1/30, "fd77::1/126"]}}\n'
            f'enclave:\n  dns: [{dns}]\n')
    refused(text, "enclave.dns[0]", why, "dns:")
    # The enclave's own loopback is a resolver it runs itself.
    parse_profile(text.replace(dns, "127.0.0.1"), FILE)


def test_a_deny_of_all_the_default_allow_lets_through_is_warned_of(tmp_path, capsys):
    # `deny: [0.0.0.0/0]` under the default allow: no IPv4 egress, as it says; a warning
    # says allow can say so, and `profile check` prints it and a dump that reads back.
    text = "name: a\nparent:\n  egress:\n    deny: [0.0.0.0/0]\n"
    p = warned(text, "parent.egress.deny[0]", "the default allow entry 0.0.0.0/0", "deny:")
    assert "allow: []" in p.hint
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main_check([str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {path}:4: parent.egress.deny[0]: " in err, err
    assert parse_profile(out, str(path)) == parse_profile(text, str(path))
    text = "name: a\nparent:\n  egress:\n    deny: [0.0.0.0/1, 10.0.0.0/8]\n"
    parsed = parse_profile(text, FILE)
    assert parse_profile(dump_profile(parsed), FILE) == parsed


@pytest.mark.parametrize("index", [0, 1, 2])
def test_an_all_zero_image_pcr_pin_is_refused(index):
    # All zeros is what a debug-mode enclave reports for PCR0-2, never a measurement: pinned,
    # it refused every enclave (a debug one is refused without allow_debug, and with it those
    # PCRs are not compared), or, without require, reported none as attested.
    text = f"name: a\nattestation:\n  require: true\n  pcrs:\n    0: {PCR}\n"
    text = text.replace(f"    0: {PCR}\n", f"    0: {PCR}\n    {index}: {'0' * 96}\n") \
        if index else text.replace(PCR, "0" * 96)
    refused(text, f"attestation.pcrs.{index}", "debug-mode", f"{index}: 000")
    # PCR8 is all zeros for an image that is not signed: a pin that says so is meaningful.
    parse_profile(f"name: a\nattestation:\n  pcrs:\n    0: {PCR}\n    8: {'0' * 96}\n", FILE)


def test_metrics_in_the_tunnel_on_an_address_the_parent_lacks_is_refused():
    # `up` made the tunnel, the table and the forwarding, then failed binding it.
    text = 'name: a\nparent:\n  metrics: {listen: "10.77.0.2:9586"}\n'
    refused(text, "parent.metrics.listen", "not the parent's", "metrics:")
    parse_profile(text.replace("10.77.0.2", "10.77.0.1"), FILE)


@pytest.mark.parametrize("port", [51820, 51821])
def test_metrics_on_the_tcp_stand_in_s_own_port_is_refused(port):
    # `up` took the port for the tunnel, then warned that "another process" held the
    # metrics port, and tried it again every 5 s for ever.
    text = ("name: a\ntransport: {kind: tcp, host: 192.0.2.1, port: 51820}\n"
            f'parent:\n  metrics: {{listen: "127.0.0.1:{port}"}}\n')
    refused(text, "parent.metrics.listen", "transport", "metrics:")
    parse_profile(text.replace("kind: tcp", "kind: unix"), FILE)


def test_a_file_of_many_mistakes_is_refused_in_a_screenful():
    # A large file that is not a profile (60000 unknown keys): every problem, one a line.
    text = "name: a\n" + "".join(f"k{i}: {i}\n" for i in range(5000))
    with pytest.raises(ProfileError) as info:
        parse_profile(text, FILE)
    assert len(info.value.problems) == 5000  # all of them are still there to read
    lines = str(info.value).splitlines()
    assert len(lines) <= 51
    assert lines[0].startswith(f"{FILE}:2: k0: unknown key")
    assert lines[-1] == (f"{FILE}: and 4950 more problems — is this the right file? Fix the "
                         "ones above first")


def test_main_check_shows_a_screenful_of_a_file_of_many_mistakes(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("name: a\n" + "".join(f"k{i}: {i}\n" for i in range(5000)))
    assert main_check([str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 51 and err[-1].startswith(f"{path}: and 4950 more problems")


@pytest.mark.parametrize(("parent", "enclave", "needle"), [
    ("8.8.8.1/24", None, "address: 8.8.8.1/24"),
    ("11.0.0.1/7", None, "address: 11.0.0.1/7"),  # 10.0.0.0/7: private at one end only
    (None, '"2600::2/126"', 'address: "2600::2/126"'),  # the parent's derived from it
])
def test_a_public_tunnel_subnet_is_warned_of(parent, enclave, needle):
    """Review finding: a globally routable tunnel subnet was taken silently, though its route
    on the parent takes that public range's traffic. A warning, not a refusal: the range may
    be the operator's own."""
    text = "name: a\n" + (f"parent:\n  address: {parent}\n" if parent else "") \
        + (f"enclave:\n  address: {enclave}\n" if enclave else "")
    key = "parent.address" if parent else "enclave.address"
    p = warned(text, key, "public (globally routable)", needle)
    net = str(parse_profile(text, FILE).parent.addresses[0].network)
    assert f"takes all traffic for {net}" in p.reason
    assert "e.g. 10.77.0.0/30" in p.hint or "e.g. fd77::/126" in p.hint


@pytest.mark.parametrize("address", [
    "10.77.0.1/30", "172.31.255.1/30", "192.168.7.1/24", "100.64.0.1/30", "198.51.100.1/30",
    '"fd77::1/126"', '"2001:db8::1/126"', "240.0.0.1/30"])
def test_a_private_tunnel_subnet_is_not_warned_of(address):
    assert parse_profile(f"name: a\nparent:\n  address: {address}\n", FILE).warnings == []


def test_profile_check_prints_the_public_subnet_warning(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("name: a\nparent:\n  address: 8.8.8.1/24\n")
    assert main_check([str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "8.8.8.0/24 is public" in err and "p.yaml:3" in err


@pytest.mark.parametrize("transport", [
    "{kind: unix, path: /run/wgvsock/a}", "{kind: tcp, host: 192.0.2.1}"])
def test_enclave_cid_on_a_stand_in_transport_is_warned_of(transport):
    """Review finding: parent.enclave_cid was silently ignored on the unix and tcp stand-ins
    (Parent._enclave_filter fences vsock peers only), so a profile seemed to pin the
    enclave's CID while the control port took any peer."""
    text = f"name: a\ntransport: {transport}\nparent:\n  enclave_cid: 16\n"
    p = warned(text, "parent.enclave_cid", "ignored with transport.kind", "enclave_cid:")
    assert ("transport.path" in p.reason) == ("unix" in transport)
    # Since 41344ce the CID fences the WireGuard port over vsock too: the warning said only
    # "the control port takes any peer".
    assert "control and WireGuard ports take any peer" in p.reason, p.reason
    assert parse_profile("name: a\nparent:\n  enclave_cid: 16\n", FILE).warnings == []


# ---------------------------------------------------------------------------------------------
# enclave.user: its syntax here; the name is looked up by `enclave up`, in the image


@pytest.mark.parametrize(("value", "user"), [
    ("app", EnclaveUser(name="app")),
    ("_svc-1.x", EnclaveUser(name="_svc-1.x")),
    ("host$", EnclaveUser(name="host$")),
    ("1000", EnclaveUser(uid=1000)),
    # Unquoted, base 60 to YAML 1.1 (61000): the text as written is what counts.
    ("1000:1000", EnclaveUser(uid=1000, gid=1000)),
    ('"1000:50"', EnclaveUser(uid=1000, gid=50)),
    ("4294967294:4294967294", EnclaveUser(uid=2**32 - 2, gid=2**32 - 2)),
    ("null", None),
])
def test_enclave_user_is_a_name_or_numbers(value, user):
    p = parse_profile(f"name: a\nenclave:\n  user: {value}\n", FILE)
    assert p.enclave.user == user
    # (A UID alone is told its group by `enclave up`, which reads the image's passwd, and
    # only without an entry there: test_a_uid_alone_without_a_passwd_entry_is_told_the_gid.)
    assert p.warnings == []
    assert parse_profile(dump_profile(p), FILE) == p


def test_enclave_user_is_unset_by_default():
    assert parse_profile("name: a\n").enclave.user is None
    assert "  user: null\n" in dump_profile(parse_profile("name: a\n"))


@pytest.mark.parametrize(("value", "reason", "hint"), [
    ("app:staff", "'app:staff' is neither a user name nor UID or UID:GID",
     "a group goes with numbers only, UID:GID"),
    ("1000:staff", "is neither a user name nor UID or UID:GID", "UID:GID"),
    ("1a", "'1a' is neither a user name nor UID or UID:GID", "e.g. app"),
    ("'-app'", "is neither", "e.g. app"),
    ("'a b'", "is neither", "e.g. app"),
    ("'" + "a" * 33 + "'", "is neither", "e.g. app"),
    ('""', "'' is neither", "e.g. app"),
    ("4294967295", "UID 4294967295 is out of range", "use 0..4294967294"),
    ('"1000:4294967295"', "GID 4294967295 is out of range", "use 0..4294967294"),
    ("[app]", "expected a string, got a list", "e.g. app"),
])
def test_a_bad_enclave_user_is_refused(value, reason, hint):
    p = refused(f"name: a\nenclave:\n  user: {value}\n", "enclave.user", reason, "user:")
    assert hint in p.hint, str(p)


@pytest.mark.parametrize("value", ["0", '"0:1000"', "root"])
def test_root_as_enclave_user_is_taken_with_a_warning(value):
    p = warned(f"name: a\nenclave:\n  user: {value}\n", "enclave.user",
               "is root: CMD runs as root, as without the key", "user:")
    assert "private key" in p.reason and "remove the key" in p.hint


@pytest.mark.parametrize("value", ['"1000:0"', "1000:0"])
def test_root_s_group_as_enclave_user_s_group_is_taken_with_a_warning(value):
    """Before: taken with no word, and CMD ran with group root's access to the image's files.
    Taken, as root is (the uid alone keeps the tunnel's key out of reach), with a warning."""
    p = warned(f"name: a\nenclave:\n  user: {value}\n", "enclave.user",
               "'1000:0' puts CMD in root's group (GID 0)", "user:")
    assert p.hint == "give it a group of its own, e.g. 1000:1000"
    # Root's own uid is warned of once, as root.
    warned('name: a\nenclave:\n  user: "0:0"\n', "enclave.user", "is root")


def test_profile_check_validates_enclave_user_without_looking_it_up(tmp_path, capsys):
    """`profile check` runs on the parent, whose users are not the image's."""
    f = tmp_path / "p.yaml"
    f.write_text("name: a\nenclave:\n  user: no-such-user-here\n")
    assert main_check([str(f)]) == 0
    assert "  user: no-such-user-here\n" in capsys.readouterr().out


@pytest.mark.parametrize(("value", "reason", "hint"), [
    # YAML 1.1 reads 010 as octal 8, YAML 1.2 as 10: CMD would run as whichever of two users
    # the reader took it for (taken as 10, silently, before).
    ("010", "UID '010' has a leading zero, which is not allowed", "write 10, not 010"),
    ('"0755"', "UID '0755' has a leading zero", "write 755, not 0755"),
    ('"1000:0100"', "GID '0100' has a leading zero", "write 100, not 0100"),
    ("'00'", "UID '00' has a leading zero", "write 0, not 00"),
    # Numbers, out of range: not "neither a user name nor UID" (before), nor int()'s limit.
    ("99999999999", "UID 99999999999 is out of range", "use 0..4294967294"),
    ('"1000:12345678901"', "GID 12345678901 is out of range", "use 0..4294967294"),
    ("'" + "9" * 5000 + "'", "UID 999999", "use 0..4294967294"),
])
def test_enclave_user_numbers_are_plain_decimal_in_range(value, reason, hint):
    p = refused(f"name: a\nenclave:\n  user: {value}\n", "enclave.user", reason, "user:")
    assert hint in p.hint, str(p)
