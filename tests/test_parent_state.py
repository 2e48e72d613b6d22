"""The parent's state file (roles/state.py) as `parent up`, `down` and `reload` read it: what
is refused, and how; and the lock a stopping parent decides under. The namespace tests
(tests/net/test_parent_state.py) run the same through `parent up` and `down`."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unsayable import Unsayable
from wgvsock.roles import state as state_mod
from wgvsock.roles.common import RoleError
from wgvsock.roles.state import State, StateFileError
from wgvsock.services import firewall

GOOD = {"name": "pay", "pid": 4242, "interface": "wg0", "profile": "/etc/wgvsock/pay.yaml",
        "forwarding": {"net/ipv6/conf/default/accept_ra": "1", "net/ipv4/ip_forward": "0"}}


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(d))
    return d


def _write(d: Path, raw: object, name: str = "pay", mode: int = 0o600) -> Path:
    path = d / f"{name}.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    path.chmod(mode)
    return path


def test_a_state_file_wgvsock_wrote_loads(state_dir: Path) -> None:
    _write(state_dir, GOOD)
    s = State.load("pay")
    assert s is not None and s.pid == 4242 and s.forwarding == GOOD["forwarding"]
    # An older version's file, without the fields added since, still loads.
    _write(state_dir, {k: GOOD[k] for k in ("name", "pid", "interface", "profile")})
    assert State.load("pay") is not None
    # Found in review: what the parent itself writes when nitro-cli reports no enclave name
    # (releases before 1.2), and a parent that is a container's first process.
    _write(state_dir, {**GOOD, "pid": 1, "enclave": {"id": "i-0abc-enc1", "cid": 16,
                                                       "name": None}})
    s = State.load("pay")
    assert s is not None and s.pid == 1 and s.enclave["name"] is None
    # Any interface name the kernel takes: a refused one made the record unreadable for
    # good, and forwarding was never put back (found in review).
    odd = {f"net/ipv6/conf/{n}/accept_ra": "1" for n in ("eth#1", "wé0", "a~b=c")}
    _write(state_dir, {**GOOD, "forwarding": odd})
    assert State.load("pay").forwarding == odd


def test_a_later_releases_state_file_loads_naming_the_fields_this_one_does_not_know(
        state_dir: Path) -> None:
    # A downgrade: the parent a later release started writes fields this one does not know.
    # Before, the file was refused as "not one `wgvsock parent up` wrote", and `down` left
    # that parent running. Fields are only added, never renamed or given another meaning.
    _write(state_dir, {**GOOD, "tomorrow": {"x": 1}, "also": 2})
    s = State.load("pay")
    assert s is not None and s.pid == 4242 and s.forwarding == GOOD["forwarding"]
    assert s.newer_fields == ["also", "tomorrow"]
    assert "'also', 'tomorrow'" in s.newer_note() and "newer wgvsock" in s.newer_note()
    # Its own record never carries another release's fields.
    s.save()
    assert "tomorrow" not in json.loads((state_dir / "pay.json").read_text())
    assert State.load("pay").newer_fields == [] and State.load("pay").newer_note() == ""


BAD = {
    "pid text": ({"pid": "abc"}, "'pid'"),
    "pid fraction": ({"pid": 1.5}, "'pid'"),
    "pid null": ({"pid": None}, "'pid'"),
    "pid bool": ({"pid": True}, "'pid'"),
    "pid huge": ({"pid": 2**70}, "'pid'"),
    "pid zero": ({"pid": 0}, "'pid'"),
    "pid negative": ({"pid": -5}, "'pid'"),
    "forwarding value": ({"forwarding": {"net/ipv4/ip_forward": 5}}, "'forwarding'"),
    "forwarding value text": ({"forwarding": {"net/ipv4/ip_forward": "7"}}, "'forwarding'"),
    "forwarding other sysctl": ({"forwarding": {"net/ipv4/conf/all/rp_filter": "0"}},
                                "'forwarding'"),
    "forwarding climbs out": ({"forwarding": {"net/ipv6/conf/../accept_ra": "1"}},
                              "'forwarding'"),
    "forwarding list": ({"forwarding": ["net/ipv4/ip_forward"]}, "'forwarding'"),
    "forwarding not a name": ({"forwarding": {"net/ipv6/conf/a:b/accept_ra": "1"}},
                              "'forwarding'"),
    "forwarding name too long": ({"forwarding": {f"net/ipv6/conf/{'é' * 8}/accept_ra": "1"}},
                                 "'forwarding'"),
    "sockets": ({"sockets": "/tmp/x.sock"}, "'sockets'"),
    "enclave": ({"enclave": {"id": 5}}, "'enclave'"),
    "reload": ({"reload": []}, "'reload'"),
    "started": ({"started": "soon"}, "'started'"),
    "no interface": ({"interface": None}, "'interface'"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_damaged_state_file_is_refused_naming_the_field(state_dir: Path, kind: str) -> None:
    change, field = BAD[kind]
    path = _write(state_dir, {**GOOD, **change})
    with pytest.raises(StateFileError) as e:
        State.load("pay")
    assert str(path) in str(e.value) and field in str(e.value)
    assert "remove the file" in str(e.value)


def test_a_missing_field_or_bad_json_is_refused(state_dir: Path) -> None:
    _write(state_dir, {k: v for k, v in GOOD.items() if k != "pid"})
    with pytest.raises(StateFileError, match="'pid' is missing"):
        State.load("pay")
    _write(state_dir, "{")
    with pytest.raises(StateFileError, match="not valid JSON"):
        State.load("pay")
    _write(state_dir, "[1]")
    with pytest.raises(StateFileError, match="not an object"):
        State.load("pay")


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_state_file_others_may_write_is_not_trusted(state_dir: Path, mode: int) -> None:
    path = _write(state_dir, GOOD, mode=mode)
    with pytest.raises(StateFileError, match=f"writable by others \\(mode {mode:o}\\)") as e:
        State.load("pay")
    assert str(path) in str(e.value)


def test_a_state_file_of_another_user_is_not_trusted(state_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = _write(state_dir, GOOD)
    os.chown(path, 65534, 65534)
    with pytest.raises(StateFileError, match="owned by uid 65534"):
        State.load("pay")


def test_a_symbolic_link_is_not_followed(state_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(GOOD))
    (state_dir / "pay.json").symlink_to(target)
    with pytest.raises(StateFileError, match="symbolic link"):
        State.load("pay")


def test_the_forwarding_record_is_checked_too(state_dir: Path, monkeypatch) -> None:
    written: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: written.append(prev))
    record = state_dir / "forwarding.json"
    record.write_text(json.dumps({"net/ipv4/conf/all/rp_filter": "0"}))
    record.chmod(0o600)
    with pytest.raises(StateFileError, match="forwarding record"):
        state_mod.restore_forwarding("pay", {"net/ipv4/ip_forward": "0"})
    record.write_text(json.dumps({"net/ipv4/ip_forward": "0"}))
    record.chmod(0o644)
    state_mod.restore_forwarding("pay", {})
    assert written == [{"net/ipv4/ip_forward": "0"}] and not record.exists()
    record.write_text(json.dumps({"net/ipv4/ip_forward": "0"}))
    record.chmod(0o666)
    with pytest.raises(StateFileError, match="writable by others"):
        state_mod.restore_forwarding("pay", {})


def test_enable_forwarding_records_each_value_before_it_writes(monkeypatch) -> None:
    """Review finding: `up` recorded the values it replaced after writing them all."""
    values = {"net/ipv6/conf/all/forwarding": "0", "net/ipv6/conf/default/accept_ra": "1",
              "net/ipv6/conf/eth0/accept_ra": "1", "net/ipv4/ip_forward": "0",
              "net/ipv4/conf/eth0/forwarding": "1"}
    events: list[tuple] = []
    # Each interface's forwarding is the global's, but eth0's IPv4 one (which the global's
    # write changes too, and so is recorded with it).
    monkeypatch.setattr(firewall, "_sysctl_read",
                        lambda keys, netns: [values.get(k, "0") for k in keys])
    monkeypatch.setattr(firewall, "_ipv6_interfaces", lambda netns: ["eth0"])
    monkeypatch.setattr(firewall, "_conf_names",
                        lambda family, netns: ["all", "default", "eth0", "lo"])

    def write(key: str, value: str, netns: object) -> None:
        events.append(("write", key))
        values[key] = value

    monkeypatch.setattr(firewall, "_sysctl_write", write)
    prev = firewall.enable_forwarding(ipv6=True, record=lambda r: events.append(("record", r)))
    recorded: dict = {}
    for event in events:
        if event[0] == "record":
            recorded = event[1]
        else:
            assert event[1] in recorded, f"{event[1]} written before it was recorded"
    assert recorded == prev == {"net/ipv6/conf/default/accept_ra": "1",
                                "net/ipv6/conf/eth0/accept_ra": "1",
                                "net/ipv4/conf/eth0/forwarding": "1",
                                "net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"}
    assert "net/ipv4/conf/eth0/forwarding" not in [e[1] for e in events if e[0] == "write"]


def test_two_parents_stopping_at_once_decide_in_turn(state_dir: Path, monkeypatch) -> None:
    """Review finding: the decision whether forwarding can go back was guarded by a lock of
    this process only, and a stopping parent counted itself as running for the others. Here
    two threads stand in for two processes (the lock is a flock, taken per open file), and
    each one's own state file is made to look like its own."""
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    running = {"a", "b"}
    monkeypatch.setattr(State, "running", lambda self: self.name in running)
    for name in running:
        _write(state_dir, {**GOOD, "name": name, "pid": 100 + ord(name)}, name=name)
    me = threading.local()
    real_getpid = os.getpid
    monkeypatch.setattr(state_mod.os, "getpid", lambda: getattr(me, "pid", real_getpid()))
    both = threading.Barrier(2)
    real_others = state_mod.others_running

    def others_running(name: str) -> list[str]:
        found = real_others(name)
        # Both decide while both still run, unless the decisions take turns.
        with contextlib.suppress(threading.BrokenBarrierError):
            both.wait(timeout=1)
        return found

    monkeypatch.setattr(state_mod, "others_running", others_running)
    answers: dict[str, str | None] = {}

    def stop(name: str, previous: dict) -> None:
        me.pid = 100 + ord(name)
        answers[name] = state_mod.restore_forwarding(name, previous)

    threads = [threading.Thread(target=stop, args=("a", {"net/ipv4/ip_forward": "0"})),
               threading.Thread(target=stop, args=("b", {}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert restored == [{"net/ipv4/ip_forward": "0"}], answers
    assert sorted(v is None for v in answers.values()) == [False, True]
    assert list(state_dir.iterdir()) == []


def test_load_says_to_run_as_root_when_it_may_not_read(state_dir: Path) -> None:
    if os.geteuid() != 0:
        path = _write(state_dir, GOOD)
        path.chmod(0)
        with pytest.raises(RoleError, match="run as root"):
            State.load("pay")
        return
    # Root reads any file: ask as nobody, of a directory nobody may enter.
    import shutil
    import subprocess
    import sys
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="wgvsock-state-", dir="/tmp"))
    try:
        d.chmod(0o755)
        _write(d, GOOD).chmod(0)
        code = ("from wgvsock.roles.state import State\n"
                "from wgvsock.roles.common import RoleError\n"
                "try:\n    State.load('pay')\nexcept RoleError as e:\n    print(e)\n")
        root = Path(__file__).resolve().parents[1]
        res = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                              "--clear-groups", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60, cwd="/",
                             env={**os.environ, "WGVSOCK_STATE_DIR": str(d),
                                  "PYTHONPATH": str(root)})
        assert "run as root" in res.stdout, (res.stdout, res.stderr)
    finally:
        shutil.rmtree(d)


# -- the state directory ---------------------------------------------------------------------
# Checking each state file is not enough when another user may write the directory it is in:
# they could swap a checked file for their own between two reads, or plant forwarding.json.


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_state_directory_others_may_write_is_refused(state_dir: Path, mode: int) -> None:
    _write(state_dir, GOOD)
    state_dir.chmod(mode)
    kind = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
    for step in (lambda: State.load("pay"), lambda: State(**GOOD).save(),
                 lambda: state_mod.restore_forwarding("pay", {}),
                 lambda: state_mod.already_up(_Named("pay"))):
        with pytest.raises(StateFileError) as e:
            step()
        text = str(e.value)
        assert f"state directory {state_dir}" in text, text
        # Sticky (as /tmp) keeps others from renaming a file, not from adding one.
        assert (f"{state_dir} is shared (mode 1777)" if mode & 0o1000 else
                f"{state_dir} is writable by {kind} (mode {mode:o})") in text, text
        assert f"chmod go-w {state_dir}" in text, text
        # It ended "or point WGVSOCK_STATE_DIR at a directory that is", which read as cut off.
        assert text.endswith("or point WGVSOCK_STATE_DIR at a directory that already is so"), \
            text
    assert sorted(p.name for p in state_dir.iterdir()) == ["pay.json"]  # nothing written


@pytest.mark.parametrize("name", ["st ate", "it's", "a;touch b"])
def test_the_chmod_said_of_a_shared_state_directory_fixes_it_whatever_its_name(
        monkeypatch, tmp_path: Path, name: str) -> None:
    """`chmod go-w DIR` named the directory unquoted: with a blank in its name it chmodded two
    others, with a quote it was no command at all."""
    import shlex
    import subprocess

    d = tmp_path / name
    d.mkdir(mode=0o700)
    d.chmod(0o777)
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(d))
    with pytest.raises(StateFileError) as e:
        State.load("pay")
    fix = f"chmod go-w {shlex.quote(str(d))}"
    assert f"`{fix}`" in str(e.value), str(e.value)
    subprocess.run(["sh", "-c", fix], cwd=tmp_path, check=True, timeout=30)
    assert State.load("pay") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_directory_above_the_state_directory_others_may_write_is_refused(
        state_dir: Path) -> None:
    _write(state_dir, GOOD)
    above = state_dir.parent
    above.chmod(0o777)
    try:
        with pytest.raises(StateFileError, match=f"{above} is writable by group") as e:
            State.load("pay")
        assert f"state directory {state_dir}" in str(e.value)
        assert f"chmod go-w {above}" in str(e.value)
    finally:
        above.chmod(0o700)


def test_a_state_directory_of_another_user_is_refused(state_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    _write(state_dir, GOOD)
    os.chown(state_dir, 65534, 65534)
    with pytest.raises(StateFileError, match=f"{state_dir} is owned by uid 65534") as e:
        State.load("pay")
    assert f"chown root {state_dir}" in str(e.value)


def test_a_state_directory_that_is_a_link_is_judged_where_it_leads(
        monkeypatch, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(tmp_path / "link"))
    State(**GOOD).save()
    assert State.load("pay") is not None
    real.chmod(0o777)
    with pytest.raises(StateFileError, match=f"{real} is writable by"):
        State.load("pay")


def _chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """safe/l1 -> w/l2 -> real: the directory W holds the middle link of the chain."""
    safe, w, real = (tmp_path / n for n in ("safe", "w", "real"))
    for d in (safe, w, real):
        d.mkdir(mode=0o700)
    (w / "l2").symlink_to(real)
    (safe / "l1").symlink_to(w / "l2")
    return safe / "l1", w, real


def test_a_link_in_the_middle_of_a_chain_is_checked_where_it_is(
        monkeypatch, tmp_path: Path) -> None:
    """Review finding: only the path as written and where the chain ends were checked, so
    a directory others may write holding a link between them passed, though they could
    repoint that link at a state directory of their own."""
    link, w, real = _chain(tmp_path)
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(link))
    State(**GOOD).save()
    assert (real / "pay.json").exists() and State.load("pay") is not None
    w.chmod(0o777)
    for step in (lambda: State.load("pay"), lambda: State(**GOOD).save()):
        with pytest.raises(StateFileError) as e:
            step()
        text = str(e.value)
        said = f"state directory {link}: {w} is writable by group and others (mode 777)"
        assert said in text, text
        assert f"chmod go-w {w}" in text, text
    assert sorted(p.name for p in real.iterdir()) == ["pay.json"]


def test_a_link_in_the_chain_another_user_owns_is_refused(monkeypatch, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the link away")
    link, w, _ = _chain(tmp_path)
    w.chmod(0o1777)  # sticky: only the link's owner may replace it, who is not us
    os.lchown(w / "l2", 65534, 65534)
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(link))
    with pytest.raises(StateFileError) as e:
        State.load("pay")
    text = str(e.value)
    assert f"{w / 'l2'} is a symbolic link owned by uid 65534" in text, text
    assert f"chown -h root {w / 'l2'}" in text, text


def test_the_fix_named_for_another_users_directory_is_to_give_it_to_this_user(
        monkeypatch, state_dir: Path) -> None:
    """`chown root DIR` was the advice whoever ran it: as another user, what passes is a
    directory of their own (or root's), and they cannot give one to root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    os.chown(state_dir, 65534, 65534)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(StateFileError) as e:
        state_mod.state_directory()
    text = str(e.value)
    assert f"{state_dir} is owned by uid 65534" in text, text
    assert f"chown 4242 {state_dir}" in text and "chown root" not in text, text
    assert "root's (or uid 4242's)" in text, text


def test_the_state_directory_is_made_closed_with_any_missing_above(
        monkeypatch, tmp_path: Path) -> None:
    """Path.mkdir(parents=True) made the directories above with the umask's mode (0777
    under umask 0), which the check then refuses: each is made 0700."""
    d = tmp_path / "a" / "b" / "state"
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(d))
    old = os.umask(0)
    try:
        State(**GOOD).save()
    finally:
        os.umask(old)
    for p in (d, d.parent, d.parent.parent):
        assert p.stat().st_mode & 0o777 == 0o700, p
    assert State.load("pay") is not None


def test_a_state_directory_others_may_only_read_is_taken_as_it_is(state_dir: Path) -> None:
    """Looser than the 0700 wgvsock makes, but nobody else can change what is in it, and
    each file in it is 0600: accepted, and left as the operator made it."""
    state_dir.chmod(0o755)
    State(**GOOD).save()
    assert State.load("pay") is not None
    assert state_dir.stat().st_mode & 0o777 == 0o755


def test_a_missing_state_directory_is_no_state_and_is_not_made_by_a_read(
        monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(tmp_path / "none"))
    assert State.load("pay") is None
    assert state_mod.others_running("pay") == {}
    assert not (tmp_path / "none").exists()


def test_doctor_checks_the_state_directory(monkeypatch, state_dir: Path) -> None:
    from wgvsock.roles.parent import local_checks
    from wgvsock.services.profile import parse_profile

    profile = parse_profile("name: pay\nenclave:\n  address: 10.77.0.2/30\n")

    def check():
        return {c.name: c for c in local_checks(profile)}["state directory"]

    assert check().ok is True and str(state_dir) in check().detail
    state_dir.chmod(0o757)
    c = check()
    assert c.ok is False and f"{state_dir} is writable by others (mode 757)" in c.detail, c
    state_dir.chmod(0o700)
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(state_dir / "missing"))
    assert check().ok is True
    assert not (state_dir / "missing").exists()  # a check makes nothing


def test_down_acts_on_nothing_in_a_state_directory_others_may_write(
        state_dir: Path, monkeypatch, tmp_path: Path) -> None:
    from wgvsock.roles import parent
    from wgvsock.services.profile import parse_profile

    monkeypatch.setenv("WGVSOCK_RUN_DIR", str(tmp_path / "run"))  # not this host's sockets
    monkeypatch.setattr(parent.netconf, "interface_exists", lambda name: False)
    monkeypatch.setattr(parent.firewall, "exists", lambda name: False)
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    _write(state_dir, GOOD)
    (state_dir / "forwarding.json").write_text(json.dumps({"net/ipv4/ip_forward": "0"}))
    (state_dir / "forwarding.json").chmod(0o600)
    (state_dir / "pay.reload.lock").write_text("")
    state_dir.chmod(0o777)
    profile = parse_profile("name: pay\nenclave:\n  address: 10.77.0.2/30\n")
    _, failed = parent.down(profile)
    assert any(f"state directory {state_dir}" in line for line in failed), failed
    assert restored == []
    assert sorted(p.name for p in state_dir.iterdir()) == \
        ["forwarding.json", "pay.json", "pay.reload.lock"]



def test_down_reports_a_failure_whose_message_cannot_be_made_and_goes_on(
        state_dir: Path, monkeypatch, tmp_path: Path) -> None:
    """Each step's failure is one line of down's (safetext.message), the rest still tried.
    Before, making that line raised again, out of down: `parent down` ended in a traceback
    with what was left still undone."""
    from wgvsock.roles import parent
    from wgvsock.services.profile import parse_profile

    monkeypatch.setenv("WGVSOCK_RUN_DIR", str(tmp_path / "run"))  # not this host's sockets
    monkeypatch.setattr(parent.netconf, "interface_exists", lambda name: False)
    monkeypatch.setattr(parent.firewall, "exists", lambda name: True)

    def broken(name: str) -> None:
        raise Unsayable

    monkeypatch.setattr(parent.firewall, "remove", broken)
    profile = parse_profile("name: pay\nenclave:\n  address: 10.77.0.2/30\n")
    _, failed = parent.down(profile)
    assert failed == ["could not remove the nftables table of profile 'pay': Unsayable (its "
                      "message cannot be shown: ValueError)"]


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


# -- a damaged state file of another parent --------------------------------------------------
# It was taken for no parent at all: another parent stopping then put forwarding back while the
# damaged one's parent still ran and needed it. Now it counts as running unless its pid shows
# otherwise.


@pytest.fixture
def live_parent() -> Iterator[int]:
    """A process that passes for a running wgvsock parent (is_alive: its command line names
    wgvsock)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True); input()",
                             "wgvsock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        # Its command line is pytest's until it has started.
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.communicate(timeout=10)


DAMAGED = {
    "damaged field": (lambda d, pid: _write(d, {**GOOD, "name": "b", "pid": pid,
                                                "enclave": []}, name="b"), "field 'enclave'"),
    "not JSON": (lambda d, pid: _write(d, "{", name="b"), "not valid JSON"),
    "writable by others": (lambda d, pid: _write(d, {**GOOD, "name": "b", "pid": pid},
                                                 name="b", mode=0o666), "writable by others"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_a_damaged_state_file_of_another_parent_keeps_forwarding_on(
        state_dir: Path, monkeypatch, live_parent: int, kind: str) -> None:
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    write, why = DAMAGED[kind]
    write(state_dir, live_parent)
    left = state_mod.restore_forwarding("a", {"net/ipv4/ip_forward": "0"})
    assert restored == [] and left is not None and left.uncertain
    assert state_mod.others_running("a").keys() == {"b"}
    text = str(left)
    assert "IP forwarding left on" in text and str(state_dir / "b.json") in text, text
    assert why in text and "counted as running" in text, text
    # The values wait in the host's record for the last parent to stop.
    assert json.loads((state_dir / "forwarding.json").read_text()) == \
        {"net/ipv4/ip_forward": "0"}


def test_a_damaged_state_file_whose_pid_is_gone_does_not_count(
        state_dir: Path, monkeypatch, live_parent: int) -> None:
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    # A damaged file, trusted, naming a pid that no wgvsock runs as, or the live one with
    # another start time (its pid reused).
    _write(state_dir, {**GOOD, "name": "b", "pid": 4194304, "enclave": []}, name="b")
    _write(state_dir, {**GOOD, "name": "c", "pid": live_parent, "enclave": [],
                       "started": (state_mod.start_time(live_parent) or 0) + 1}, name="c")
    assert state_mod.others_running("a") == {}
    assert state_mod.restore_forwarding("a", {"net/ipv4/ip_forward": "0"}) is None
    assert restored == [{"net/ipv4/ip_forward": "0"}]


def test_the_forwarding_record_is_no_parents_state(state_dir: Path, live_parent: int) -> None:
    (state_dir / "forwarding.json").write_text(json.dumps({"net/ipv4/ip_forward": "0"}))
    (state_dir / "forwarding.json").chmod(0o600)
    _write(state_dir, {**GOOD, "name": "b", "pid": live_parent}, name="b")
    assert state_mod.others_running("a") == {"b": ""}


def test_down_says_a_damaged_state_file_kept_forwarding_on(
        state_dir: Path, monkeypatch, tmp_path: Path, live_parent: int) -> None:
    from wgvsock.roles import parent
    from wgvsock.services.profile import parse_profile

    monkeypatch.setenv("WGVSOCK_RUN_DIR", str(tmp_path / "run"))  # not this host's sockets
    monkeypatch.setattr(parent.netconf, "interface_exists", lambda name: False)
    monkeypatch.setattr(parent.firewall, "exists", lambda name: False)
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    _write(state_dir, GOOD)  # pay's parent crashed (pid 4242 is no wgvsock)
    _write(state_dir, {**GOOD, "name": "b", "pid": live_parent, "enclave": []}, name="b")
    profile = parse_profile("name: pay\nenclave:\n  address: 10.77.0.2/30\n")
    done, failed = parent.down(profile)
    assert restored == []
    assert any("IP forwarding left on" in line and str(state_dir / "b.json") in line
               for line in failed), (done, failed)
    # its values are in the host's record now; named, as what down did to the rest is
    assert f"removed the state file {state_dir / 'pay.json'}" in done
    assert json.loads((state_dir / "forwarding.json").read_text()) == GOOD["forwarding"]


def test_a_parent_is_known_to_run_replaced_code_when_the_files_changed_after_it_started(
        tmp_path: Path) -> None:
    # pid 1 started at boot, long before the file below; a release before `started` was
    # recorded (0) is judged by the pid's own start time.
    package = tmp_path / "wgvsock"
    package.mkdir()
    (package / "cli.py").write_text("# upgraded\n")
    boot = state_mod.start_time(1)
    assert boot is not None
    for started in (boot, 0):
        assert State("pay", 1, "wg0", "/p.yaml", started=started).code_replaced(package)
    # Another process under that pid (its start time differs): nothing is known.
    assert not State("pay", 1, "wg0", "/p.yaml", started=boot + 1).code_replaced(package)
    assert not State("pay", 1, "wg0", "/p.yaml", started=boot).code_replaced(tmp_path / "none")


def test_a_chmod_or_chown_of_the_package_is_no_replacement_but_a_rename_over_it_is(
        tmp_path: Path) -> None:
    """Review finding: code_replaced() compared the files' ctime with the parent's start, so
    a `chmod -R` or `chown -R` of the package (ctime moves) said the parent ran replaced
    code. It compares what the parent recorded at start (inode, mtime, size) instead."""
    package = tmp_path / "wgvsock"
    (package / "core").mkdir(parents=True)
    (package / "cli.py").write_text("# this release\n")
    (package / "core" / "x.so").write_bytes(b"\x7fELF")
    boot = state_mod.start_time(1)
    assert boot is not None

    def parent() -> State:  # pid 1, started before all of this, as the parent records it
        return State("pay", 1, "wg0", "/p.yaml", started=boot,
                     code=state_mod.code_fingerprint(package))

    running = parent()
    assert not running.code_replaced(package)
    for path in (package, package / "cli.py", package / "core" / "x.so"):
        path.chmod(0o700 if path.is_dir() else 0o600)
        os.chown(path, os.getuid(), os.getgid())  # a chown to the same owner moves ctime too
        if os.geteuid() == 0:
            os.chown(path, 65534, 65534)
    assert not running.code_replaced(package)
    # As pip, dpkg and rpm install: a new file renamed over the old, here with the same
    # bytes and the old mtime put back (dpkg and rpm set the package's).
    old = (package / "core" / "x.so").stat()
    new = package / "core" / ".x.so.new"
    new.write_bytes(b"\x7fELF")
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(new, package / "core" / "x.so")
    assert running.code_replaced(package)
    # An edit in place (same inode) and a file added count too.
    running = parent()
    (package / "cli.py").write_text("# edited\n")
    assert running.code_replaced(package)
    running = parent()
    (package / "core" / "added.py").write_text("")
    assert running.code_replaced(package)


def test_a_state_file_s_code_must_be_a_string(state_dir: Path) -> None:
    _write(state_dir, {**GOOD, "code": 5})
    with pytest.raises(StateFileError, match="field 'code' is 5, not a string"):
        State.load("pay")
    _write(state_dir, {**GOOD, "code": "ab" * 32})
    state = State.load("pay")
    assert state is not None and state.code == "ab" * 32 and state.newer_fields == []


# -- families --------------------------------------------------------------------------------
# The host's record was one for both families: after an IPv4-only parent stopped while an
# IPv6-only one ran, IPv4 forwarding stayed on until that one stopped too.

V4 = {"net/ipv4/ip_forward": "0", "net/ipv4/conf/eth0/forwarding": "1"}
V6 = {"net/ipv6/conf/eth0/accept_ra": "1", "net/ipv6/conf/all/forwarding": "0"}


@pytest.mark.parametrize(("mine", "theirs"), [(V4, ["ipv6"]), (V6, ["ipv4"])],
                         ids=["ipv4-stops", "ipv6-stops"])
def test_a_family_no_other_parent_needs_is_put_back_when_its_parent_stops(
        state_dir: Path, monkeypatch, live_parent: int, mine: dict, theirs: list) -> None:
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    other = V6 if mine is V4 else V4
    _write(state_dir, {**GOOD, "name": "b", "pid": live_parent, "forwarding": other,
                       "families": theirs}, name="b")
    left = state_mod.restore_forwarding("a", mine)
    assert restored == [mine]
    assert not (state_dir / "forwarding.json").exists()
    mine_name, theirs_name = ("IPv4", "IPv6") if mine is V4 else ("IPv6", "IPv4")
    assert left is not None and not left.uncertain
    assert f"left on for {theirs_name} ({mine_name} forwarding put back" in str(left), left
    # The other parent's own family goes back when it stops, as ever.
    (state_dir / "b.json").unlink()
    assert state_mod.restore_forwarding("b", other) is None
    assert restored == [mine, other]


def test_a_family_another_parent_needs_stays_on_and_in_the_record(
        state_dir: Path, monkeypatch, live_parent: int) -> None:
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    # b (IPv4 only) runs; a (dual stack) turned both on and stops: IPv6 goes back, IPv4
    # waits in the record for b.
    _write(state_dir, {**GOOD, "name": "b", "pid": live_parent, "families": ["ipv4"]},
           name="b")
    left = state_mod.restore_forwarding("a", {**V4, **V6})
    assert restored == [V6]
    assert left is not None and not left.uncertain
    assert "IP forwarding left on for IPv4 (IPv6 forwarding put back" in str(left), left
    assert json.loads((state_dir / "forwarding.json").read_text()) == V4


@pytest.mark.parametrize("families", ["absent", "null"])
def test_a_parent_that_recorded_no_families_needs_both(
        state_dir: Path, monkeypatch, live_parent: int, families: str) -> None:
    # A parent of a release before `families` was recorded.
    restored: list[dict] = []
    monkeypatch.setattr(firewall, "restore_forwarding", lambda prev: restored.append(prev))
    raw = {**GOOD, "name": "b", "pid": live_parent}
    if families == "null":
        raw["families"] = None
    _write(state_dir, raw, name="b")
    left = state_mod.restore_forwarding("a", {**V4, **V6})
    assert restored == [] and left is not None
    assert "left on for IPv4 and IPv6:" in str(left), left
    assert json.loads((state_dir / "forwarding.json").read_text()) == {**V4, **V6}


@pytest.mark.parametrize("families", ["ipv4", ["ipv5"], [4]])
def test_a_state_file_with_other_families_is_refused(state_dir: Path, families) -> None:
    _write(state_dir, {**GOOD, "families": families})
    with pytest.raises(StateFileError, match="field 'families'"):
        State.load("pay")


# -- `parent down` with a profile broken under its running parent ----------------------------
# It said "nothing was stopped" and left the parent running: the state file the parent left
# finds it (by the file it runs from, or the name the broken file still gives).

BROKEN = "name: pay\nparent:\n  egress:\n    alow: [0.0.0.0/0]\n"

# A stand-in parent: its command line names wgvsock (is_alive), and on SIGTERM it removes its
# state file (argv[1]) as a parent stopping does.
_STOPPING_PARENT = r"""
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: (os.unlink(sys.argv[1]), os._exit(0)))
print("ready", flush=True)
signal.pause()
"""


@pytest.fixture
def stoppable_parent(state_dir: Path) -> Iterator:
    import subprocess
    import sys

    procs: list[subprocess.Popen] = []

    def start(name: str = "pay") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _STOPPING_PARENT,
                                 str(state_dir / f"{name}.json"), "wgvsock"],
                                stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=10)


def _running(state_dir: Path, name: str, pid: int, profile: Path, **more) -> None:
    _write(state_dir, {**GOOD, "name": name, "pid": pid, "profile": str(profile),
                       "started": state_mod.start_time(pid), **more}, name=name)


@pytest.mark.parametrize("found_by", ["path", "name"])
def test_down_with_a_broken_profile_stops_its_running_parent(
        state_dir: Path, tmp_path: Path, capsys, stoppable_parent, found_by: str) -> None:
    from wgvsock import cli

    path = tmp_path / "pay.yaml"
    path.write_text(BROKEN)
    parent = stoppable_parent()
    started_from = path if found_by == "path" else tmp_path / "elsewhere.yaml"
    _running(state_dir, "pay", parent.pid, started_from)
    assert cli.main(["parent", "down", "--profile", str(path)]) == 0
    assert parent.wait(timeout=10) == 0
    out, err = capsys.readouterr()
    how = (f"running from {path}" if found_by == "path" else
           f"of the name {path} gives, running from {started_from}")
    assert out == (f"stopped the parent of profile 'pay' (pid {parent.pid}), found by its "
                   f"state file {state_dir / 'pay.json'} ({how}): it removed what it had made "
                   "as it stopped. Fix the profile before the next `up`\n")
    assert err.startswith(f"invalid profile:\n{path}:4: parent.egress.alow: unknown key")


def test_down_with_a_broken_profile_signals_no_pid_reused_by_another_process(
        state_dir: Path, tmp_path: Path, capsys, live_parent: int) -> None:
    from wgvsock import cli

    path = tmp_path / "pay.yaml"
    path.write_text(BROKEN)
    # Its parent crashed, and the pid went to another process (another start time).
    _running(state_dir, "pay", live_parent, path,
             started=(state_mod.start_time(live_parent) or 0) + 1)
    assert cli.main(["parent", "down", "--profile", str(path)]) == 1
    assert os.path.exists(f"/proc/{live_parent}/cmdline")
    assert os.waitpid(live_parent, os.WNOHANG) == (0, 0)  # not signalled
    assert capsys.readouterr().err.endswith("nothing was stopped or removed: no parent runs "
                                            "from this file or under the name it gives, and "
                                            "`down` reads the profile to know what else is its "
                                            "own. Fix it (or put back the file the parent was "
                                            "started with) and run `down` again\n")


def test_down_with_a_broken_profile_leading_to_two_parents_stops_neither(
        state_dir: Path, tmp_path: Path, capsys, stoppable_parent) -> None:
    from wgvsock import cli

    path = tmp_path / "pay.yaml"
    path.write_text(BROKEN)  # its parent runs as "old"; the file was renamed "pay" too
    old, pay = stoppable_parent("old"), stoppable_parent("pay")
    _running(state_dir, "old", old.pid, path)
    _running(state_dir, "pay", pay.pid, tmp_path / "other.yaml")
    assert cli.main(["parent", "down", "--profile", str(path)]) == 1
    assert old.poll() is None and pay.poll() is None
    assert capsys.readouterr().err.endswith(
        f"wgvsock parent down: the parent running from {path} is profile 'old' (pid "
        f"{old.pid}), but the file names 'pay', whose parent runs from {tmp_path / 'other.yaml'} "
        f"(pid {pay.pid}): nothing was stopped. Fix the profile so that it says which, and run "
        "`down` again\n")


# -- the doctor's row of the running parent ---------------------------------------------------
# `parent doctor` had none: whether the profile's parent ran, as what pid, was for `ps` to say.


def test_the_doctor_says_whether_the_profiles_parent_runs(
        state_dir: Path, tmp_path: Path, live_parent: int) -> None:
    import time

    from wgvsock.roles.parent import running_check
    from wgvsock.services.profile import load_profile

    path = tmp_path / "pay.yaml"
    path.write_text("name: pay\n")
    profile = load_profile(path)
    check = running_check(profile)
    assert (check.name, check.ok, check.detail) == (
        "parent", None, f"not running: no state file {state_dir / 'pay.json'} (start it with "
        f"`wgvsock parent up --profile {path}`)")
    began = state_mod.started_at(live_parent, 0)
    assert began is not None
    _running(state_dir, "pay", live_parent, path)
    check = running_check(profile)
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(began))
    assert (check.ok, check.warning, check.detail) == (
        True, False, f"up: pid {live_parent} since {since}, running from {path}")
    # Its pid gone to another process: crashed.
    _running(state_dir, "pay", live_parent, path,
             started=(state_mod.start_time(live_parent) or 0) + 1)
    check = running_check(profile)
    assert (check.ok, check.warning) == (True, True)
    assert check.detail == (f"not running, but its state file {state_dir / 'pay.json'} is "
                            f"left, naming pid {live_parent} (it crashed or was killed): `up` "
                            f"takes over what it left, `wgvsock parent down --profile {path}` "
                            "removes it")
    _write(state_dir, "{")
    check = running_check(profile)
    assert check.ok is False and "is not valid JSON" in check.detail, check.detail
