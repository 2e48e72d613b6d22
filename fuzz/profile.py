"""Target `profile`: hostile YAML into parse_profile and hostile files into load_profile.

Inputs are the example profile mutated as text, random structures over the profile's own
keys dumped as YAML, YAML written to hurt parsers (deep nesting, alias fan-out, tags, merge
keys), egress and attestation settings drawn from lists made to reach the security rules, and
raw bytes loaded from a file. ProfileError is the documented refusal. A profile that is
accepted must come back equal through dump_profile and parse_profile, and must keep the rules
the example profile documents: every cloud credential endpoint is denied unless an allow rule
names it (aimed inside its scope and covering it), `attestation.require` has PCR0 pinned, and
a debug-mode launch has `attestation.allow_debug`.

An input starts with T (parse the rest as text) or F (write the rest to a file and load it).
"""

from __future__ import annotations

import ipaddress
import random
import re
from pathlib import Path
from typing import Any

import yaml

from wgvsock.services.profile import (
    MAX_PROFILE_BYTES,
    Profile,
    ProfileError,
    dump_profile,
    load_profile,
    parse_profile,
)

from .harness import Target
from .mutate import TEXT_VALUES, havoc, mutate_text, random_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "parent" / "profile.example.yaml"
# Egress rules around the credential endpoints: ones that name an endpoint (and so lift its
# deny), ones that cover it from outside its scope (which must not), and neighbours.
EGRESS_RULES = (
    "0.0.0.0/0", "::/0", "10.0.0.0/8", "128.0.0.0/1", "0.0.0.0/1", "169.254.169.254",
    "169.254.169.254/32:80/tcp", "169.254.169.254/32:443/udp", "169.254.169.255/32",
    "169.254.0.0/16", "169.254.0.0/15", "169.254.0.0/17", "169.254.128.0/17",
    "169.254.170.0/24", "169.254.170.2/32:80", "169.254.170.23/32:80/tcp", "169.254.170.3/32",
    "[fd00:ec2::/32]:80/tcp", "fd00:ec2::254/128", "fd00:ec2::/32", "fd00:ec2::/31",
    "fd00::/8", "[fd00:ec2::254/128]:80", "api.example.com:443/tcp", "*.example.com",
)
PROFILE_VALUES = (
    *TEXT_VALUES, "vsock", "unix", "tcp", "udp", "0.0.0.0/0:443/tcp", "[2001:db8::/32]:443/tcp",
    "10.77.0.1/30", "10.77.0.2/30", "fd77::1/126", "[10.77.0.1/30, \"fd77::1/126\"]",
    "{listen: 8443, to: 443, protocol: tcp}", "{listen: 8443}", "{}", "[0.0.0.0/0, '::/0']",
    "/etc/wgvsock/x.key", "secretsmanager:x", "ssm:/a/b", "0" * 96, "f" * 95, "g" * 96,
    "{0: " + "0" * 96 + "}", "{eif: /x.eif, cpu_count: 2}", "payments", "wg0", "lo", "a" * 16,
    "1280", "576", "575", "65536", "!!int 5", "!!str 5", "!!float 1", "!!timestamp 2020-99-99",
    "!!binary AAAA", "!!bool yes", "!!null ''", "<<: *a", "&a {}", "2001-12-14", "0b101",
    *EGRESS_RULES, "[169.254.169.254/32, 0.0.0.0/0]", '["[fd00:ec2::/32]:80/tcp", "::/0"]',
    "{8: " + "a" * 96 + "}", "{eif: /x.eif, debug: true}",
)
# The credential endpoints and the scope an allow rule must stay inside to name one, written
# out here rather than imported: the oracle must not change with the code under test.
CREDENTIALS = tuple(
    (ipaddress.ip_address(a), ipaddress.ip_network(s)) for a, s in (
        ("169.254.169.254", "169.254.0.0/16"), ("fd00:ec2::254", "fd00:ec2::/32"),
        ("169.254.170.2", "169.254.0.0/16"), ("169.254.170.23", "169.254.0.0/16")))
_ADDRESS_LIKE = re.compile(r"[0-9A-Fa-f:.]+")


def _extend(tree: dict[str, Any]) -> dict[str, Any]:
    """The example's keys plus the ones it leaves commented out."""
    tree["parent"]["enclave"] = {"eif": "/opt/x.eif", "cpu_count": 2, "memory_mib": 1024,
                                 "cid": 16, "debug": False}
    tree["attestation"]["pcrs"] = {0: "0" * 96, 8: "a" * 96}
    return tree


def random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 2 or r < 0.7:
        return rng.choice((
            None, True, False, 0, -1, 1, 65535, 65536, 2**32, 2**64, 1.5, float("inf"),
            float("nan"), rng.choice(PROFILE_VALUES), rng.randrange(-10, 70000),
        ))
    if r < 0.85:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(("listen", "to", "protocol", "x", 0, 1)): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def random_structure(rng: random.Random, tree: Any, rate: float) -> Any:
    """TREE with each entry kept, changed, dropped or joined by an unknown key at RATE."""
    if isinstance(tree, dict):
        out: dict[Any, Any] = {}
        for k, v in tree.items():
            r = rng.random()
            if r < rate * 0.3:
                continue
            out[k] = random_value(rng) if r < rate else random_structure(rng, v, rate)
        if rng.random() < rate * 0.2:
            out[rng.choice(("nmae", "extra", "Transport", 1, True))] = random_value(rng)
        return out
    if isinstance(tree, list):
        return [random_structure(rng, v, rate) for v in tree] + (
            [random_value(rng)] if rng.random() < rate else [])
    return tree


def policy(rng: random.Random, tree: dict[str, Any]) -> dict[str, Any]:
    """TREE with egress and attestation settings drawn to reach the deny and attestation rules
    (the address gets IPv6 too at times, so IPv6 rules are not refused for that alone)."""
    parent, attestation = dict(tree["parent"]), dict(tree["attestation"])
    egress = dict(parent["egress"])
    for key in ("allow", "deny"):
        if rng.random() < 0.8:
            egress[key] = rng.sample(EGRESS_RULES, rng.choice((0, 1, 1, 2, 3)))
    if rng.random() < 0.5:
        parent["address"] = ["10.77.0.1/30", "fd77::1/126"]
        tree = {**tree, "enclave": {**tree["enclave"], "address": ["10.77.0.2/30", "fd77::2/126"],
                                    "routes": ["0.0.0.0/0", "::/0"]}}
    parent["egress"] = egress
    if rng.random() < 0.6:
        parent["enclave"] = {**parent["enclave"], "debug": rng.random() < 0.5}
    else:
        parent["enclave"] = None
    attestation["require"] = rng.random() < 0.5
    attestation["allow_debug"] = rng.random() < 0.5
    attestation["pcrs"] = {i: v for i, v in tree["attestation"]["pcrs"].items()
                           if rng.random() < 0.6}
    return {**tree, "parent": parent, "attestation": attestation}


def _mentions(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether TEXT spells ADDRESS anywhere, in any form ipaddress reads."""
    for token in _ADDRESS_LIKE.findall(text):
        try:
            if ipaddress.ip_address(token.strip(":.")) == address:
                return True
        except ValueError:
            pass
    return False


def check_rules(profile: Profile, text: str) -> None:
    """The security rules every accepted profile keeps, stated independently of the code."""
    egress = profile.parent.egress
    for address, scope in CREDENTIALS:
        # "names": covers the address and is aimed inside the scope (0.0.0.0/0 is not).
        named = any(r.network.version == address.version and address in r.network
                    and r.network.subnet_of(scope) for r in egress.allow)  # type: ignore[arg-type]
        denied = any(r.ports is None and r.protocol is None and address in r.network
                     for r in egress.deny)
        assert named or denied, f"{address} is neither denied nor named by an allow rule"
        if named and not _mentions(text, address):
            # Then nothing but the profile itself could have put the endpoint in deny.
            assert ipaddress.ip_network(address) not in [
                r.network for r in egress.deny if r.ports is None and r.protocol is None
            ], f"{address} is denied although an allow rule names it"
    attestation = profile.attestation
    if attestation.require:
        assert 0 in attestation.pcrs, "attestation.require accepted without PCR0 pinned"
    launch = profile.parent.enclave
    if launch is not None and launch.debug:
        assert attestation.allow_debug, "a debug-mode launch accepted without allow_debug"


def hostile_yaml(rng: random.Random) -> str:
    n = rng.choice((10, 100, 990, 5000))
    return rng.choice((
        "[" * n + "]" * n,
        "{a: " * n + "1" + "}" * n,
        "".join(" " * i + "a:\n" for i in range(min(n, 1400))),  # about 1 MiB
        "- " * n + "x",
        # Alias fan-out: 9 levels of 9 references is 387 million leaves if anyone expands it.
        "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + rng.choice(("parent: {egress: {allow: *i}}\n", "enclave: {dns: *i}\n", "name: *i\n",
                      "parent: *i\n", "attestation: {pcrs: *i}\n")),
        "name: &n x\nparent: {egress: {allow: [*n, *n]}, <<: {address: 1}}\n",
        "name: !!python/object/apply:os.system [echo]\n",
        "name: !!binary " + "A" * n + "\n",
        "name: x\nname: y\n" * (n // 10 + 1),
        "\ufeffname: x\n", "name: x\0\n", "name: \"\\ud800\"\n", "\t name: x\n",
        "version: 1\nname: x\nmtu: " + "9" * n + "\n",
        "%YAML 1.1\n---\nname: x\n---\nname: y\n",
        "name: x\n" + "# " + "c" * n * 10 + "\n",
    ))


class ProfileTarget(Target):
    name = "profile"
    count = 10_000
    shard_size = 2_500
    allowed = (ProfileError,)

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        super().__init__(rng, workdir)
        self.example = EXAMPLE.read_text()
        self.tree = _extend(yaml.safe_load(self.example))

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.45:
            text = mutate_text(rng, self.example, values=PROFILE_VALUES)
            return "mutated", b"T" + text.encode("utf-8", "surrogatepass")
        if r < 0.6:
            text = yaml.safe_dump(policy(rng, self.tree), default_flow_style=rng.choice((False,
                                                                                         None)))
            return "policy", b"T" + text.encode()
        if r < 0.8:
            rate = rng.choice((0.0, 0.02, 0.1, 0.3))
            data = random_structure(rng, self.tree, rate)
            text = yaml.safe_dump(data, default_flow_style=rng.choice((False, None, True)))
            return "structure", b"T" + text.encode()
        if r < 0.9:
            return "hostile-yaml", b"T" + hostile_yaml(rng).encode("utf-8", "surrogatepass")
        raw = self.example.encode()
        raw = havoc(rng, raw, max_len=8192) if rng.random() < 0.7 else random_bytes(rng, 3000)
        if rng.random() < 0.05:
            raw = raw * (1 + MAX_PROFILE_BYTES // max(1, len(raw)))  # over the cap
        return "file", b"F" + raw

    def run(self, data: bytes) -> None:
        text = data[1:].decode("utf-8", "surrogatepass" if data[:1] == b"T" else "replace")
        if data[:1] == b"F":
            path = self.workdir / "profile.yaml"
            path.write_bytes(data[1:])
            profile = load_profile(path)
            name = str(path)
        else:
            name = "<fuzz>"
            profile = parse_profile(text, name)
        check_rules(profile, text)
        again = parse_profile(dump_profile(profile), name)
        assert again == profile, "dump_profile/parse_profile changed an accepted profile"
