"""Issue 12, items 2 and 12: pinning the parent's key in the profile, and the parent's key file.

End to end (an impostor parent refused by `enclave up`, `parent up` refusing a key that does
not match the pin) is in tests/net/test_roles_pinning.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wgvsock import cli
from wgvsock.core.crypto import generate_private_key, key_to_base64, public_key
from wgvsock.roles.enclave import Enclave
from wgvsock.roles.parent import RoleError, check_pinned_key, load_parent_key
from wgvsock.services.control import ControlError, Welcome
from wgvsock.services.profile import ProfileError, parse_profile, set_parent_public_key

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = generate_private_key()
PUB = key_to_base64(public_key(PRIVATE))
OTHER = key_to_base64(public_key(generate_private_key()))


def write_key(path: Path, key: bytes = PRIVATE, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(key_to_base64(key) + "\n")
    return path


@pytest.mark.parametrize("text", [
    "name: a\n",
    "name: a\nparent: {address: 10.9.0.1/30}\n",
    "name: a\nparent: null\n",
    "name: a\nparent:\n  public_key:\n  egress: {deny: []}\n",
    f"name: a\nparent:\n  public_key: {OTHER}  # old key\n",
    "name: a\nparent:\n    address: 10.9.0.1/30\n    private_key: /k\n",
])
def test_set_parent_public_key_keeps_the_rest(text):
    new = set_parent_public_key(text, PUB)
    assert parse_profile(new).parent.public_key == PUB
    # Everything else resolves as before.
    before, after = parse_profile(text), parse_profile(new)
    assert after.parent.egress == before.parent.egress
    assert after.parent.addresses == before.parent.addresses
    assert set_parent_public_key(new, PUB) == new  # idempotent


def test_set_parent_public_key_keeps_comments_of_the_example():
    text = (ROOT / "parent" / "profile.example.yaml").read_text()
    new = set_parent_public_key(text, PUB)
    old_lines, new_lines = text.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert changed == [("  public_key: null", f"  public_key: {PUB}")]


def test_set_parent_public_key_refuses_a_bad_key():
    with pytest.raises(ProfileError, match="not a WireGuard public key"):
        set_parent_public_key("name: a\n", "abc")


def test_pin_parent_cli_from_the_profiles_key_file(tmp_path, capsys):
    key = write_key(tmp_path / "parent.key")
    profile = tmp_path / "p.yaml"
    profile.write_text(f"# mine\nname: a\nparent:\n  private_key: {key}   # the key\n")
    os.chmod(profile, 0o640)
    assert cli.main(["profile", "pin-parent", str(profile)]) == 0
    out = capsys.readouterr().out
    assert f"parent.public_key: {PUB}" in out
    text = profile.read_text()
    assert text == (f"# mine\nname: a\nparent:\n  private_key: {key}   # the key\n"
                    f"  public_key: {PUB}\n")
    assert profile.stat().st_mode & 0o777 == 0o640
    # --public-key and --key-file name the key directly.
    assert cli.main(["profile", "pin-parent", str(profile), "--public-key", OTHER]) == 0
    assert parse_profile(profile.read_text()).parent.public_key == OTHER
    other_key = generate_private_key()
    write_key(tmp_path / "other.key", other_key)
    assert cli.main(["profile", "pin-parent", str(profile), "--key-file",
                     str(tmp_path / "other.key")]) == 0
    assert parse_profile(profile.read_text()).parent.public_key == key_to_base64(
        public_key(other_key))


def test_pin_parent_says_which_pin_it_replaced(tmp_path, capsys):
    """A profile pinned already, pinned again with another key: it said only the new key, and
    the old one (which the images built so far hold) was gone without a word."""
    profile = tmp_path / "p.yaml"
    profile.write_text(f"name: a\nparent:\n  public_key: {OTHER}\n")
    assert cli.main(["profile", "pin-parent", str(profile), "--public-key", PUB]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{profile}: parent.public_key: {PUB} (replaced the earlier pin {OTHER}, which images "
        "built before still hold)")
    assert cli.main(["profile", "pin-parent", str(profile), "--public-key", PUB]) == 0
    assert capsys.readouterr().out.splitlines()[0] == \
        f"{profile}: parent.public_key: {PUB} (already pinned)"


def test_pin_parent_writes_through_a_symlink_to_the_profile(tmp_path, capsys):
    # The new text replaced the link with a file of its own: the profile it pointed to (the
    # one the image is built from) stayed unpinned while the command said it was pinned.
    real = tmp_path / "profiles" / "payments.yaml"
    real.parent.mkdir()
    real.write_text("name: a\n")
    os.chmod(real, 0o640)
    link = tmp_path / "payments.yaml"
    link.symlink_to(real)
    assert cli.main(["profile", "pin-parent", str(link), "--public-key", PUB]) == 0
    assert link.is_symlink() and link.resolve() == real
    assert parse_profile(real.read_text()).parent.public_key == PUB
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in real.parent.iterdir()) == ["payments.yaml"]  # no temp left
    capsys.readouterr()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file for another user")
def test_pin_parent_under_sudo_leaves_the_profile_its_owners(tmp_path, capsys):
    # README's Quick start pins the profile of the user's clone with sudo: the new file was
    # root's, and the user's next edit of it (for production) was refused.
    profile = tmp_path / "profile.example.yaml"
    profile.write_text("name: a\n")
    os.chown(profile, 1000, 1000)
    assert cli.main(["profile", "pin-parent", str(profile), "--public-key", PUB]) == 0
    assert parse_profile(profile.read_text()).parent.public_key == PUB
    assert (profile.stat().st_uid, profile.stat().st_gid) == (1000, 1000)
    capsys.readouterr()


def test_pin_parent_cli_errors(tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"name: a\nparent: {{private_key: {tmp_path / 'none.key'}}}\n")
    assert cli.main(["profile", "pin-parent", str(profile)]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "none.key").exists()  # never creates a key to pin
    assert cli.main(["profile", "pin-parent", str(profile), "--public-key", "zz"]) == 2
    err = capsys.readouterr().err
    assert "not a WireGuard public key" in err and "wgvsock pubkey < KEYFILE" in err, err
    assert "fill it in with" not in err  # the command it was given


def test_parent_refuses_a_key_that_does_not_match_the_pin(tmp_path):
    profile = parse_profile(f"name: a\nparent: {{public_key: {OTHER}}}\n", "p.yaml")
    with pytest.raises(RoleError, match=re.escape(f"has public key {PUB}, but the profile pins "
                                                  f"parent.public_key {OTHER}")):
        check_pinned_key(profile, PRIVATE)
    check_pinned_key(parse_profile(f"name: a\nparent: {{public_key: {PUB}}}\n"), PRIVATE)
    check_pinned_key(parse_profile("name: a\n"), PRIVATE)  # nothing pinned


def test_enclave_refuses_a_parent_with_another_key():
    enclave = Enclave(parse_profile(f"name: a\nparent: {{public_key: {PUB}}}\n"))
    impostor = Welcome(public_key(generate_private_key()), 820, False)
    with pytest.raises(ControlError,
                       match=re.escape(f"but the profile pins parent.public_key {PUB}")):
        enclave._check_pin(impostor)
    enclave._check_pin(Welcome(public_key(PRIVATE), 820, False))


def test_parent_key_file_mode_and_owner(tmp_path):
    key = write_key(tmp_path / "k", mode=0o640)
    with pytest.raises(RoleError, match="readable by others"):
        load_parent_key(str(key))
    # A mode that lets others write but not read said "readable by others" all the same.
    for mode, how in ((0o620, "writable"), (0o602, "writable"), (0o660, "readable and writable"),
                      (0o610, "open")):
        os.chmod(key, mode)
        with pytest.raises(RoleError, match=f"is {how} by others \\(mode {mode:o}\\)"):
            load_parent_key(str(key))
    os.chmod(key, 0o600)
    assert load_parent_key(str(key)) == PRIVATE
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    os.chown(key, 4242, 4242)  # issue 12, item 12: someone else's file is not our key
    with pytest.raises(RoleError, match="owned by uid 4242, not by root or this user"):
        load_parent_key(str(key))
    with pytest.raises(RoleError, match="does not exist"):
        load_parent_key(str(tmp_path / "missing"), create=False)
    assert not (tmp_path / "missing").exists()


@pytest.mark.timeout(20)
def test_a_key_file_or_profile_that_is_no_regular_file_is_refused_at_once(tmp_path, capsys):
    """A FIFO (mode 0600, ours) passed the key file's checks and blocked the read for ever;
    pin-parent opened the profile a second time, unchecked."""
    fifo = tmp_path / "k.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(RoleError, match=re.escape(f"private key {fifo}: is a FIFO (named "
                                                  "pipe), not a regular file")):
        load_parent_key(str(fifo))
    assert cli.main(["profile", "pin-parent", str(fifo)]) == 1
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err


_UNPRIVILEGED_BIND = r"""
import errno, os, socket, sys
os.setgid(65534)
os.setuid(65534)
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.bind((socket.VMADDR_CID_ANY, port))
        print(port, "bound")
    except OSError as e:
        print(port, errno.errorcode.get(e.errno, e.errno))
    finally:
        s.close()
"""


def test_default_vsock_ports_cannot_be_bound_by_an_unprivileged_process():
    # Issue 12, item 2: while `parent up` is down, a host process without root must not be
    # able to take the parent's ports. Binding (never connecting) vsock is safe here.
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (OSError, AttributeError):
        pytest.skip("no AF_VSOCK on this machine")
    t = parse_profile("name: a\n").transport
    res = subprocess.run([sys.executable, "-c", _UNPRIVILEGED_BIND, str(t.port),
                          str(t.control_port)], capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == [f"{t.port} EACCES", f"{t.control_port} EACCES"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file for another user")
def test_pin_parent_under_sudo_follows_no_link_planted_at_its_temporary_file(tmp_path, capsys):
    """With sudo on a user's profile, the temporary file was a fixed name beside the profile,
    opened O_CREAT|O_TRUNC (links followed) and then chowned to the profile's owner: a link
    the user put there in advance had root truncate the file it names, write the profile into
    it and give it to the user (/etc/shadow, say). The temporary file is now a new one."""
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 4242, 4242)  # the user's own directory, not sticky: links are followed
    profile = home / "profile.yaml"
    profile.write_text("name: a\n")
    os.chown(profile, 4242, 4242)
    victim = tmp_path / "root-only"
    victim.write_text("root's secret\n")
    os.chmod(victim, 0o600)
    (home / "profile.yaml.pin-parent.tmp").symlink_to(victim)
    assert cli.main(["profile", "pin-parent", str(profile), "--public-key", PUB]) == 0
    capsys.readouterr()
    assert victim.read_text() == "root's secret\n"
    assert (victim.stat().st_uid, victim.stat().st_mode & 0o777) == (0, 0o600)
    assert parse_profile(profile.read_text()).parent.public_key == PUB
    assert (profile.stat().st_uid, profile.stat().st_gid) == (4242, 4242)
    # The planted link is the user's to remove; nothing of ours is left beside it.
    assert sorted(p.name for p in home.iterdir()) == ["profile.yaml",
                                                     "profile.yaml.pin-parent.tmp"]


def test_a_private_key_pinned_as_the_parents_public_key_is_refused_unquoted():
    """parent.public_key holding the private key itself (pasted in the wrong place): the
    refusal quoted the pinned value, and so put the private key in the journal."""
    private_b64 = key_to_base64(PRIVATE)
    profile = parse_profile(f"name: a\nparent: {{public_key: '{private_b64}'}}\n", "p.yaml")
    with pytest.raises(RoleError) as info:
        check_pinned_key(profile, PRIVATE)
    message = str(info.value)
    assert "is the private key of /etc/wgvsock/a.key itself, not its public key" in message
    assert "Make a new key" in message
    assert not any(private_b64[i:i + 8] in message for i in range(len(private_b64) - 8))


def test_a_new_key_file_and_every_directory_made_for_it_are_private_whatever_the_umask(tmp_path):
    """`parent up` makes a missing key file and the directories it is to be in. Path.mkdir
    gives the mode only to the last of them (the others get 0777 less the umask): under umask
    0 /etc/wgvsock in /etc/wgvsock/keys/a.key was writable by everyone, who could then put a
    directory of their own in the key's way."""
    key = tmp_path / "etc" / "wgvsock" / "keys" / "a.key"
    old = os.umask(0)
    try:
        created = load_parent_key(str(key))
    finally:
        os.umask(old)
    assert len(created) == 32
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in (key.parents[2], key.parents[1], key.parent, key)}
    assert modes == {"etc": 0o700, "etc/wgvsock": 0o700, "etc/wgvsock/keys": 0o700,
                     "etc/wgvsock/keys/a.key": 0o600}


def test_parent_up_with_its_pinned_key_missing_says_it_makes_none(tmp_path, monkeypatch):
    # `up` said "does not exist (create it with `wg genkey`, or let `wgvsock parent up` create
    # it)", which a pinned profile's `up` never does; doctor said why. Nothing is made either
    # way: make_bind stands in for the first thing `up` would make.
    import wgvsock.roles.parent as parent_mod

    def made(*args, **kwargs):
        raise AssertionError("parent up went on to make its transport")

    monkeypatch.setattr(parent_mod, "local_checks", lambda profile: [])
    monkeypatch.setattr(parent_mod, "make_bind", made)
    key = tmp_path / "parent.key"
    profile = parse_profile(f"name: a\ntransport: {{kind: unix, path: {tmp_path}/s}}\n"
                            f"parent: {{private_key: {key}, public_key: {PUB}}}\n")
    with pytest.raises(RoleError) as e:
        parent_mod.Parent(profile).start()
    assert "parent.public_key is pinned: `parent up` makes no new key" in str(e.value)
    assert "create it" not in str(e.value)
    assert str(e.value) == parent_mod.parent_key_check(profile).detail  # doctor's words
    assert not key.exists()


def test_a_missing_key_file_is_made_with_wgvsock_genkey(tmp_path):
    # It said "create it with `wg genkey`": wireguard-tools is installed by nothing wgvsock
    # needs (the quick start makes keys with `wgvsock genkey`).
    key = tmp_path / "parent.key"
    with pytest.raises(RoleError) as e:
        load_parent_key(str(key), create=False)
    assert f"`wgvsock genkey | install -m 0600 /dev/stdin {key}`" in str(e.value)
    assert "wg genkey" not in str(e.value).replace("wgvsock genkey", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory only root may "
                    "search, and to run pin-parent as another user")
def test_pin_parent_with_a_key_it_may_not_look_at_says_so_without_a_traceback():
    # Path.exists() raises PermissionError for a key in a directory this user may not search
    # (`parent up` makes them 0700): pin-parent run without root ended in a traceback.
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="wgvsock-pin-", dir="/tmp"))
    try:
        keys = base / "keys"
        keys.mkdir(mode=0o700)
        write_key(keys / "a.key", mode=0o600)
        base.chmod(0o755)
        profile = base / "p.yaml"
        profile.write_text(f"name: a\nparent:\n  private_key: {keys / 'a.key'}\n")
        profile.chmod(0o666)
        res = subprocess.run([sys.executable, "-m", "wgvsock.cli", "profile", "pin-parent",
                              str(profile)], capture_output=True, text=True, timeout=60,
                             user=65534, group=65534, env={**os.environ})
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        assert f"private key {keys / 'a.key'}: Permission denied" in res.stderr, res.stderr
        assert "public_key" not in profile.read_text()
    finally:
        import shutil

        shutil.rmtree(base)


_CREATE_ON_READ_ONLY = """
import sys
from wgvsock.roles.parent import RoleError, load_parent_key
try:
    load_parent_key(sys.argv[1], create=True)
except RoleError as e:
    print(e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root")
def test_a_key_that_cannot_be_created_on_a_read_only_file_system_says_how_to_fix_it(tmp_path):
    """The unit's ProtectSystem=strict leaves only /etc/wgvsock writable: a key elsewhere that
    `up` has to make failed with a bare "[Errno 30] Read-only file system". Now one line says
    where keys may go under the unit and how to add a directory: the nearest that exists, as
    ReadWritePaths= of a missing one (the key's, it said) fails the unit. A real read-only
    mount, in a mount namespace of the test's own."""
    ro = tmp_path / "ro"
    ro.mkdir()
    key = ro / "keys" / "parent.key"
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o ro tmpfs "$1" && exec "$2" -c "$3" "$4"', "sh", str(ro),
         sys.executable, _CREATE_ON_READ_ONLY, str(key)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 0, res.stderr
    assert res.stdout == (
        f"cannot create private key {key}: Read-only file system (under "
        "wgvsock-parent@.service only /etc/wgvsock is writable: keep the key there, or add "
        f"`ReadWritePaths={ro}` with `systemctl edit wgvsock-parent@NAME`)\n"), res
    assert not key.exists()
