"""What the README tells a newcomer to run, checked against the code it runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

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
