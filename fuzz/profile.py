"""Target `profile`: hostile YAML into parse_profile and hostile files into load_profile.

Inputs are the example profile mutated as text, random structures over the profile's own
keys dumped as YAML, YAML written to hurt parsers (deep nesting, alias fan-out, tags, merge
keys), and raw bytes loaded from a file. ProfileError is the documented refusal; a profile
that is accepted must come back equal through dump_profile and parse_profile.

An input starts with T (parse the rest as text) or F (write the rest to a file and load it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from wgvsock.services.profile import ProfileError, dump_profile, load_profile, parse_profile

from .harness import Target
from .mutate import TEXT_VALUES, havoc, mutate_text, random_bytes

EXAMPLE = Path(__file__).resolve().parents[1] / "parent" / "profile.example.yaml"
PROFILE_VALUES = (
    *TEXT_VALUES, "vsock", "unix", "tcp", "udp", "0.0.0.0/0:443/tcp", "[2001:db8::/32]:443/tcp",
    "10.77.0.1/30", "10.77.0.2/30", "fd77::1/126", "[10.77.0.1/30, \"fd77::1/126\"]",
    "{listen: 8443, to: 443, protocol: tcp}", "{listen: 8443}", "{}", "[0.0.0.0/0, '::/0']",
    "/etc/wgvsock/x.key", "secretsmanager:x", "ssm:/a/b", "0" * 96, "f" * 95, "g" * 96,
    "{0: " + "0" * 96 + "}", "{eif: /x.eif, cpu_count: 2}", "payments", "wg0", "lo", "a" * 16,
    "1280", "576", "575", "65536", "!!int 5", "!!str 5", "!!float 1", "!!timestamp 2020-99-99",
    "!!binary AAAA", "!!bool yes", "!!null ''", "<<: *a", "&a {}", "2001-12-14", "0b101",
)


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
            raw = raw * (1 + (1 << 20) // max(1, len(raw)))  # over the 1 MiB cap
        return "file", b"F" + raw

    def run(self, data: bytes) -> None:
        if data[:1] == b"F":
            path = self.workdir / "profile.yaml"
            path.write_bytes(data[1:])
            profile = load_profile(path)
            name = str(path)
        else:
            name = "<fuzz>"
            profile = parse_profile(data[1:].decode("utf-8", "surrogatepass"), name)
        again = parse_profile(dump_profile(profile), name)
        assert again == profile, "dump_profile/parse_profile changed an accepted profile"
