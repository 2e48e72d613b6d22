"""The state file of a running parent (`/run/wgvsock/NAME.json`), and what other commands
do through it: `parent reload` signals the parent it names and waits for the outcome recorded
there; `parent down` finds what a crashed `up` left behind; `parent up` sees one already running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..services import firewall
from .common import RoleError, is_alive, state_dir


@dataclass
class State:
    name: str
    pid: int
    interface: str
    profile: str
    forwarding: dict = field(default_factory=dict)
    sockets: list[str] = field(default_factory=list)
    enclave: dict = field(default_factory=dict)  # the enclave `up` started: id, cid, name
    # The last reload's outcome: seq, ok, message, the SHA-256 of the file version it read,
    # and the request of the `parent reload` it answers. Its presence says this parent takes
    # SIGHUP as a reload (an older one would die of it).
    reload: dict = field(default_factory=lambda: {"seq": 0})
    # The process's start time (clock ticks since boot, /proc/PID/stat): a pid reused by
    # another process after a crash must never be signalled as ours. 0: not recorded.
    started: int = 0

    @staticmethod
    def path_for(name: str) -> Path:
        return Path(state_dir()) / f"{name}.json"

    def save(self) -> None:
        path = self.path_for(self.name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The main thread (a reload) and the enclave supervisor's thread may save at once:
        # one at a time, each from the state as it is then, so neither undoes the other.
        with _SAVE_LOCK:
            text = json.dumps(self.__dict__, indent=2)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{self.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def running(self) -> bool:
        """Whether the parent this state names still runs (the same process, not its pid
        reused)."""
        if not is_alive(self.pid):
            return False
        return not self.started or start_time(self.pid) == self.started

    @classmethod
    def load(cls, name: str) -> State | None:
        try:
            return cls(**json.loads(cls.path_for(name).read_text()))
        except FileNotFoundError:
            return None
        except PermissionError as e:
            raise RoleError(f"cannot read the state file {cls.path_for(name)}: permission "
                            "denied (run as root, as `parent up` does)") from e
        except OSError as e:
            raise RoleError(f"cannot read the state file {cls.path_for(name)}: "
                            f"{e.strerror or e}") from e
        except (ValueError, TypeError) as e:
            raise RoleError(f"state file {cls.path_for(name)} is corrupt ({e}); remove it and "
                            "run `wgvsock parent down` again") from e


_SAVE_LOCK = threading.Lock()


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22, counted after the command name, which may hold spaces and parentheses.
    try:
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def request_path(name: str) -> Path:
    return State.path_for(name).with_suffix(".reload-request")


def others_running(name: str) -> list[str]:
    """The profiles other than NAME whose parent runs on this host (by their state files)."""
    out = []
    for file in sorted(Path(state_dir()).glob("*.json")):
        if file.stem == name:
            continue
        with contextlib.suppress(RoleError, OSError):
            state = State.load(file.stem)
            if state is not None and state.running():
                out.append(state.name)
    return out


def restore_forwarding(name: str, previous: dict) -> str | None:
    """Puts back the forwarding sysctls parent NAME changed (PREVIOUS: their values before),
    unless another parent still runs: it needs them on, and found them on, so it recorded
    nothing to restore. Then PREVIOUS goes to the host's record, which the last parent to
    stop puts back. Returns why they were left on, or None."""
    path = Path(state_dir()) / "forwarding.json"
    with _SAVE_LOCK:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        merged = {**previous, **record}  # the earliest value before any parent wins
        others = others_running(name)
        if others:
            if merged != record:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(merged))
                os.replace(tmp, path)
            return (f"IP forwarding left on: the parent of {', '.join(others)} still runs "
                    "and needs it")
        if merged:
            firewall.restore_forwarding(merged)
        path.unlink(missing_ok=True)
    return None


def running_from(path: str) -> State | None:
    """The state of a running parent whose profile is the file PATH, whatever its name."""
    real = os.path.realpath(path)
    for file in sorted(Path(state_dir()).glob("*.json")):
        with contextlib.suppress(RoleError, OSError):
            state = State.load(file.stem)
            if state is not None and os.path.realpath(state.profile) == real \
                    and state.running():
                return state
    return None


def request_reload(profile, timeout: float = 60.0) -> tuple[bool, str]:
    """`wgvsock parent reload`: signals the running parent of PROFILE and waits for the
    outcome it records. PROFILE must be the file it runs from (that is what it re-reads).
    Reloads of one profile take turns (a lock file), so each waits for its own outcome."""
    import fcntl

    from ..services.profile import ProfileError, load_profile_digest

    state = State.load(profile.name)
    if state is None or not state.running():
        other = running_from(profile.path)
        if other is not None:
            raise RoleError(f"the parent running from {profile.path} is profile "
                            f"{other.name!r}; the file now names {profile.name!r} (line "
                            f"{profile.line_of('name')}): a new name needs `wgvsock parent "
                            f"down` and `up`, or put the old name back")
        raise RoleError(f"profile {profile.name} is not up: start it with "
                        f"`wgvsock parent up --profile {profile.path}`")
    if os.path.realpath(state.profile) != os.path.realpath(profile.path):
        raise RoleError(f"the running parent of {profile.name} reads {state.profile}, not "
                        f"{profile.path}: edit that file and reload, or run `parent down` "
                        "and `up` with this one")
    try:
        raw = json.loads(State.path_for(profile.name).read_text())
    except (OSError, ValueError) as e:
        raise RoleError(f"cannot read {State.path_for(profile.name)}: {e}") from None
    if "reload" not in raw:
        raise RoleError(f"the running parent of {profile.name} (pid {state.pid}) is an older "
                        "version that cannot reload (SIGHUP would stop it): restart it with "
                        "`wgvsock parent down` and `up` once, then reload")
    lock = State.path_for(profile.name).with_suffix(".reload.lock")
    with open(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        current = State.load(profile.name)
        seq = (current or state).reload.get("seq", 0)
        # Our request, which the parent echoes in the outcome of the reload it starts after
        # reading it: an outcome of a bare SIGHUP, or of an earlier reload that finished late,
        # is not ours.
        request = os.urandom(16).hex()
        tmp = request_path(profile.name).with_suffix(".tmp-request")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                          0o600), "w") as f:
            f.write(request)
        os.replace(tmp, request_path(profile.name))
        try:
            _, digest = load_profile_digest(profile.path)
        except ProfileError:
            digest = ""
        try:
            os.kill(state.pid, signal.SIGHUP)
        except ProcessLookupError:
            raise RoleError(f"the parent of {profile.name} (pid {state.pid}) stopped") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = State.load(profile.name)
            if now is None or not state.running():
                raise RoleError(f"the parent of {profile.name} (pid {state.pid}) stopped")
            outcome = now.reload
            # A parent of a build before request ids echoes none: then any newer outcome.
            if outcome.get("request", request if outcome.get("seq", 0) > seq else None) \
                    == request:
                message = str(outcome.get("message", ""))
                if digest and outcome.get("sha256") and outcome["sha256"] != digest:
                    message += (f"\n(note: {profile.path} changed while it was reloaded; the "
                                "parent applied the version it read then)")
                return bool(outcome.get("ok")), message
    raise RoleError(f"the parent of {profile.name} (pid {state.pid}) did not answer within "
                    f"{timeout:.0f} s; see its log")


def already_up(profile) -> int | None:
    state = State.load(profile.name)
    if state is not None and state.running():
        return state.pid
    return None
