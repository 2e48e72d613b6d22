"""`parent reload`'s decisions without the host: which keys a running parent can take, and
an enclave judged under a policy that a reload replaced before it was installed. End to end
(namespaces, nftables, the control channel): tests/net/test_reload.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import types

import pytest

from tests.unsayable import Unsayable
from wgvsock.roles import parent as parent_module
from wgvsock.roles import state as state_module
from wgvsock.roles.parent import Parent, RoleError
from wgvsock.roles.state import State, request_reload
from wgvsock.services.control import ControlError, ControlServer, register
from wgvsock.services.profile import changed_keys, parse_profile

BASE = """\
version: 1
name: pay
interface: wg0
transport: {kind: unix, path: /run/wgvsock/pay}
parent:
  address: 10.77.0.1/30
  private_key: /etc/wgvsock/pay.key
  egress:
    allow: [0.0.0.0/0]
  ingress:
    - {listen: 8443, to: 8080}
enclave:
  address: 10.77.0.2/30
"""


def profile(text: str = BASE, **replace: str):
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_profile(text, "pay.yaml")


def test_changed_keys_name_each_leaf_that_differs() -> None:
    a = profile()
    assert changed_keys(a, profile()) == []
    b = profile(**{"allow: [0.0.0.0/0]": "allow: [0.0.0.0/0, api.example.com]",
                   "listen: 8443": "listen: 9443"})
    # Resolved values: with a name in use, enclave.dns defaults to the parent's forwarder,
    # and dns_grace appears.
    assert changed_keys(a, b) == ["parent.egress.allow", "parent.ingress", "enclave.dns",
                                  "parent.egress.dns_grace"]
    c = profile(BASE + "attestation:\n  pcrs: {0: " + "ab" * 48 + "}\n")
    assert changed_keys(a, c) == ["attestation.pcrs.0"]
    d = profile(**{"interface: wg0": "interface: wg1"})
    assert changed_keys(a, d) == ["interface"]


class Device:
    """What Parent._install_enclave uses of the device: uapi_set (through configure)."""

    def __init__(self) -> None:
        self.configs: list = []
        self.extra_status: dict = {}

    def uapi_set(self, cfg) -> None:
        self.configs.append(cfg)


def test_a_reload_refuses_keys_it_cannot_change_and_changes_nothing() -> None:
    p = Parent(profile())
    new = profile(**{"interface: wg0": "interface: wg1", "version: 1": "version: 1\nmtu: 1400"})
    with pytest.raises(RoleError, match=r"interface \(line 4\), mtu \(line 2\) changed"):
        p.reload(new)
    assert p.profile.interface == "wg0"
    assert p.reload(profile()) == ["nothing changed"]


def test_a_reload_that_adds_an_address_family_is_refused() -> None:
    """`up` turns on forwarding only for the tunnel's families (Parent._enable_forwarding):
    a reload must not give the tunnel a family whose forwarding is off. The addresses are
    not live keys, so it refuses, naming them, and `down`/`up` turns the new family on."""
    p = Parent(profile())
    new = profile(**{"address: 10.77.0.1/30": "address: [10.77.0.1/30, fd77::1/126]",
                     "address: 10.77.0.2/30": "address: [10.77.0.2/30, fd77::2/126]"})
    with pytest.raises(RoleError, match=r"parent\.address.*enclave\.address.*`up`"):
        p.reload(new)
    assert p.profile.enclave.addresses == profile().enclave.addresses


def test_enclave_only_keys_are_reported_not_applied() -> None:
    p = Parent(profile())
    new = profile(**{"  address: 10.77.0.2/30": "  address: 10.77.0.2/30\n  dns: [10.0.0.2]"})
    done = p.reload(new)
    assert done == ["enclave.dns: read by the enclave from the profile in its image, not by "
                    "the parent; they take effect with a new image"]


def test_enclave_user_is_reported_not_applied() -> None:
    """Before the parent knew it as the enclave's, a changed enclave.user was refused as a key
    a running parent cannot take, asking for `parent down` and `up` for nothing."""
    p = Parent(profile())
    new = profile(**{"  address: 10.77.0.2/30": "  address: 10.77.0.2/30\n  user: app"})
    assert changed_keys(p.profile, new) == ["enclave.user"]
    assert p.reload(new) == ["enclave.user: read by the enclave from the profile in its "
                             "image, not by the parent; they take effect with a new image"]


def test_a_reload_says_the_profiles_warnings() -> None:
    # An allow entry a deny entry covers whole is taken (deny wins) with a warning, which
    # `profile check` prints and a reload, whose outcome is all the operator sees, says.
    shadowed = {"    allow: [0.0.0.0/0]": "    allow: [0.0.0.0/0, 192.0.2.0/24:443/tcp]\n"
                                           "    deny: [192.0.2.0/24]"}
    p = Parent(profile(**shadowed))
    new = profile(**shadowed, **{"  address: 10.77.0.2/30": "  address: 10.77.0.2/30\n"
                                                            "  dns: [10.0.0.2]"})
    done = p.reload(new)
    assert len(done) == 2 and done[1].startswith("warning: pay.yaml:9: parent.egress.allow[1]:")
    assert "never allowed" in done[1]


def test_an_enclave_verified_under_a_policy_a_reload_replaced_is_judged_again() -> None:
    """A registration's verdict and its install are apart in time; a reload may tighten the
    policy in between (installs and the reload's check of the running enclave take turns, but
    a verdict already given would slip through): the install asks the new policy."""
    p = Parent(profile())
    p.device = Device()  # type: ignore[assignment]
    key = b"K" * 32
    verdict = p._verify(key, None, b"n" * 32)  # no document: fine while require is false
    assert verdict.accepted
    p.profile = profile(BASE + "attestation:\n  require: true\n  pcrs: {0: " + "ab" * 48 + "}\n")
    with pytest.raises(ControlError, match="requires attestation"):
        p._install_enclave(key, verdict)
    assert p.device.configs == [] and p.enclave_key is None  # type: ignore[attr-defined]
    # Under an unchanged policy the verdict stands.
    p.profile = profile()
    p._install_enclave(key, verdict)
    assert p.enclave_key == key and len(p.device.configs) == 1  # type: ignore[attr-defined]
    # Named in the UAPI reply, so that `wgvsock status` tells the enclave from a peer added
    # by hand.
    assert p.device.extra_status["wgvsock_enclave_key"] == key.hex()  # type: ignore[attr-defined]


class SlowDevice(Device):
    """Holds the first install inside configure() until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def uapi_set(self, cfg) -> None:
        if not self.configs:
            self.entered.set()
            assert self.release.wait(10)
        super().uapi_set(cfg)


def test_a_reload_during_an_install_judges_the_enclave_that_install_puts_in(tmp_path) -> None:
    """The install had passed its policy check and was inside configure() when the reload
    came: the reload's check of the running enclave waits for it, then removes it."""
    p = Parent(profile())
    device = SlowDevice()
    p.device = device  # type: ignore[assignment]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "control.sock"))
    listener.listen(4)
    p.control = ControlServer(listener, profile="pay", public_key=b"P" * 32, wg_port=51820,
                              verify=p._verify, install=p._install_enclave)
    p.control.start()
    enclave = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        enclave.connect(str(tmp_path / "control.sock"))
        # The reload removes this enclave: its registration ends welcomed or with the
        # connection closed, whichever the removal comes before.
        ended: list[object] = []

        def enclave_side() -> None:
            try:
                ended.append(register(enclave, b"E" * 32))
            except ControlError as exc:
                ended.append(exc)

        registered = threading.Thread(target=enclave_side)
        registered.start()
        assert device.entered.wait(10)  # verified (no document: fine), now installing
        result: list[list[str]] = []
        reload = threading.Thread(target=lambda: result.append(p.reload(profile(
            BASE + "attestation:\n  require: true\n  pcrs: {0: " + "ab" * 48 + "}\n"))))
        reload.start()
        device.release.set()
        reload.join(10)
        registered.join(10)
        assert len(ended) == 1, "the enclave's registration never ended"
        assert result and "removed the running enclave" in result[0][0], result
        assert p.enclave_key is None
        assert device.configs[-1].peers == [] and device.configs[-1].replace_peers
    finally:
        enclave.close()
        p.control.close()


# A stand-in parent for request_reload: a process whose command line names wgvsock, which
# answers each SIGHUP by recording an outcome in the state file (the reload "takes" 0.3 s),
# as reload_from_file does.
FAKE_PARENT = r"""
import json, os, signal, sys, time
state = sys.argv[1]
pending = []
signal.signal(signal.SIGHUP, lambda *_: pending.append(1))
print("ready", flush=True)
while True:
    if not pending:
        signal.pause()
        continue
    pending.clear()
    try:
        request = open(state.replace(".json", ".reload-request")).read()
    except OSError:
        request = ""
    print("started", flush=True)
    time.sleep(0.3)
    data = json.load(open(state))
    seq = data["reload"]["seq"] + 1
    data["reload"] = {"seq": seq, "ok": True, "message": f"outcome {seq}", "sha256": "",
                      "request": request}
    with open(state + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(state + ".tmp", state)
"""


@pytest.fixture
def fake_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir(mode=0o700)
    path = tmp_path / "pay.yaml"
    path.write_text(BASE)
    state = tmp_path / "state" / "pay.json"
    proc = subprocess.Popen([sys.executable, "-c", FAKE_PARENT, str(state), "wgvsock"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = state_module.start_time(proc.pid) or 0
    State("pay", proc.pid, "wg0", str(path), started=started).save()
    try:
        yield proc, path, state
    finally:
        proc.kill()
        proc.wait(10)


def test_concurrent_reloads_each_get_their_own_outcome(fake_parent) -> None:
    """Two `parent reload`s at once (a manual one and systemctl's): each must report the
    outcome of a reload that began after it asked, not the other's."""
    _, path, _ = fake_parent
    p = parse_profile(BASE, str(path))
    results: list[tuple[bool, str]] = []
    threads = [threading.Thread(target=lambda: results.append(request_reload(p, timeout=20)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(m for _, m in results) == ["outcome 1", "outcome 2"]


def test_a_reload_waits_for_its_own_outcome_not_a_bare_sighups(fake_parent) -> None:
    """A `kill -HUP` (or a reload that timed out and finished late) records an outcome too;
    the next `parent reload` must not take it for its own."""
    proc, path, _ = fake_parent
    proc.send_signal(signal.SIGHUP)  # outcome 1, for nobody: under way when we ask
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    ok, message = request_reload(parse_profile(BASE, str(path)), timeout=20)
    assert ok and message == "outcome 2"


def test_a_reload_never_signals_an_older_parent_or_a_reused_pid(fake_parent) -> None:
    proc, path, state = fake_parent
    p = parse_profile(BASE, str(path))
    data = json.loads(state.read_text())
    # A parent of a version before reload (no "reload" in its state): SIGHUP would kill it.
    del data["reload"]
    state.write_text(json.dumps(data))
    with pytest.raises(RoleError, match="older version that cannot reload"):
        request_reload(p, timeout=5)
    # A crashed parent's pid now used by another process: not ours, so "not up".
    data["reload"] = {"seq": 0}
    data["started"] = data["started"] + 1
    state.write_text(json.dumps(data))
    with pytest.raises(RoleError, match="profile 'pay' is not up"):
        request_reload(p, timeout=5)
    assert proc.poll() is None  # never signalled


def test_a_renamed_profile_is_told_apart_from_one_that_is_not_up(fake_parent) -> None:
    _, path, _ = fake_parent
    renamed = parse_profile(BASE.replace("name: pay", "name: payroll"), str(path))
    with pytest.raises(RoleError, match=r"is profile 'pay'; the file now names 'payroll' "
                                        r"\(line 2\)"):
        request_reload(renamed, timeout=5)


def test_an_outcome_that_cannot_be_saved_does_not_stop_the_parent(monkeypatch, tmp_path):
    """A full or broken state directory costs the record of one reload, never the parent
    (an exception here would reach `up`'s loop, which would take the tunnel down)."""
    path = tmp_path / "pay.yaml"
    path.write_text(BASE)
    p = Parent(parse_profile(BASE, str(path)))
    p._state = State("pay", 1, "wg0", str(path))

    def full(self) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(State, "save", full)
    assert parent_module.reload_from_file(p) is True
    assert p._state.reload["seq"] == 1 and p._state.reload["message"] == "nothing changed"


def test_a_table_gone_before_its_rules_were_counted_is_put_back(monkeypatch) -> None:
    """After a load whose rules could not be counted, the next check must not take a deleted
    (-1) or emptied (0) table as the baseline: it would never be put back, and the enclave
    would be forwarded unfiltered (a review found that)."""
    from wgvsock.services import firewall

    p = Parent(profile())
    p._table, p._rules = True, None
    put_back: list[bool] = []

    def replace_table(profile, *, keep_counters: bool) -> int:
        put_back.append(keep_counters)
        return 0

    monkeypatch.setattr(p, "_replace_table", replace_table)
    for gone in (-1, 0):
        monkeypatch.setattr(firewall, "rule_count", lambda name, netns=None, n=gone: n)
        p._rules = None
        p.check_firewall()
    assert put_back == [False, False]
    monkeypatch.setattr(firewall, "rule_count", lambda name, netns=None: 42)
    p._rules = None
    p.check_firewall()
    assert p._rules == 42 and len(put_back) == 2


def test_a_table_that_cannot_be_read_for_a_while_does_not_stop_the_parent(
    monkeypatch, caplog
) -> None:
    """Before: one `nft list` that failed or timed out (30 s: a loaded CI guest) raised at once,
    and the parent stopped, taking the enclave's network down, though nothing said the table
    was gone. Now it is said once and tried again; only a table unreadable for
    _FIREWALL_UNREADABLE_LIMIT stops it, as one that cannot be put back does."""
    from wgvsock.services import firewall

    p = Parent(profile())
    p._table, p._rules = True, 42
    clock = [1000.0]
    monkeypatch.setattr(parent_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    put_back: list[bool] = []
    monkeypatch.setattr(p, "_replace_table",
                        lambda profile, *, keep_counters: put_back.append(keep_counters))

    def slow(name, netns=None):
        raise firewall.FirewallTimeout("`nft -j -t list table inet wgvsock_pay` did not "
                                       "finish within 30 s")

    monkeypatch.setattr(firewall, "rule_count", slow)
    with caplog.at_level(logging.INFO, logger="wgvsock.parent"):
        for _ in range(3):
            p.check_firewall()
            clock[0] += 30.0
        # Readable again, unchanged: nothing put back, and said.
        monkeypatch.setattr(firewall, "rule_count", lambda name, netns=None: 42)
        p.check_firewall()
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "cannot read nftables table" in m]) == 1, said
    assert any("read again" in m for m in said), said
    assert put_back == []
    # Unreadable for the whole limit: stops, naming how long and why.
    monkeypatch.setattr(firewall, "rule_count", slow)
    p.check_firewall()
    clock[0] += parent_module._FIREWALL_UNREADABLE_LIMIT
    with pytest.raises(RoleError, match=r"could not be read for 120 s .*did not finish"):
        p.check_firewall()


def test_two_threads_saving_the_state_do_not_undo_each_other(monkeypatch, tmp_path) -> None:
    """The enclave supervisor's thread and a reload save the same state file: the later
    save must hold both changes (before: the slower writer put back its older snapshot)."""
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(tmp_path))
    state = State("pay", 4242, "wg0", "/etc/wgvsock/pay.yaml")
    dumps = json.dumps
    first_inside = threading.Event()
    let_first_go = threading.Event()

    def slow_dumps(obj, **kw):
        if threading.current_thread().name == "supervisor":
            text = dumps(obj, **kw)  # the snapshot, taken before the other thread's change
            first_inside.set()
            assert let_first_go.wait(10)
            return text
        return dumps(obj, **kw)

    monkeypatch.setattr(state_module.json, "dumps", slow_dumps)

    def supervisor() -> None:
        state.enclave = {"id": "i-1", "cid": 16, "name": "wgvsock-pay"}
        state.save()

    t = threading.Thread(target=supervisor, name="supervisor")
    t.start()
    assert first_inside.wait(10)

    def reload() -> None:
        state.reload = {"seq": 1, "ok": True, "message": "nothing changed"}
        state.save()

    r = threading.Thread(target=reload)
    r.start()
    r.join(0.2)  # with the lock it waits for the supervisor's save
    let_first_go.set()
    t.join(10)
    r.join(10)
    saved = State.load("pay")
    assert saved is not None
    assert saved.enclave["id"] == "i-1" and saved.reload["seq"] == 1


def test_a_stop_signal_while_starting_is_reported_not_ready(monkeypatch) -> None:
    """`parent down` (SIGTERM) racing `parent up`: the launcher must not print that it is up."""
    closed = []

    def start(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: run_up installs its handler first

    monkeypatch.setattr(Parent, "start", start)
    monkeypatch.setattr(Parent, "close", lambda self: closed.append(True))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    r, w = os.pipe()
    try:
        assert parent_module.run_up(profile(), w) == 0
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    with os.fdopen(r, "rb") as pipe:
        report = pipe.read().decode()
    assert "stopped by a signal while starting" in report
    assert closed == [True]


def test_a_start_failure_of_any_kind_reaches_the_launcher(monkeypatch) -> None:
    """nft refusing the table raised FirewallError (a RuntimeError), which escaped run_up:
    in the background the launcher only said "the daemon exited during start-up" (review)."""
    from wgvsock.services.firewall import FirewallError

    def start(self) -> None:
        raise FirewallError("nft refused the ruleset: no such table")

    monkeypatch.setattr(Parent, "start", start)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    r, w = os.pipe()
    try:
        assert parent_module.run_up(profile(), w) == 1
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    with os.fdopen(r, "rb") as pipe:
        # The profile named as one: "parent up pay: ..." read as if `pay` were a command.
        assert b"profile 'pay': nft refused the ruleset: no such table" in \
            pipe.read()


def test_the_test_root_is_the_one_read_at_up_until_a_reload_reads_it_again(tmp_path) -> None:
    """attestation.test_root_ca was checked (test_root_check) at `up` and `reload`, then read
    again at each registration without that check: a file that became replaceable meanwhile
    chose which documents pass for a genuine enclave's. It is read once, after the check, and
    kept; a reload checks and reads it again (and judges the running enclave by it)."""
    from tests.attest_fixtures import TEST_PCRS, make_document, make_test_ca
    from wgvsock.services.control import attested_nonce

    ca, other = make_test_ca(), make_test_ca(name="other")
    d = tmp_path / "ca"
    d.mkdir(mode=0o700)
    root = ca.write_root(d)
    text = BASE + (f"attestation:\n  require: true\n  pcrs: {{0: {TEST_PCRS[0].hex()}}}\n"
                   f"  test_root_ca: {root}\n")
    p = Parent(profile(text))
    p.device = Device()  # type: ignore[assignment]
    p.control = Control()  # type: ignore[assignment]
    key, nonce = b"K" * 32, b"n" * 32

    def document(by) -> bytes:
        return make_document(by, nonce=attested_nonce(nonce), public_key=key)

    p.load_test_root()  # as `up` does, after its checks
    assert p._verify(key, document(ca), nonce).accepted
    # Another root put in its place: not read until a reload.
    swapped = d / "swap.pem"
    swapped.write_bytes(other.root_pem)
    os.replace(swapped, root)
    assert p._verify(key, document(ca), nonce).accepted
    refused = p._verify(key, document(other), nonce)
    assert not refused.accepted and "attestation refused" in refused.reason
    p._install_enclave(key, p._verify(key, document(ca), nonce))
    assert p.enclave_key == key
    # A reload reads it again: the same profile, another root. The running enclave, whose
    # document the old root signed, is judged by the new one and removed.
    done = p.reload(profile(text))
    assert any(f"attestation.test_root_ca: {root} holds another certificate" in line
               for line in done), done
    assert any("removed the running enclave" in line for line in done), done
    assert p._verify(key, document(other), nonce).accepted
    assert not p._verify(key, document(ca), nonce).accepted
    # A root that others could replace by the time of a reload: refused, the kept one stays.
    d.chmod(0o777)
    with pytest.raises(RoleError, match=f"not reloaded: attestation.test_root_ca {root}: {d} "
                                        "is writable"):
        p.reload(profile(text))
    assert p._verify(key, document(other), nonce).accepted
    d.chmod(0o700)
    assert p.reload(profile(text)) == ["nothing changed"]


class Control:
    """What Parent._recheck_enclave uses of the control server: revalidate."""

    def revalidate(self, admitted, remove) -> bool:
        if admitted():
            return True
        remove()
        return False


def test_a_reload_to_an_egress_interface_the_host_lacks_changes_nothing(monkeypatch) -> None:
    """nft takes any `oifname`: the new table would have masqueraded nothing."""
    p = Parent(profile())
    monkeypatch.setattr(Parent, "_reload_firewall",
                        lambda *a: pytest.fail("the table must not be replaced"))
    new = profile(**{"  egress:\n": "  egress:\n    interface: h3none0\n"})
    with pytest.raises(RoleError, match=r"not reloaded: pay.yaml:9: parent.egress.interface: "
                       r"this host has no interface h3none0"):
        p.reload(new)
    assert p.profile.parent.egress.interface is None


def test_a_reload_failing_on_an_error_that_cannot_be_said_is_still_reported(
        monkeypatch, tmp_path) -> None:
    """A bug in one reload is reported as not reloaded, the parent going on, even when the
    exception's own message cannot be made (before, making the report raised again, out of
    the SIGHUP handler's thread)."""
    path = tmp_path / "pay.yaml"
    path.write_text(BASE)
    p = Parent(parse_profile(BASE, str(path)))
    p._state = State("pay", 1, "wg0", str(path))
    monkeypatch.setattr(State, "save", lambda self: None)

    def broken(self, new):
        raise Unsayable

    monkeypatch.setattr(Parent, "reload", broken)
    assert parent_module.reload_from_file(p) is False
    assert p._state.reload["message"] == ("not reloaded: internal error: Unsayable (its "
                                          "message cannot be shown: ValueError)")


def test_a_start_failing_on_an_error_that_cannot_be_said_is_still_reported(
        monkeypatch, tmp_path) -> None:
    """`parent up` whose start fails on an exception whose message cannot be made still
    tells its launcher why, in one line (safetext.message). Before, making that line raised
    again, out of run_up: nothing was reported, and the launcher said only that the
    background process exited during start-up."""
    path = tmp_path / "pay.yaml"
    path.write_text(BASE)

    def broken(self):
        raise Unsayable

    # Nothing of the host is touched: start fails at once, and close has nothing to undo.
    monkeypatch.setattr(Parent, "start", broken)
    monkeypatch.setattr(Parent, "close", lambda self: None)
    monkeypatch.setattr(parent_module, "forbid_core_dumps", lambda: None)
    monkeypatch.setattr(parent_module, "enable_stack_dumps", lambda: None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    r, w = os.pipe()
    try:
        assert parent_module.run_up(parse_profile(BASE, str(path)), w) == 1
        with os.fdopen(r, "rb") as report:
            r = -1
            assert report.read() == (b"profile 'pay': Unsayable (its message "
                                     b"cannot be shown: ValueError)\n")
    finally:
        if r >= 0:
            os.close(r)
        for s, h in handlers.items():
            signal.signal(s, h)
