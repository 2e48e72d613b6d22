"""What the README tells a newcomer to run, checked against the code it runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from wgvsock.services.profile import parse_profile

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start() -> str:
    start = README.index("## Quick start on EC2")
    return README[start : README.index("\n## ", start + 1)]


def _step(n: int) -> str:
    text = _quick_start()
    start = text.index(f"\n{n}. **")
    end = text.find(f"\n{n + 1}. **", start)
    return text[start : end if end >= 0 else len(text)]


def _sh_lines(text: str) -> list[str]:
    return [
        line.strip()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.strip()
    ]


def test_the_quick_start_profile_admits_its_debug_mode_enclave() -> None:
    """Step 7 starts the enclave with --debug-mode, whose document has all-zero PCRs; the
    parent refuses one unless attestation.allow_debug is true. Step 4 made the profile from
    parent/profile.example.yaml as it is (allow_debug: false), so the first enclave a newcomer
    ran was refused ("the enclave runs in debug mode") and never got its tunnel."""
    assert "--debug-mode" in _step(7)
    text = (ROOT / "parent" / "profile.example.yaml").read_text()
    for line in _sh_lines(_step(4)):
        words = shlex.split(line, comments=True)
        if words[:2] == ["sed", "-i"] and words[-1] == "parent/profile.example.yaml":
            old, new = re.fullmatch(r"s/([^/]*)/([^/]*)/", words[2]).groups()
            text = text.replace(old, new)
    assert parse_profile(text, "parent/profile.example.yaml").attestation.allow_debug


def test_the_quick_start_uses_only_what_it_installed() -> None:
    """`wg` (wireguard-tools) is installed by no step: its `wg genkey` was `command not
    found` on a fresh Amazon Linux instance; `wgvsock genkey` makes the same key."""
    for line in _sh_lines(_quick_start()):
        assert not re.search(r"(^|\||sudo)\s*wg\s", line), f"runs `wg`, never installed: {line}"


def test_make_eif_needs_no_apt_on_amazon_linux(tmp_path: Path) -> None:
    """Step 5 runs `make eif` on Amazon Linux, which has dnf, not apt: the venv it builds the
    image from waited on the apt packages of `make test`, and the step stopped at
    `apt-get: not found` (Error 127). Where there is no apt-get, they are left to the user."""
    import shutil
    import subprocess

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    bin_dir = tmp_path / "bin"  # a system without dpkg-query and apt-get
    bin_dir.mkdir()
    for tool in ("sh", "mkdir", "touch", "grep", "cmp"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    make = shutil.which("make")
    assert make is not None
    res = subprocess.run(
        [make, "-C", str(tmp_path), ".venv/.apt-done"],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / ".venv" / ".apt-done").exists()
    assert "no apt-get" in res.stdout


def test_make_demo_installs_only_what_the_demo_needs(tmp_path: Path) -> None:
    """`make demo` installed the whole test suite's apt packages (qemu, a kernel image,
    podman, debootstrap, systemd-container...) before a first demo; it needs a few tools, the
    venv and the compiler. `make test` still installs everything."""
    import shutil
    import subprocess

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    make = shutil.which("make")
    assert make is not None

    def dry(target: str) -> set[str]:
        """The packages TARGET's recipe checks and installs."""
        res = subprocess.run([make, "-C", str(tmp_path), "-n", target], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        found = re.search(r"for p in ([^;]*); do", res.stdout)
        assert found, res.stdout
        return set(found.group(1).split())

    # What `demo` and `test` wait for (their other prerequisites need the whole checkout).
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: apt-demo venv compile$", makefile, re.M)
    assert re.search(r"^test: apt venv compile$", makefile, re.M)
    demo, test = dry(".venv/.apt-demo-done"), dry(".venv/.apt-done")
    assert {"iperf3", "nftables", "curl", "dnsmasq-base", "gcc", "python3-venv"} <= demo
    assert demo < test
    assert not demo & {"qemu-system-x86", "linux-image-amd64", "podman", "debootstrap",
                       "systemd-container", "valgrind"}



def test_make_j_never_runs_two_apt_gets_at_once(tmp_path: Path) -> None:
    """`make -j2 test` (or MAKEFLAGS=-j2) on a fresh machine made the demo's apt mark, which
    the venv waits for, beside the whole suite's: two apt-gets at once, and the second stops on
    apt's lock ("Could not get lock /var/lib/dpkg/lock-frontend"), failing make. One list only
    (`make test` installed through one mark) never did. Whatever runs second now finds its
    packages installed, or installs only the rest, after the first."""
    import os
    import shutil
    import subprocess

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    installed, log = tmp_path / "installed", tmp_path / "log"
    installed.touch()
    # apt-get that records an overlap (where the real one stops on its lock) and holds its
    # turn a moment, so that a second one started meanwhile is seen.
    (stubs / "apt-get").write_text(
        "#!/bin/sh\n"
        f'mkdir "{tmp_path}/busy" 2>/dev/null || {{ echo overlap >> "{log}"; exit 100; }}\n'
        f'echo "$1" >> "{log}"\n'
        f'if [ "$1" = install ]; then shift 4; printf "%s\\n" "$@" >> "{installed}"; fi\n'
        "sleep 1\n"
        f'rmdir "{tmp_path}/busy"\n')
    (stubs / "dpkg-query").write_text(
        "#!/bin/sh\n"
        'for p; do :; done\n'
        f'grep -qx "$p" "{installed}" && echo "install ok installed"\n'
        "exit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    make = shutil.which("make")
    assert make is not None
    env = {"PATH": f"{stubs}:{os.environ['PATH']}"}
    res = subprocess.run([make, "-C", str(tmp_path), "-j2", ".venv/.apt-done",
                          ".venv/.apt-demo-done"],
                         env=env, capture_output=True, text=True, timeout=120)
    ran = log.read_text()
    assert "overlap" not in ran, ran + res.stdout + res.stderr
    assert res.returncode == 0, res.stdout + res.stderr
    listed = subprocess.run([make, "-s", "-C", str(tmp_path), "--no-print-directory", "--eval",
                             "listed: ; @echo $(APT_PACKAGES)", "listed"],
                            capture_output=True, text=True, timeout=60)
    wanted = set(listed.stdout.split())
    assert "qemu-system-x86" in wanted and "iperf3" in wanted, listed.stdout + listed.stderr
    assert set(installed.read_text().split()) == wanted


# -- the profile reference table ----------------------------------------------------------------


def _profile_table() -> dict[str, tuple[str, str]]:
    """The rows of "## Profile reference": key -> (default cell, meaning cell)."""
    start = README.index("## Profile reference")
    section = README[start : README.index("\n### ", start)]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_.]+)` \| (.*?) \| (.*) \|$", line)
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def _schema_keys() -> set[str]:
    """Every key of the profile that the table should document, from the parser's own lists."""
    from wgvsock.services import profile as p

    keys = {k for k in p._TOP_KEYS if k not in ("transport", "parent", "enclave", "attestation")}
    keys |= {f"transport.{k}" for k in p._TRANSPORT_KEYS}
    keys |= {f"parent.{k}" for k in p._PARENT_KEYS if k not in ("egress", "metrics")}
    keys |= {f"parent.egress.{k}" for k in p._EGRESS_KEYS}
    keys |= {f"parent.enclave.{k}" for k in p._LAUNCH_KEYS}
    keys |= {f"parent.metrics.{k}" for k in p._METRICS_KEYS}
    keys |= {f"parent.metrics.cloudwatch.{k}" for k in p._CLOUDWATCH_KEYS}
    keys |= {f"enclave.{k}" for k in p._ENCLAVE_KEYS}
    keys |= {f"attestation.{k}" for k in p._ATTEST_KEYS}
    return keys  # parent.ingress's listen/to/protocol are described in its own row


def test_the_profile_table_documents_every_key_and_no_other() -> None:
    assert set(_profile_table()) == _schema_keys()


_MISSING = object()


def _resolved(text: str) -> dict:
    import yaml

    from wgvsock.services.profile import dump_profile

    return yaml.safe_load(dump_profile(parse_profile(text)))


def _at(data: object, key: str) -> object:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def test_the_profile_tables_defaults_are_the_parsers() -> None:
    """Each default the table gives as a value (its cell starting with one) is what `profile
    check` fills in: first in a profile of `name` alone, then, for keys that exist only
    under another (parent.enclave, the CloudWatch block, the DNS grace of name rules), in
    one that has it."""
    import yaml

    minimal = _resolved("name: a\n")
    fuller = _resolved("name: a\nparent: {enclave: {eif: /x.eif}, "
                       "metrics: {cloudwatch: {namespace: ns}}}\n")
    names = _resolved("name: a\nparent: {egress: {allow: [example.com]}}\n")
    checked = []
    for key, (default, _) in _profile_table().items():
        tokens = re.findall(r"`([^`]*)`", default)
        if not default.startswith("`") or key == "parent.egress.deny":
            continue  # words, not a value; deny's default is [] plus the built-in entries
        token = next(t for t in tokens if " " not in t)  # `port + 1` (`821`): the value
        want = yaml.safe_load(token.replace("NAME", "a"))
        got = next((v for v in (_at(d, key) for d in (minimal, fuller, names))
                    if v is not _MISSING), _MISSING)
        if got is _MISSING and key in ("parent.egress.resolver", "parent.egress.test_dns_grace"):
            continue  # shown only when set (the check's header says so)
        if isinstance(got, list) and not isinstance(want, list):
            want = [want]  # a lone address stands for the list of one
        assert got == want, f"{key}: the README says {token}, profile check fills in {got!r}"
        checked.append(key)
    assert len(checked) >= 25, checked


# key -> (a profile that sets it to {}, given the README's range lo..hi)
_RANGED = {
    "mtu": "name: a\nmtu: {}\n",
    "transport.port": "name: a\ntransport: {{port: {}, control_port: 2}}\n",
    "parent.egress.dns_grace": "name: a\nparent: {{egress: {{allow: [example.com], "
                               "dns_grace: {}}}}}\n",
    "parent.egress.max_connections": "name: a\nparent: {{egress: {{max_connections: {}}}}}\n",
    "parent.metrics.cloudwatch.interval": "name: a\nparent: {{metrics: {{cloudwatch: "
                                          "{{namespace: ns, interval: {}}}}}}}\n",
}


@pytest.mark.parametrize("key", sorted(_RANGED))
def test_the_profile_tables_ranges_are_the_parsers(key: str) -> None:
    from wgvsock.services.profile import ProfileError

    meaning = _profile_table()[key][1]
    m = re.search(r"(\d+)\u2013(\d+)", meaning)  # an en dash, as the README writes ranges
    assert m, f"{key}: no range in the README"
    lo, hi = int(m[1]), int(m[2])
    for value in (lo, hi):
        if key == "transport.port" and value == 2:
            continue
        parse_profile(_RANGED[key].format(value))
    for value in (lo - 1, hi + 1):
        with pytest.raises(ProfileError, match=f"{value} is out of range"):
            parse_profile(_RANGED[key].format(value))


def test_the_table_says_the_parent_address_follows_a_given_enclave_address() -> None:
    """With only enclave.address written, the parent takes the other host of its subnet (so
    10.78.0.2/30 gives 10.78.0.1/30); the table gave 10.77.0.1/30 alone as the default, which
    would have been refused as outside the enclave's subnet."""
    derived = _resolved("name: a\nenclave: {address: 10.78.0.2/30}\n")
    assert _at(derived, "parent.address") == ["10.78.0.1/30"]
    default = _profile_table()["parent.address"][0]
    assert "with `enclave.address` given, the other host of each of its subnets" in default


def test_troubleshooting_does_not_blame_a_port_the_enclave_does_not_use() -> None:
    """The enclave sends to the port the parent's welcome names (roles/enclave.py _apply), so
    a transport.port that differs between the two profiles cannot be why no handshake came;
    the README said it was."""
    start = README.index("## Troubleshooting")
    text = " ".join(README[start : README.index("\n## ", start + 1)].split())
    line = text[text.index("`registered, but no WireGuard handshake`"):]
    line = line[: line.index(" - ")]
    assert "differs between the two profiles" not in line
    assert "whatever its own profile says" in line


def test_the_readme_names_every_package_make_test_installs() -> None:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    names = set()
    for var in ("DEMO_APT_PACKAGES", "APT_PACKAGES"):
        found = re.search(rf"^{var} := (.*)$", makefile, re.M)
        assert found, var
        names |= {n for n in found.group(1).split() if not n.startswith("$(")}
    intro = README.split("`make test` installs what it needs", 1)[1].split("creates `.venv`")[0]
    assert {n for n in names if f"`{n}`" not in intro} == set()


def test_the_journal_line_parent_readme_waits_for_is_one_the_parent_logs() -> None:
    """parent/README.md's install ends in `journalctl -f`, waiting for a line "parent payments
    up on wg0 ...", which no release logged: the parent says "the parent of profile
    'payments' is up on wg0 (...)". Its start line, as `up` logs it for the example profile."""
    from wgvsock.roles import parent

    text = (ROOT / "parent" / "README.md").read_text()
    said = re.search(r'journalctl -u wgvsock-parent@payments -f\s+# "([^"]*)"', text)
    assert said is not None
    found = re.search(r'log\.info\("(the parent of %s is up on [^"]*)"',
                      Path(parent.__file__).read_text())
    assert found is not None
    profile = parse_profile((ROOT / "parent" / "profile.example.yaml").read_text())
    t = profile.transport
    assert said.group(1) == found.group(1) % (parent.named(profile.name), profile.interface,
                                              t.kind, t.port, t.control_port)


def test_the_attest_verify_line_names_every_option_it_has() -> None:
    """The README's `wgvsock attest verify` line left out --root, which its --help lists."""
    from wgvsock.attestation.cli import _parser

    line = next(s for s in _sh_lines(README) if s.startswith("wgvsock attest verify "))
    said = set(re.findall(r"\[(--[a-z-]+)", line))
    sub = next(a for a in _parser()._actions if a.dest == "cmd")
    verify = sub.choices["verify"]  # type: ignore[union-attr]
    options = {s for a in verify._actions for s in a.option_strings
               if s.startswith("--") and s != "--help"}
    assert said == options
