"""`wgvsock parent doctor`'s (and `up`'s) checks of the directories the parent's sockets go in."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net.netlab import PREFIX
from wgvsock.roles.parent import local_checks
from wgvsock.services.profile import parse_profile


def _host(lab, label: str):
    """A namespace like a host's: 192.0.2.5/24 on a veth and a default route through it."""
    ns = lab.netns(label)
    ns.ip("link", "add", f"{label}0", "type", "veth", "peer", "name", f"{label}1")
    ns.ip("addr", "add", "192.0.2.5/24", "dev", f"{label}0")
    for dev in (f"{label}0", f"{label}1"):
        ns.ip("link", "set", dev, "up")
    ns.ip("route", "add", "default", "via", "192.0.2.1")
    return ns


def _parent_env(lab, **extra: str) -> dict[str, str]:
    """What `wgvsock parent` runs with here: the lab's state and run directories, this
    checkout's package, wide tables (the doctor's rows on one line each)."""
    return {**os.environ, "WGVSOCK_STATE_DIR": str(lab.tmp / "state"),
            "WGVSOCK_RUN_DIR": str(lab.tmp / "run"), "COLUMNS": "1000",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def _check(monkeypatch: pytest.MonkeyPatch, run_dir: Path, transport: str = ""):
    monkeypatch.setenv("WGVSOCK_RUN_DIR", str(run_dir))
    profile = parse_profile(f"name: x\n{transport}enclave:\n  address: 10.77.0.2/30\n")
    return {c.name: c for c in local_checks(profile)}["socket directories"]


@pytest.fixture
def base() -> Iterator[Path]:
    # Under /tmp (sticky, root's) rather than pytest's tmp_path, whose directories above may
    # be another user's on some machines: what is above the checked directories is known.
    d = Path(tempfile.mkdtemp(prefix="wgvsock-checks-", dir="/tmp"))
    yield d
    shutil.rmtree(d)


def test_a_run_dir_not_made_yet_passes_and_is_not_made(monkeypatch, base) -> None:
    check = _check(monkeypatch, base / "wireguard")
    assert check.ok is True and str(base / "wireguard") in check.detail
    assert not (base / "wireguard").exists()  # a check changes nothing


def test_a_run_dir_others_may_write_fails_naming_the_fix(monkeypatch, base) -> None:
    run = base / "wireguard"
    run.mkdir()
    run.chmod(0o777)
    check = _check(monkeypatch, run)
    assert check.ok is False
    assert str(run) in check.detail and f"chmod go-w {run}" in check.detail


def test_the_unix_stand_ins_directory_is_checked_too(monkeypatch, base) -> None:
    run, sockets = base / "wireguard", base / "sockets"
    sockets.mkdir()
    sockets.chmod(0o755)  # fine for the run directory (wg lists it), not for these sockets
    check = _check(monkeypatch, run,
                   f"transport:\n  kind: unix\n  path: {sockets}\n")
    assert check.ok is False and str(sockets) in check.detail and "chmod 700" in check.detail
    sockets.chmod(0o700)
    check = _check(monkeypatch, run,
                   f"transport:\n  kind: unix\n  path: {sockets}\n")
    assert check.ok is True and str(sockets) in check.detail


# -- the doctor's checks of the metrics port and the connection limit ---------------------------


def _parent(block: str):
    return parse_profile(f"name: x\nparent:\n{block}enclave:\n  address: 10.77.0.2/30\n")


def test_the_metrics_port_check_names_a_free_port_and_a_wrong_address() -> None:
    from wgvsock.roles.parent import metrics_port_check

    assert metrics_port_check(_parent("")).ok is None
    with socket.socket() as s:  # a port free now: the kernel's pick, let go
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = metrics_port_check(_parent(f"  metrics: {{listen: '127.0.0.1:{port}'}}\n"))
    assert check.ok is True and f"127.0.0.1 port {port} is free" in check.detail
    check = metrics_port_check(_parent("  metrics: {listen: '192.0.2.77:9586'}\n"))
    assert check.ok is False, check
    assert "192.0.2.77 port 9586: Cannot assign requested address: `up` refuses it" in \
        check.detail


@pytest.mark.parametrize(("table", "limit", "ok", "says"), [
    ("262144\n", "", None, "not set: the enclave may hold connections until it fills the "
                           "host's conntrack table (262144 entries"),
    (None, "", None, "not set: the enclave may hold connections until it fills the host's "
                     "conntrack table"),
    ("262144\n", "    max_connections: 4096\n", True, "at most 4096 connections, 2% of"),
    ("4096\n", "    max_connections: 4096\n", False, "max_connections 4096 is not below the "
                                                     "4096 entries"),
    (None, "    max_connections: 4096\n", True, "its table's size is not known"),
])
def test_the_connection_limit_is_judged_against_the_conntrack_table(
        monkeypatch, tmp_path, table, limit, ok, says) -> None:
    """Before: nothing said that a limit at or above net.netfilter.nf_conntrack_max protects
    nothing (the enclave can still fill the host's table), nor that no limit is set."""
    from wgvsock.roles import parent

    sysctl = tmp_path / "nf_conntrack_max"  # the kernel's file, as it reads with the module
    if table is not None:
        sysctl.write_text(table)
    monkeypatch.setattr(parent, "CONNTRACK_MAX", sysctl)
    check = parent.connection_limit_check(_parent(f"  egress:\n{limit}" if limit else ""))
    assert check.ok is ok and says in check.detail, check


def test_a_test_root_ca_others_could_replace_is_refused(base: Path) -> None:
    """Before: attestation.test_root_ca was read on every verification with no check of who
    could change it, though documents its key signs pass for a genuine enclave's (review
    finding). Now `up` and `doctor` refuse it as they refuse such an EIF."""
    from wgvsock.roles.parent import test_root_check

    safe = base / "ca"
    safe.mkdir(mode=0o700)
    (safe / "root.pem").write_text("x")
    check = test_root_check(str(safe / "root.pem"))
    assert check.ok is True and "for tests only" in check.detail
    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (open_dir / "root.pem").write_text("x")
    check = test_root_check(str(open_dir / "root.pem"))
    assert check.ok is False
    assert f"{open_dir} is writable by group and others (mode 777)" in check.detail
    (safe / "root.pem").chmod(0o666)
    assert test_root_check(str(safe / "root.pem")).ok is False
    missing = test_root_check(str(base / "nowhere.pem"))
    assert missing.ok is False and "No such file" in missing.detail
    profile = parse_profile(f"name: x\nattestation: {{test_root_ca: {open_dir}/root.pem}}\n"
                            "enclave:\n  address: 10.77.0.2/30\n")
    assert {c.name: c.ok for c in local_checks(profile)}["test root CA"] is False


def test_a_test_root_ca_behind_a_link_others_could_repoint_is_refused(base: Path) -> None:
    """Review finding: a directory others may write that holds a link in the middle of the
    chain (safe/root.pem -> w/l2 -> real/root.pem) was never checked."""
    from wgvsock.roles.parent import test_root_check

    safe, w, real = (base / n for n in ("safe", "w", "real"))
    for d in (safe, w, real):
        d.mkdir(mode=0o700)
    (real / "root.pem").write_text("x")
    (w / "l2").symlink_to(real / "root.pem")
    (safe / "root.pem").symlink_to(w / "l2")
    assert test_root_check(str(safe / "root.pem")).ok is True
    w.chmod(0o777)
    check = test_root_check(str(safe / "root.pem"))
    assert check.ok is False, check
    assert f"{w} is writable by group and others (mode 777)" in check.detail, check
    assert f"chmod go-w {w}" in check.detail, check


def test_the_fix_named_for_another_users_file_is_to_give_it_to_this_user(
        monkeypatch, base: Path) -> None:
    """It said `chown root FILE` whoever ran the check; as another user, what passes is a
    file of their own (or root's), and they cannot give one to root."""
    from wgvsock.roles.parent import test_root_check

    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    (base / "root.pem").write_text("x")
    os.chown(base / "root.pem", 65534, 65534)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    check = test_root_check(str(base / "root.pem"))
    assert check.ok is False and f"{base}/root.pem is owned by uid 65534" in check.detail
    assert f"chown 4242 {base}/root.pem" in check.detail, check
    assert "chown root" not in check.detail, check


def test_the_test_root_is_read_after_its_check_and_must_be_a_certificate(base: Path) -> None:
    """What `up` and each reload read once (Parent.load_test_root), and refuse."""
    from tests.attest_fixtures import make_test_ca
    from wgvsock.roles.parent import RoleError, read_test_root

    assert read_test_root(None) is None
    safe = base / "ca"
    safe.mkdir(mode=0o700)
    ca = make_test_ca()
    path = str(ca.write_root(safe))
    assert read_test_root(path) == (path, ca.root_cert)
    (safe / "test-root.pem").write_text("not a certificate")
    with pytest.raises(RoleError, match=f"attestation.test_root_ca {path}: the trusted root is "
                                        "not a certificate"):
        read_test_root(path)
    safe.chmod(0o777)
    with pytest.raises(RoleError, match=f"{safe} is writable by group"):
        read_test_root(path)


# -- the doctor's check of the parent's key ----------------------------------------------------


def test_the_doctor_checks_the_parents_key_as_up_would_take_it(base: Path) -> None:
    """`parent doctor` said nothing of parent.private_key: a key file others could read, one
    of another user, one that is no key or that the pin refuses passed the doctor and failed
    `parent up`. The doctor judges it as `up` does, and never creates it."""
    from wgvsock.core.crypto import generate_private_key, key_to_base64, public_key
    from wgvsock.roles.parent import parent_key_check

    key_file = base / "parent.key"
    key = generate_private_key()

    def check(pin: bytes | None = None):
        pinned = f"  public_key: {key_to_base64(pin)}\n" if pin is not None else ""
        return parent_key_check(_parent(f"  private_key: {key_file}\n{pinned}"))

    c = check()
    assert c.ok is True and "does not exist yet: `parent up` creates it" in c.detail, c
    assert not key_file.exists()
    c = check(public_key(key))
    assert c.ok is False and "parent.public_key is pinned" in c.detail, c
    key_file.write_text(key_to_base64(key) + "\n")
    key_file.chmod(0o644)
    c = check()
    assert c.ok is False and f"chmod 600 {key_file}" in c.detail, c
    key_file.chmod(0o600)
    c = check(public_key(key))
    assert c.ok is True and "matches parent.public_key" in c.detail, c
    c = check(public_key(generate_private_key()))
    assert c.ok is False and "the enclave would refuse this parent" in c.detail, c
    assert key_to_base64(key) not in c.detail
    os.chown(key_file, 65534, 65534)
    c = check()
    assert c.ok is False and "owned by uid 65534" in c.detail, c
    os.chown(key_file, 0, 0)
    key_file.write_text("not a key\n")
    c = check()
    assert c.ok is False and "expected the output of `wg genkey`" in c.detail, c


def _key_in_a_root_only_directory(base: Path) -> tuple[Path, bytes]:
    """A parent key in a directory made as `parent up` makes it (0700, root's): the directory
    and the key."""
    from wgvsock.core.crypto import generate_private_key, key_to_base64

    keys = base / "wgvsock"
    keys.mkdir(mode=0o700)
    key = generate_private_key()
    (keys / "a.key").write_text(key_to_base64(key) + "\n")
    (keys / "a.key").chmod(0o600)
    return keys, key


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory only root may "
                    "search, and to run the check as another user")
def test_the_doctor_as_another_user_does_not_take_a_key_it_cannot_see_for_a_missing_one(
        base: Path) -> None:
    """`parent up` makes the directories of a new key 0700 (51eb259); the doctor run without
    root then could not look in them, took the key for missing, and said "does not exist
    yet: `parent up` creates it" (passed), or with a pin "does not exist ... Restore the key
    file": of a key that is there."""
    import subprocess
    import sys

    from wgvsock.core.crypto import key_to_base64, public_key

    keys, key = _key_in_a_root_only_directory(base)
    probe = (
        "import sys\n"
        "from wgvsock.roles.parent import parent_key_check\n"
        "from wgvsock.services.profile import parse_profile\n"
        "c = parent_key_check(parse_profile(sys.argv[1]))\n"
        "print(c.ok, c.detail)\n")
    for pinned in ("", f"  public_key: {key_to_base64(public_key(key))}\n"):
        text = f"name: a\nparent:\n  private_key: {keys / 'a.key'}\n{pinned}"
        out = subprocess.run([sys.executable, "-c", probe, text], capture_output=True,
                             text=True, timeout=60, user=65534, group=65534,
                             env={**os.environ}).stdout
        assert out.startswith("False "), out
        assert "does not exist" not in out and "Permission denied" in out, out



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory only root may "
                    "search, and to run up as another user")
def test_up_as_another_user_does_not_take_a_pinned_key_it_cannot_see_for_a_missing_one(
        base: Path) -> None:
    """The doctor learnt that a key in a directory its user may not search is not a missing
    one (bc0371b); `parent up` with a pinned key still asked lexists(), and said "does not
    exist ... Restore the key file" of a key that is there. It now says what it could not do,
    in the doctor's words."""
    import subprocess
    import sys

    from wgvsock.core.crypto import key_to_base64, public_key

    keys, key = _key_in_a_root_only_directory(base)
    probe = (
        "import sys\n"
        "import wgvsock.roles.parent as parent\n"
        "from wgvsock.services.profile import parse_profile\n"
        "def made(*args, **kwargs):\n"
        "    raise AssertionError('up went on to make its transport')\n"
        "parent.local_checks = lambda profile: []\n"
        "parent.make_bind = made\n"
        "profile = parse_profile(sys.argv[1])\n"
        "try:\n"
        "    parent.Parent(profile).start()\n"
        "except parent.RoleError as e:\n"
        "    print('up:', e)\n"
        "print('doctor:', parent.parent_key_check(profile).detail)\n")
    text = (f"name: a\ntransport: {{kind: unix, path: {base}/s}}\nparent:\n"
            f"  private_key: {keys / 'a.key'}\n"
            f"  public_key: {key_to_base64(public_key(key))}\n")
    res = subprocess.run([sys.executable, "-c", probe, text], capture_output=True, text=True,
                         timeout=60, user=65534, group=65534, env={**os.environ})
    up = [line for line in res.stdout.splitlines() if line.startswith("up: ")]
    assert up, res.stdout + res.stderr
    assert "does not exist" not in up[0] and "Permission denied" in up[0], up[0]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to leave a root-owned socket directory and setpriv to "
                    "run up as another user")
def test_up_without_sudo_says_to_run_as_root_not_to_chown_roots_socket_directory(
        base: Path) -> None:
    """`parent up` run by a user who forgot sudo, after a run as root had made the Unix
    stand-in's socket directory, was refused with "`chown 65534 .../s`" beside "run as root":
    the chown hands root's directory to the user, the wrong fix. It now leads with sudo, and
    says nothing of the directories it judged for the wrong user. The real CLI, in a network
    namespace of its own, as uid 65534."""
    base.chmod(0o755)  # 65534 reads the profile through it
    sockets = base / "s"
    sockets.mkdir(mode=0o700)  # root's, as `up` as root makes it
    profile = base / "p.yaml"
    profile.write_text(f"name: {PREFIX}nr\ntransport: {{kind: unix, path: {sockets}}}\n"
                       f"parent:\n  private_key: {base / 'k'}\n")
    profile.chmod(0o644)
    res = subprocess.run(
        ["unshare", "--net", "setpriv", "--reuid", "65534", "--regid", "65534",
         "--clear-groups", sys.executable, "-m", "wgvsock", "parent", "up", "--profile",
         str(profile)], capture_output=True, text=True, timeout=60, env={**os.environ})
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if not line.startswith("warning:")]
    assert lines == [f"wgvsock parent up: profile '{PREFIX}nr': parent up must run as root "
                     "(sudo)"], res.stderr
    assert not (base / "k").exists()


def test_up_in_the_background_shows_the_profiles_warnings(base: Path, monkeypatch,
                                                           capsys) -> None:
    """An allow entry a deny entry covers whole is a warning that `parent up` logs (5e1e9b7),
    but `up` started in the background logs nowhere the operator looks (its output goes to
    /dev/null without $WGVSOCK_LOG_FILE): the warning was shown to nobody. The command that
    starts it prints it, as it prints the route warnings."""
    from wgvsock import daemon
    from wgvsock.roles import cli, state
    from wgvsock.services import profile as profile_mod

    path = base / "p.yaml"
    path.write_text("name: x\nparent:\n  egress:\n    allow: [10.1.0.0/16]\n"
                    "    deny: [10.0.0.0/8]\n")
    started: list[list[str]] = []
    monkeypatch.setattr(state, "already_up", lambda profile: None)
    for name in ("local_networks", "local_routes"):
        monkeypatch.setattr(profile_mod, name, lambda exclude_interface=None: [])
    monkeypatch.delenv("WGVSOCK_READY_FD", raising=False)
    monkeypatch.setattr(daemon, "spawn_background",
                        lambda args, prog, **kw: started.append(args) or 0)
    assert cli.parent_main(["up", "--profile", str(path)]) == 0
    assert started
    err = capsys.readouterr().err
    assert "warning: " in err and "'10.1.0.0/16' is never allowed" in err, err


# -- a key another user could swap: a warning ---------------------------------------------------


def _key_under_another_users_directory(base: Path) -> tuple[Path, bytes]:
    """A root-owned 0600 key in root's 0700 directory, under a directory uid 65534 owns (a
    home, as a rule): the key, and the key in it."""
    from wgvsock.core.crypto import generate_private_key, key_to_base64

    home = base / "home"
    home.mkdir(mode=0o755)
    os.chown(home, 65534, 65534)
    keys = home / "wg"
    keys.mkdir(mode=0o700)
    key = generate_private_key()
    (keys / "a.key").write_text(key_to_base64(key) + "\n")
    (keys / "a.key").chmod(0o600)
    return keys / "a.key", key


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_key_another_user_could_swap_is_a_warning_not_a_refusal(base: Path) -> None:
    """The socket directories, the state directory, the EIF and the test root are walked
    from / and refused when a user other than root could swap what they name; the parent's
    key was not: uid 65534, owner of a directory on its way, could rename `wg` away and put a
    key of their own there, which root's `parent up` would take on. Said by the doctor as a
    warning; the key still loads (existing setups keep working)."""
    from wgvsock.roles.parent import key_path_warning, load_parent_key, parent_key_check

    key_file, key = _key_under_another_users_directory(base)
    c = parent_key_check(_parent(f"  private_key: {key_file}\n"))
    assert c.ok is True and c.warning, c
    assert f"{base}/home is owned by uid 65534" in c.detail, c
    assert "replace the key" in c.detail and "/etc/wgvsock" in c.detail, c
    assert f"chown root {base}/home" in c.detail, c
    assert load_parent_key(str(key_file), create=False) == key
    # One not made yet would be made there: the same.
    assert f"{base}/home is owned by uid 65534" in (
        key_path_warning(str(key_file.with_name("new.key"))) or "")
    # A link others own on the way, where the key is safe.
    safe, _ = _key_in_a_root_only_directory(base)
    link = base / "link.key"
    link.symlink_to(safe / "a.key")
    os.lchown(link, 65534, 65534)
    assert f"{link} is a symbolic link owned by uid 65534" in (key_path_warning(str(link)) or "")
    os.lchown(link, 0, 0)
    # Root's all the way: nothing to say; nor of ssm: keys, nor of the key file's own faults,
    # which load_parent_key refuses in its own words.
    c = parent_key_check(_parent(f"  private_key: {safe / 'a.key'}\n"))
    assert c.ok is True and not c.warning, c
    assert key_path_warning(str(link)) is None
    assert key_path_warning("ssm:/wgvsock/key") is None
    (safe / "a.key").chmod(0o640)
    assert key_path_warning(str(safe / "a.key")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_up_logs_and_the_background_launcher_prints_a_key_others_could_swap(
        base: Path, monkeypatch, capsys, caplog) -> None:
    import logging

    from wgvsock import daemon
    from wgvsock.roles import cli, parent, state
    from wgvsock.services import profile as profile_mod

    key_file, _ = _key_under_another_users_directory(base)
    path = base / "p.yaml"
    path.write_text(f"name: x\ntransport: {{kind: unix, path: {base}/s}}\n"
                    f"parent:\n  private_key: {key_file}\n")
    # The launcher: the background process logs where nobody may look.
    monkeypatch.setattr(state, "already_up", lambda profile: None)
    for name in ("local_networks", "local_routes"):
        monkeypatch.setattr(profile_mod, name, lambda exclude_interface=None: [])
    monkeypatch.delenv("WGVSOCK_READY_FD", raising=False)
    monkeypatch.setattr(daemon, "spawn_background", lambda args, prog, **kw: 0)
    assert cli.parent_main(["up", "--profile", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: private key {key_file}: {base}/home is owned by uid 65534" in err, err

    # `up` itself, in its log: stopped where it would make its transport.
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(parent, "local_checks", lambda profile: [])
    monkeypatch.setattr(parent, "make_bind", stop)
    with caplog.at_level(logging.WARNING, logger="wgvsock.parent"), pytest.raises(Stop):
        parent.Parent(profile_mod.load_profile(str(path))).start()
    assert f"private key {key_file}: {base}/home is owned by uid 65534" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_profile_check_host_warns_of_a_key_others_could_swap(base: Path, monkeypatch,
                                                              capsys) -> None:
    from wgvsock import cli as main_cli
    from wgvsock.services import profile as profile_mod

    key_file, _ = _key_under_another_users_directory(base)
    path = base / "p.yaml"
    path.write_text(f"name: x\nparent:\n  private_key: {key_file}\n"
                    "enclave:\n  address: 10.77.0.2/30\n")
    monkeypatch.setattr(profile_mod, "local_networks", lambda exclude_interface=None: [])
    monkeypatch.setattr(profile_mod, "local_routes",
                        lambda exclude_interface=None: [ipaddress.ip_network("0.0.0.0/0")])
    assert main_cli.main(["profile", "check", str(path), "--host"]) == 0
    err = capsys.readouterr().err
    assert f"warning: private key {key_file}: {base}/home is owned by uid 65534" in err, err
    # Without --host, the file alone is checked, as before.
    assert main_cli.main(["profile", "check", str(path)]) == 0
    assert "private key" not in capsys.readouterr().err


# -- a read-only file system with nothing above the path but / ----------------------------------

_UNDER_READ_ONLY_ROOT = """
import sys
from wgvsock.roles.parent import RoleError, load_parent_key, local_checks
from wgvsock.services.profile import parse_profile

sock, key_dir, key_at_root = sys.argv[1:]
profile = parse_profile(f"name: x\\ntransport:\\n  kind: unix\\n  path: {sock}\\n"
                        "enclave:\\n  address: 10.77.0.2/30\\n")
print({c.name: c for c in local_checks(profile)}["socket directories"].detail)
for key in (f"{key_dir}/parent.key", key_at_root):
    try:
        load_parent_key(key, create=True)
    except RoleError as e:
        print(e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root")
def test_a_read_only_fix_never_says_read_write_paths_of_the_root() -> None:
    """The fix named ReadWritePaths= of the nearest directory that exists, which for a path
    whose first directory is missing is / itself: `ReadWritePaths=/` undoes the unit's
    ProtectSystem=strict altogether. Now it says to make the directory first and add only it
    (or, for a key right in /, where keys go instead). / read-only in a mount namespace of the
    test's own (a bind remount: the flag is that mount's, not the file system's)."""
    absent = Path(f"/wgvsock-absent-{os.getpid()}")
    sock, keys, key_at_root = absent / "sockets", absent / "keys", f"{absent}.key"
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -o remount,bind,ro / && exec "$@"', "sh",
         sys.executable, "-c", _UNDER_READ_ONLY_ROOT, str(sock), str(keys), key_at_root],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 0, res.stderr
    edit = "with `systemctl edit wgvsock-parent@NAME`)"
    assert res.stdout.splitlines() == [
        f"transport.path {sock} is on a read-only file system, where the parent cannot make "
        "its sockets (under wgvsock-parent@.service sockets may go under /run/wgvsock: leave "
        "transport.path out (its default is /run/wgvsock/x), or make "
        f"{sock} first (`mkdir -p -m 0700 {sock}`) and add `ReadWritePaths={sock}` {edit}",
        f"cannot create private key {keys}/parent.key: Read-only file system (under "
        "wgvsock-parent@.service only /etc/wgvsock is writable: keep the key there, or make "
        f"{keys} first (`mkdir -p -m 0700 {keys}`) and add `ReadWritePaths={keys}` {edit}",
        f"cannot create private key {key_at_root}: Read-only file system (under "
        "wgvsock-parent@.service only /etc/wgvsock is writable: keep the key there)",
    ], res.stdout
    assert not absent.exists() and not Path(key_at_root).exists()


# -- an ingress port a service of the host listens on ------------------------------------------


_LISTEN = """\
import socket, sys, time
kind = socket.SOCK_STREAM if sys.argv[3] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.bind((sys.argv[1], int(sys.argv[2])))
if kind == socket.SOCK_STREAM:
    s.listen()
print("listening", flush=True)
time.sleep(600)
"""


@pytest.mark.root
def test_an_ingress_port_a_service_of_the_host_listens_on_is_warned_of(lab) -> None:
    """`parent.ingress: [{listen: 8443}]` on a host whose own service listens on 8443 (or 22,
    its sshd): the DNAT takes that port on every address but loopback, so once the parent was
    up other hosts reached the enclave there and the service no more; neither `parent up` nor
    `parent doctor` said a word. A listener on loopback only is not taken, and is not named."""
    ns = _host(lab, "ing")
    held = {("0.0.0.0", "8443", "tcp"), ("192.0.2.5", "5353", "udp"), ("127.0.0.1", "8080", "tcp")}
    for addr, port, proto in held:
        p = ns.popen(sys.executable, "-c", _LISTEN, addr, port, proto, stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"listening\n"
    (lab.tmp / "state").mkdir(mode=0o700)
    profile = lab.tmp / "p.yaml"
    profile.write_text(
        f"name: {PREFIX}ing{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
        f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n  ingress:\n"
        "    - {listen: 8443, to: 443}\n    - {listen: 5353, protocol: udp}\n"
        "    - {listen: 8080}\n    - {listen: 9443}\n")
    env = _parent_env(lab)
    wgvsock = [sys.executable, "-m", "wgvsock.cli", "parent"]
    said = ("parent.ingress[0] 8443/tcp: python", "(0.0.0.0:8443), which ingress "
            "forwards to the enclave on every address of the host but loopback: with the "
            "parent up, other hosts (and this one, at its own addresses) reach the enclave "
            "there instead of it. Choose another listen port, unless that is meant",
            "parent.ingress[1] 5353/udp: python", "(192.0.2.5:5353)")
    res = ns.run(*wgvsock, "doctor", "--profile", str(profile), env=env, check=False)
    row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
    assert "WARNING" in row and all(s in row for s in said), res.stdout
    assert "8080" not in row and "9443" not in row
    try:
        res = ns.run(*wgvsock, "up", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0, res.stderr
        warned = [line for line in res.stderr.splitlines() if "parent.ingress" in line]
        assert len(warned) == 2 and all(line.startswith("warning: ") for line in warned)
        assert all(s in res.stderr for s in said), res.stderr
        # A reload says it again: it is where a port newly forwarded takes effect.
        res = ns.run(*wgvsock, "reload", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0, res.stderr
        assert all(s in res.stderr for s in said), res.stderr
    finally:
        ns.run(*wgvsock, "down", "--profile", str(profile), env=env, check=False)



_BOUND = """\
import socket, sys, time
for spec in sys.argv[1:]:
    addr, port, proto = spec.split(",")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND: an address the host does not have
    s.bind((addr, int(port)))
    if proto == "tcp":
        s.listen()
    globals().setdefault("held", []).append(s)
print("listening", flush=True)
time.sleep(600)
"""


@pytest.mark.root
def test_an_ingress_port_bound_where_the_dnat_never_takes_it_is_not_warned_of(lab) -> None:
    """The DNAT takes only traffic to the host's own addresses (`fib daddr type local`). A
    socket bound to a multicast group (mDNS's 224.0.0.251), to a broadcast address, or to an
    address the host does not have (IP_FREEBIND, a VIP not yet moved here) gets nothing the
    DNAT takes, but `doctor` and `up` warned it was cut off. And ss named processes for every
    ingress entry, reading every descriptor of every process of the host each time (2 s for
    190,000 of them here): now ss runs once for each protocol, naming processes only once
    something is found to name."""
    ns = _host(lab, "bnd")
    p = ns.popen(sys.executable, "-c", _BOUND, "224.0.0.251,5353,udp", "192.0.2.255,6000,udp",
                 "198.51.100.7,8443,tcp", "192.0.2.5,9443,tcp", stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"listening\n"
    shim = lab.tmp / "bin"
    shim.mkdir()
    (shim / "ss").write_text(f"#!/bin/sh\necho \"$*\" >> {lab.tmp}/ss.log\n"
                             f"exec {shutil.which('ss')} \"$@\"\n")
    (shim / "ss").chmod(0o755)
    profile = lab.tmp / "p.yaml"
    ingress = "".join(f"    - {{listen: {port}, protocol: {proto}}}\n" for port, proto in (
        (5353, "udp"), (6000, "udp"), (8443, "tcp"), (9000, "tcp"), (9001, "tcp")))
    profile.write_text(
        f"name: {PREFIX}bnd{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
        f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n  ingress:\n"
        + ingress)
    env = _parent_env(lab, PATH=f"{shim}:{os.environ['PATH']}")
    doctor = [sys.executable, "-m", "wgvsock.cli", "parent", "doctor", "--profile", str(profile)]
    res = ns.run(*doctor, env=env, check=False)
    row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
    assert "WARNING" not in row and "no service of this host listens on 5353/udp" in row, row
    runs = (lab.tmp / "ss.log").read_text().splitlines()
    ingress_runs = [r for r in runs if "9001" in r or "6000" in r]
    assert [r.split()[0] for r in ingress_runs] == ["-Hln", "-Hln"], runs  # no -p
    # One that is taken (the host's own address) is still named, in one more run of ss.
    profile.write_text(profile.read_text() + "    - {listen: 9443}\n")
    (lab.tmp / "ss.log").unlink()
    res = ns.run(*doctor, env=env, check=False)
    row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
    assert "WARNING" in row and "parent.ingress[5] 9443/tcp: python" in row, row
    assert "(192.0.2.5:9443)" in row and "5353" not in row and "8443" not in row, row
    runs = [r for r in (lab.tmp / "ss.log").read_text().splitlines() if "9443" in r]
    assert [r.split()[0] for r in runs] == ["-Hln", "-Hlnp"], runs



@pytest.mark.root
def test_an_ingress_port_held_under_a_crashed_parents_pid_is_warned_of(lab) -> None:
    """The check passes over the profile's own parent (its DNS forwarder) by the pid its state
    file records. After a crash (kill -9) that file stays, and its pid may be another
    process's by now: one listening on an ingress port went unnamed, taken for the parent."""
    ns = lab.netns("pid")
    p = ns.popen(sys.executable, "-c", _LISTEN, "0.0.0.0", "8443", "tcp",
                 stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"listening\n"
    name = f"{PREFIX}pid{os.getpid() % 10000}"
    profile = lab.tmp / "p.yaml"
    profile.write_text(f"name: {name}\ntransport:\n  kind: unix\n  path: {lab.tmp}/sock\n"
                       f"parent:\n  private_key: {lab.tmp}/p.key\n  ingress:\n"
                       "    - {listen: 8443}\n")
    (lab.tmp / "state").mkdir(mode=0o700)
    # The crashed parent's: its pid is the listener's now, the start time another process's.
    (lab.tmp / "state" / f"{name}.json").write_text(json.dumps(
        {"name": name, "pid": p.pid, "interface": "wg0", "profile": str(profile),
         "started": 1}))
    env = _parent_env(lab)
    res = ns.run(sys.executable, "-m", "wgvsock.cli", "parent", "doctor", "--profile",
                 str(profile), env=env, check=False)
    row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
    assert "WARNING" in row and f"8443/tcp: python (pid {p.pid})" in row, res.stdout



_FAMILIES = """\
import socket, time
held = []
for port, v6only in ((7001, 1), (7002, 0)):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind(("::", port))
    s.listen()
    held.append(s)
print("listening", flush=True)
time.sleep(600)
"""


@pytest.mark.root
def test_an_ingress_port_is_warned_of_only_in_a_family_the_dnat_takes(lab) -> None:
    """An enclave with IPv4 only: the DNAT takes IPv4 alone, so an IPv6-only listener on
    the port ([::]:7001, IPV6_V6ONLY) keeps its clients and is not named, while a dual-stack
    one (*:7002, which takes IPv4 too) is."""
    ns = lab.netns("fam")
    p = ns.popen(sys.executable, "-c", _FAMILIES, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"listening\n"
    profile = lab.tmp / "p.yaml"
    profile.write_text(
        f"name: {PREFIX}fam{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
        f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n  ingress:\n"
        "    - {listen: 7001}\n    - {listen: 7002}\n"
        "enclave:\n  address: 10.77.0.2/30\n")
    env = _parent_env(lab)
    res = ns.run(sys.executable, "-m", "wgvsock.cli", "parent", "doctor", "--profile",
                 str(profile), env=env, check=False)
    row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
    assert "WARNING" in row and "parent.ingress[1] 7002/tcp: python" in row, res.stdout
    assert "(*:7002)" in row and "7001" not in row, row



@pytest.mark.root
def test_a_listener_at_the_tunnel_address_is_warned_of_in_words_true_of_it(lab) -> None:
    """A service bound to the parent's tunnel address only (10.77.0.1) was said to be lost to
    "other hosts (and this one, at its own addresses)": other hosts reach that address only if
    routed to it through the parent, and the DNAT passes over what comes in by the tunnel. Who
    loses it is this host's own processes, whose connections there the output hook forwards
    to the enclave (shown: one never reaches the listener). A wildcard listener keeps the
    old words."""
    ns = lab.netns("tun")
    (lab.tmp / "state").mkdir(mode=0o700)
    name = f"{PREFIX}tun{os.getpid() % 10000}"
    profile = lab.tmp / "p.yaml"
    profile.write_text(
        f"name: {name}\ntransport:\n  kind: unix\n  path: {lab.tmp}/sock\n"
        f"parent:\n  address: 10.77.0.1/30\n  private_key: {lab.tmp}/p.key\n  ingress:\n"
        "    - {listen: 8443}\n    - {listen: 9443}\nenclave:\n  address: 10.77.0.2/30\n")
    env = _parent_env(lab)
    wgvsock = [sys.executable, "-m", "wgvsock.cli", "parent"]
    try:
        res = ns.run(*wgvsock, "up", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0, res.stderr
        # The tunnel address is the host's only while the parent is up.
        for addr, port in (("10.77.0.1", "8443"), ("0.0.0.0", "9443")):
            p = ns.popen(sys.executable, "-c", _LISTEN, addr, port, "tcp",
                         stdout=subprocess.PIPE)
            assert p.stdout is not None and p.stdout.readline() == b"listening\n"
        res = ns.run(*wgvsock, "reload", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0, res.stderr
        warned = [line for line in res.stderr.splitlines() if "parent.ingress" in line]
        assert len(warned) == 2, res.stderr
        assert "(10.77.0.1:8443), the parent's tunnel address, which ingress forwards to the " \
               "enclave for all but the enclave: with the parent up, this host's own " \
               "processes (and any host routed to that address through this one) reach the " \
               "enclave there instead of it; the enclave's own connections to it are not " \
               "forwarded, and pass where parent.egress.allow names that address." in \
               warned[0], warned[0]
        assert "other hosts (and this one" not in warned[0], warned[0]
        assert "(0.0.0.0:9443), which ingress forwards to the enclave on every address of " \
               "the host but loopback: with the parent up, other hosts (and this one, at " \
               "its own addresses) reach the enclave there instead of it" in warned[1], warned[1]
        res = ns.run(*wgvsock, "doctor", "--profile", str(profile), env=env, check=False)
        row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
        assert "the parent's tunnel address" in row, row
        # What the words say of this host: its own connection to the tunnel address goes to
        # the (absent) enclave, never to the listener there.
        probe = ("import socket, sys\n"
                 "s = socket.socket()\ns.settimeout(2)\n"
                 "try:\n    s.connect(('10.77.0.1', 8443))\n    print('reached')\n"
                 "except OSError as e:\n    print('not reached', type(e).__name__)\n")
        out = ns.run(sys.executable, "-c", probe, check=False).stdout
        assert out.startswith("not reached"), out
    finally:
        ns.run(*wgvsock, "down", "--profile", str(profile), env=env, check=False)


@pytest.mark.root
def test_the_parents_own_dns_forwarder_on_an_ingress_port_is_not_warned_of(lab) -> None:
    """With names in parent.egress the parent's DNS forwarder listens on port 53 of its
    tunnel address, which the DNAT passes over for the enclave (it comes in by the tunnel).
    An ingress port 53 is not the forwarder's clash: `doctor` and `reload` with the parent up
    name no listener there (it is told apart by the pid and start time its state records)."""
    ns = _host(lab, "own")
    (lab.tmp / "state").mkdir(mode=0o700)
    profile = lab.tmp / "p.yaml"
    profile.write_text(
        f"name: {PREFIX}own{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
        f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n  egress:\n"
        "    allow: [example.com]\n    resolver: [192.0.2.53]\n  ingress:\n"
        "    - {listen: 53, protocol: udp}\n    - {listen: 53, protocol: tcp}\n")
    env = _parent_env(lab)
    wgvsock = [sys.executable, "-m", "wgvsock.cli", "parent"]
    try:
        res = ns.run(*wgvsock, "up", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0 and "parent.ingress" not in res.stderr, res.stderr
        pid = json.loads((lab.tmp / "state" / f"{PREFIX}own{os.getpid() % 10000}.json")
                         .read_text())["pid"]
        held = ns.run("ss", "-Hlnup", "sport = :53").stdout
        assert f"pid={pid}," in held, held  # the forwarder is there, and the parent's
        res = ns.run(*wgvsock, "doctor", "--profile", str(profile), env=env, check=False)
        row = next(line for line in res.stdout.splitlines() if "ingress ports" in line)
        assert "no service of this host listens on 53/udp, 53/tcp" in row, res.stdout
        res = ns.run(*wgvsock, "reload", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0 and "parent.ingress" not in res.stderr, res.stderr
    finally:
        ns.run(*wgvsock, "down", "--profile", str(profile), env=env, check=False)


@pytest.mark.root
def test_up_in_the_background_warns_of_a_forward_chain_that_drops_the_tunnel(lab) -> None:
    """Docker's `ip filter FORWARD` with policy drop drops everything the enclave sends
    through the parent. `parent up -f` logs that, but `parent up` in the background logged it
    where nobody looks (nowhere without $WGVSOCK_LOG_FILE): the tunnel came up, said nothing
    and carried nothing. The launching command prints it now, as it prints the profile's."""
    ns = lab.netns("fwd")
    ns.run("nft", "add table ip filter { chain FORWARD { type filter hook forward priority 0; "
           "policy drop; }; }")
    (lab.tmp / "state").mkdir(mode=0o700)
    profile = lab.tmp / "p.yaml"
    profile.write_text(f"name: {PREFIX}fwd{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
                       f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n")
    env = _parent_env(lab)
    wgvsock = [sys.executable, "-m", "wgvsock.cli", "parent"]
    try:
        res = ns.run(*wgvsock, "up", "--profile", str(profile), env=env, check=False)
        assert res.returncode == 0, res.stderr
        assert "warning: profile '" in res.stderr, res.stderr
        assert ("': ip filter FORWARD has policy drop, with no accept for wg0: the enclave's "
                "forwarded traffic is dropped there whatever wgvsock's table allows. Accept "
                "the tunnel before the drop: with Docker, `iptables -I DOCKER-USER -i wg0 -j "
                "ACCEPT`") in res.stderr, res.stderr
    finally:
        ns.run(*wgvsock, "down", "--profile", str(profile), env=env, check=False)


@pytest.mark.root
def test_a_parent_that_fails_to_start_in_the_background_says_so_once(lab) -> None:
    """`wgvsock parent up: parent up (profile 'x'): private key ...: key is not valid base64`:
    the launcher's name, then the background process's own "parent up" again."""
    ns = lab.netns("bad")
    (lab.tmp / "state").mkdir(mode=0o700)
    key = lab.tmp / "p.key"
    key.write_text("not a key\n")
    key.chmod(0o600)
    name = f"{PREFIX}bad{os.getpid() % 10000}"
    profile = lab.tmp / "p.yaml"
    profile.write_text(f"name: {name}\ntransport:\n  kind: unix\n  path: {lab.tmp}/sock\n"
                       f"parent:\n  private_key: {key}\nenclave:\n  routes: [10.77.0.0/30]\n"
                       "  dns: [10.77.0.1]\n")
    env = _parent_env(lab)
    res = ns.run(sys.executable, "-m", "wgvsock.cli", "parent", "up", "--profile", str(profile),
                 env=env, check=False)
    assert res.returncode == 1
    assert res.stderr == (f"wgvsock parent up: profile '{name}': private key {key}: key is not "
                          "valid base64 (expected the output of `wg genkey`)\n")


@pytest.mark.root
def test_the_doctor_shows_the_profiles_own_warnings(lab) -> None:
    """An allow entry a deny entry covers whole is a warning `profile check` and `up` print;
    the doctor's profile row called that profile plainly "valid, no overlap ...", ready."""
    ns = lab.netns("doc")
    profile = lab.tmp / "p.yaml"
    profile.write_text(f"name: {PREFIX}doc{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
                       f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n"
                       "  egress:\n    allow: [0.0.0.0/0, 10.1.0.0/16]\n    deny: [10.0.0.0/8]\n")
    env = _parent_env(lab)
    res = ns.run(sys.executable, "-m", "wgvsock.cli", "parent", "doctor", "--profile",
                 str(profile), env=env, check=False)
    row = next(line for line in res.stdout.splitlines() if line.startswith("│ profile "))
    assert "WARNING" in row, row
    assert (f"{profile}:8: parent.egress.allow[1]: '10.1.0.0/16' is never allowed: "
            "parent.egress.deny[0] ('10.0.0.0/8') denies all of it") in row, row


@pytest.mark.root
def test_up_names_an_egress_interface_the_host_lacks_once(lab) -> None:
    """It read "profile 'x': egress interface: FILE:12: parent.egress.interface: this host
    has no interface ...": the profile, then the check's name, then the file and the key, each
    saying where again. Now the file, line and key alone, as `profile check` says a problem."""
    ns = lab.netns("egi")
    profile = lab.tmp / "p.yaml"
    profile.write_text(f"name: {PREFIX}egi{os.getpid() % 10000}\ntransport:\n  kind: unix\n"
                       f"  path: {lab.tmp}/sock\nparent:\n  private_key: {lab.tmp}/p.key\n"
                       "  egress:\n    interface: nosuch0\n")
    env = _parent_env(lab)
    said = (f"{profile}:8: parent.egress.interface: this host has no interface nosuch0, so "
            "nothing would be masqueraded — name the one the enclave's traffic leaves by "
            "(`ip -br link`), or remove the key to use the default route's")
    for foreground in ([], ["-f"]):
        res = ns.run(sys.executable, "-m", "wgvsock.cli", "parent", "up", "--profile",
                     str(profile), *foreground, env=env, check=False, timeout=60)
        lines = [line for line in res.stderr.splitlines() if not line.startswith("warning: ")]
        assert res.returncode == 1 and lines[-1].endswith(said), res.stderr
        assert lines[-1] in (f"wgvsock parent up: {said}", f"ERROR wgvsock.parent: {said}"), \
            res.stderr
        assert "Traceback" not in res.stderr
