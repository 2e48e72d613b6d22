"""Upgrades and mixed versions with real `parent up`/`down` in namespaces (test_roles.World):
wgvsock's files replaced under a running parent (a package upgrade without a restart), and a
state file written by a newer release read by this one (a downgrade)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import wgvsock
from wgvsock.services import firewall

from .netlab import wait_for
from .test_roles import WGVSOCK, World

pytestmark = [pytest.mark.root]


def _install(where: Path) -> str:
    """A pure-Python copy of this wgvsock under WHERE, as a package manager would lay it out;
    returns the PYTHONPATH that runs it."""
    shutil.copytree(Path(wgvsock.__file__).parent, where / "wgvsock",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    return str(where)


def _state(w: World) -> Path:
    return w.lab.tmp / "state" / f"{w.name}.json"


def _nothing_left(w: World) -> None:
    assert "wg0" not in w.parent.ip("-o", "link", "show").stdout
    assert not firewall.exists(w.name, netns=w.parent.name)
    assert list((w.lab.tmp / "sock").glob("*")) == []
    assert list((w.lab.tmp / "run-parent").glob("*")) == []
    assert not _state(w).exists()
    assert w.parent.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"


def test_up_after_an_upgrade_names_the_parent_that_runs_the_old_code(world: World) -> None:
    """A package upgrade replaces wgvsock's files under a running parent; `up` (as a post-
    install script might run it) leaves that parent alone, as it should, but said only
    'already up (pid N)': nothing told that the old code still runs, nor how to switch."""
    w = world
    w.parent_env["PYTHONPATH"] = _install(w.lab.tmp / "old")
    assert w.parent_cmd("up").returncode == 0
    w.start_enclave()
    wait_for(w.egress_works, 30, "the tunnel through the old parent")
    pid = json.loads(_state(w).read_text())["pid"]
    # The parent started before its state file was written. A start time is known to the
    # second (the kernel's boot time, which it counts from, is whole seconds).
    written = os.stat(_state(w)).st_mtime
    wait_for(lambda: time.time() > written + 2.5, 10, "the upgrade to come later")
    w.parent_env["PYTHONPATH"] = _install(w.lab.tmp / "new")  # the upgrade
    up = w.parent_cmd("up")
    assert f"is already up (pid {pid})" in up.stdout, up.stdout
    assert "still runs the wgvsock it started with" in up.stdout, up.stdout
    assert f"systemctl restart wgvsock-parent@{w.name}" in up.stdout, up.stdout
    assert w.egress_works()  # the old parent was left serving
    # A reload is applied by the code that runs: the note says which that is.
    reload = w.parent_cmd("reload")
    assert "still runs the wgvsock it started with" in reload.stderr, reload.stderr
    # The new release's `down` stops the old parent and removes all it made.
    down = w.parent_cmd("down")
    assert f"stopped the parent (pid {pid})" in down.stdout, down.stdout
    _nothing_left(w)
    assert w.parent_cmd("up").returncode == 0
    wait_for(w.egress_works, 30, "the tunnel through the new parent")
    assert "still runs" not in w.parent_cmd("up").stdout  # it runs the files that are there


def test_a_chmod_or_chown_of_the_package_under_a_running_parent_is_no_upgrade(
        world: World) -> None:
    """Review finding: the files' ctime against the parent's start said whether they were
    replaced, so `chmod -R` or `chown -R` of the package made `up` and `reload` say the
    parent still ran the old code and should be restarted. A file renamed over one of them,
    as installers do, still says so."""
    w = world
    installed = Path(_install(w.lab.tmp / "installed"))
    w.parent_env["PYTHONPATH"] = str(installed)
    assert w.parent_cmd("up").returncode == 0
    pid = json.loads(_state(w).read_text())["pid"]
    written = os.stat(_state(w)).st_mtime
    wait_for(lambda: time.time() > written + 2.5, 10, "the chmod to come later")
    w.parent.run("chmod", "-R", "go-w", str(installed))
    w.parent.run("chown", "-R", "65534:65534", str(installed))
    up = w.parent_cmd("up")
    assert f"is already up (pid {pid})" in up.stdout, up.stdout
    assert "still runs" not in up.stdout, up.stdout
    assert "still runs" not in w.parent_cmd("reload").stderr
    module = installed / "wgvsock" / "safetext.py"
    shutil.copy2(module, module.with_suffix(".new"))  # same bytes, same mtime
    os.replace(module.with_suffix(".new"), module)
    assert "still runs the wgvsock it started with" in w.parent_cmd("up").stdout
    assert w.parent_cmd("down").returncode == 0


def test_the_background_parent_runs_the_installed_wgvsock_not_the_working_directorys(
        world: World) -> None:
    """`parent up` starts its background process as `python -m wgvsock.cli`, and -m puts the
    working directory first on sys.path: run from a checkout of another release, the parent
    ran that release (not the one `wgvsock` is), and run as root from a directory others may
    write (/tmp), it imported whatever wgvsock package they had put there."""
    w = world
    cwd = w.lab.tmp / "cwd"
    (cwd / "wgvsock").mkdir(parents=True)
    marker = w.lab.tmp / "planted"
    (cwd / "wgvsock" / "__init__.py").write_text(
        f"import os\nopen({str(marker)!r}, 'w').write('ran')\nos._exit(3)\n")
    up = w.parent.run(WGVSOCK, "parent", "up", "--profile", str(w.profile),
                      env=w.env_for("parent"), cwd=str(cwd), check=False, timeout=60)
    assert not marker.exists(), up.stderr
    assert up.returncode == 0, up.stderr
    assert w.parent_cmd("down").returncode == 0


def _newer(w: World) -> dict:
    """The running parent's state file as a later release might write it: a field this one
    does not know (a frozen copy would do as well; only the field's name matters)."""
    state = json.loads(_state(w).read_text())
    newer = {**state, "tomorrow": {"undo": ["something"]}}
    _state(w).write_text(json.dumps(newer))
    _state(w).chmod(0o600)
    return state


def test_a_newer_releases_running_parent_is_stopped_by_down(world: World) -> None:
    """After a downgrade, the newer parent still runs. Before, its state file was refused
    ("unknown field 'tomorrow'; it is not one `wgvsock parent up` wrote"): `up` failed and
    `down` stopped nothing, left the interface, the table and the sockets, and exit 1."""
    w = world
    assert w.parent_cmd("up").returncode == 0
    pid = _newer(w)["pid"]
    up = w.parent_cmd("up")
    assert f"is already up (pid {pid})" in up.stdout, up.stdout
    down = w.parent_cmd("down")
    assert f"stopped the parent (pid {pid})" in down.stdout and down.stderr == "", down.stderr
    _nothing_left(w)


def test_a_newer_releases_crashed_parent_is_cleaned_up_naming_what_it_cannot_undo(
        world: World) -> None:
    w = world
    assert w.parent_cmd("up").returncode == 0
    pid = _newer(w)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the parent to die")
    # `up` would replace the record of what only the newer release knows how to undo.
    up = w.parent_cmd("up", check=False)
    assert up.returncode == 1 and "Traceback" not in up.stderr, up.stderr
    assert "'tomorrow'" in up.stderr and "newer wgvsock" in up.stderr, up.stderr
    assert "wgvsock parent down" in up.stderr, up.stderr
    down = w.parent_cmd("down", check=False)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert "'tomorrow'" in down.stderr and "newer wgvsock" in down.stderr, down.stderr
    _nothing_left(w)  # what it knows of is undone, forwarding included
    assert w.parent_cmd("down").returncode == 0
    assert w.parent_cmd("up").returncode == 0


def test_a_parent_whose_files_are_replaced_under_it_runs_on_its_own_code(lab) -> None:
    """A package upgrade swaps wgvsock's files while the parent runs. Before, the parent
    imported some modules only when first needed (the attestation verifier at the first
    registration with a document, the DNS forwarder at a reload that adds host names, the
    CloudWatch sender's first send): mid-upgrade such an import failed, and after it the old
    parent ran a newer release's module. With the verifier replaced by one that cannot load
    in the running parent, an enclave's document was let in unverified ("attestation
    document not verified") that the parent refuses with its own files."""
    from tests.attest_fixtures import make_test_ca

    from .test_roles_attested import launcher

    ca_dir = lab.tmp / "ca"
    make_test_ca().save(ca_dir)  # not AWS's root: its documents do not verify here
    with World(lab) as w:
        w.env["TMPDIR"] = str(lab.tmp)  # the enclave's scratch files stay in the lab
        installed = Path(_install(lab.tmp / "installed"))
        w.parent_env["PYTHONPATH"] = str(installed)
        assert w.parent_cmd("up").returncode == 0
        # The upgrade: the next release's module, which needs what this one's other modules
        # (loaded already) lack; or one half written. (Removed outright, the venv's editable
        # finder would find the checkout's in its place.)
        (installed / "wgvsock" / "attestation" / "__init__.py").write_text(
            "from ..safetext import only_in_the_next_release  # noqa\n")
        enclave = w.start_enclave(launcher=launcher(ca_dir, "good"), timeout=10)
        refused = "parent refused this enclave: attestation refused"

        def log() -> str:
            return (lab.tmp / "enclave.log").read_text()

        wait_for(lambda: refused in log() or "tunnel up" in log(), 30, "the parent's verdict")
        assert "tunnel up" not in log(), log()
        assert enclave.wait(60) == 1, log()
