"""The state file of a running parent (`/run/wgvsock/NAME.json`), and what other commands
do through it: `parent reload` signals the parent it names and waits for the outcome recorded
there; `parent down` finds what a crashed `up` left behind; `parent up` sees one already running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..pathwalk import Replaceable, keepers, walk
from ..safetext import shell
from ..services import firewall
from .common import RoleError, is_alive, named, state_dir


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
    # code_fingerprint() of wgvsock's files when the parent started ("": not recorded, by a
    # release before it was): code_replaced() compares the files now with it.
    code: str = ""
    # The IP families whose forwarding this parent needs ("ipv4", "ipv6": those its tunnel
    # has addresses of). None: not recorded (a release before it was), taken as both. A
    # parent stopping puts back a family's forwarding once no other parent needs it.
    families: list[str] | None = None

    # Fields are only ever added, never renamed or given another meaning: a release reads the
    # ones it knows in a file a later one wrote (a downgrade), and lists the others in
    # `newer_fields` (set by load, never saved): what they record, it cannot undo.
    def __post_init__(self) -> None:
        self.newer_fields: list[str] = []

    @staticmethod
    def path_for(name: str) -> Path:
        return Path(state_dir()) / f"{name}.json"

    def save(self) -> None:
        path = self.path_for(self.name)
        state_directory(make=True)
        # The main thread (a reload) and the enclave supervisor's thread may save at once:
        # one at a time, each from the state as it is then, so neither undoes the other.
        with _SAVE_LOCK:
            text = json.dumps(asdict(self), indent=2)
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
        """The state file of profile NAME, or None when there is none. Raises StateFileError
        for one that is not usable (damaged, or one that someone other than root or this
        user could have written: `down` as root writes the sysctls it names and signals its
        pid), RoleError when it cannot be read at all. The state directory is checked first
        (state_directory): a file in one that others may change proves nothing."""
        path = cls.path_for(name)
        state_directory()
        try:
            raw = json.loads(read_trusted(path, "state file"))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise StateFileError(f"state file {path} is not valid JSON ({e}); {_ADVICE}") from e
        return cls._checked(path, raw)

    @classmethod
    def _checked(cls, path: Path, raw: object) -> State:
        def bad(what: str) -> StateFileError:
            return StateFileError(f"state file {path}: {what}; {_ADVICE}")

        if not isinstance(raw, dict):
            raise bad(f"holds {type(raw).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        newer = sorted(key for key in raw if key not in known)
        for key in ("name", "pid", "interface", "profile"):
            if key not in raw:
                raise bad(f"field {key!r} is missing")
        for key in ("name", "interface", "profile"):
            if not isinstance(raw[key], str):
                raise bad(f"field {key!r} is {raw[key]!r}, not a string")
        pid = raw["pid"]
        # 1: a parent that is a container's first process.
        if type(pid) is not int or not 0 < pid <= PID_MAX:
            raise bad(f"field 'pid' is {pid!r}, not a process id (an integer from 1 to "
                      f"{PID_MAX})")
        started = raw.get("started", 0)
        if type(started) is not int or started < 0 or started >= 2**64:
            raise bad(f"field 'started' is {started!r}, not a start time (clock ticks)")
        try:
            firewall.check_forwarding_record(raw.get("forwarding", {}))
        except ValueError as e:
            raise bad(f"field 'forwarding': {e}") from None
        sockets = raw.get("sockets", [])
        if not isinstance(sockets, list) or not all(isinstance(x, str) for x in sockets):
            raise bad(f"field 'sockets' is {sockets!r}, not a list of paths")
        enclave = raw.get("enclave", {})
        # nitro-cli before 1.2 reports no EnclaveName: the parent records None.
        if not isinstance(enclave, dict) or not all(
                isinstance(enclave.get(k, ""), str | None) for k in ("id", "name")) \
                or type(enclave.get("cid", 0)) is not int:
            raise bad(f"field 'enclave' is {enclave!r}, not {{id, cid, name}}")
        if not isinstance(raw.get("code", ""), str):
            raise bad(f"field 'code' is {raw['code']!r}, not a string")
        families = raw.get("families")
        if families is not None and (not isinstance(families, list)
                                     or not all(f in FAMILIES for f in families)):
            raise bad(f"field 'families' is {families!r}, not a list of "
                      + " and ".join(repr(f) for f in FAMILIES))
        reload = raw.get("reload", {"seq": 0})
        if not isinstance(reload, dict) or type(reload.get("seq", 0)) is not int:
            raise bad(f"field 'reload' is {reload!r}, not {{seq, ...}}")
        state = cls(**{key: value for key, value in raw.items() if key in known})
        state.newer_fields = newer
        return state

    def newer_note(self) -> str:
        """What this release cannot do about a state file a later one wrote ("" if none)."""
        if not self.newer_fields:
            return ""
        names = ", ".join(repr(n) for n in self.newer_fields[:10])
        return (f"state file {self.path_for(self.name)} holds {names}, which a newer wgvsock "
                f"wrote and this one does not know: what that records was not undone")

    def code_replaced(self, package: Path | None = None) -> bool:
        """Whether wgvsock's files (PACKAGE: this process's) changed after this parent started:
        it runs the code it imported then (a package upgraded, or downgraded, without a
        restart). By the fingerprint of its files the parent recorded (code_fingerprint), so
        a `chmod -R` or `chown -R` of the package is no upgrade. False when unknown."""
        began = started_at(self.pid, self.started)
        if began is None:
            return False
        package = package or _PACKAGE
        if self.code:
            return code_fingerprint(package) != self.code
        # A parent of a release that recorded none: their ctime, which no installer can set
        # back (dpkg and rpm set the mtime to the package's), though a chmod or chown moves it.
        newest = 0.0
        for pattern in ("*.py", "*.so"):
            for path in package.rglob(pattern):
                with contextlib.suppress(OSError):
                    newest = max(newest, path.stat().st_ctime)
        # The start time is known to the second at best (the boot time it counts from).
        return newest > began + 2.0


_PACKAGE = Path(__file__).resolve().parents[1]


def code_fingerprint(package: Path | None = None) -> str:
    """What changes when wgvsock's files (PACKAGE: this process's) are replaced, and not when
    their owner or mode is: each .py and .so file's path, inode, mtime and size, hashed.
    Installers (pip, dpkg, rpm) write a new file and rename it over the old one, which gives
    it a new inode whatever mtime they set; an edit in place moves the mtime. A stat per
    file: about 1 ms for the package, where hashing the contents took 5 ms warm, and
    reading a few MiB from disk cold."""
    package = package or _PACKAGE
    digest = hashlib.sha256()
    for pattern in ("*.py", "*.so"):
        for path in sorted(package.rglob(pattern)):
            with contextlib.suppress(OSError):  # gone meanwhile: left out, which differs
                st = path.stat()
                digest.update(f"{path.relative_to(package)}\0{st.st_ino}\0{st.st_mtime_ns}"
                              f"\0{st.st_size}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


class StateFileError(RoleError):
    """A state file (or the host's forwarding record) that is there but not usable."""


class StateDirError(StateFileError):
    """The state directory, or one above it, is one that someone other than root or this
    user could change: no file in it can be trusted, and nothing is written there."""


def state_directory(make: bool = False) -> Path:
    """The state directory, once it is known that only root or this user can change what is
    in it: it, every directory on its way from /, and every link followed there (each link of
    a chain where it is) are root's or this user's and writable by no one else (sticky
    directories above it excepted), as the EIF and attestation.test_root_ca must be, and the
    socket directories are: pathwalk.walk. Checking each state file is not enough: whoever
    may write the directory can swap a checked file for their own before the next read, or
    plant a forwarding record. The directory itself may not be shared even if sticky (as
    /tmp is): others could still add files to it.

    MAKE: makes it, and any missing directory above it, 0700 first (what is there is checked
    before anything is made in it). Without MAKE a missing directory is fine (there is no
    state) once the directories that are there pass. A directory others may only read (0755)
    is taken as it is: the files in it are 0600 and say nothing secret, and it is the
    operator's to open. One others may write is refused rather than tightened: what is in it
    may already be someone else's, which chmod would not undo. Raises StateDirError."""
    directory = Path(os.path.abspath(state_dir()))
    me = os.geteuid()

    def refuse(where: object, why: str, fix: str) -> StateDirError:
        return StateDirError(
            f"state directory {directory}: {where} {why}, so another user could replace the "
            f"state files in it, which choose the sysctls `parent down` writes and the "
            f"processes it signals. Nothing was read from it or written to it. Make it, every "
            f"directory on its way and every link there {keepers()} and writable by no one "
            f"else ({fix}), or point WGVSOCK_STATE_DIR at a directory that already is so")

    try:
        found = walk(str(directory), make=make)
    except Replaceable as e:
        fault = e.fault
        if fault.kind == "owner" or fault.kind == "mode":
            why, fix = fault.said(me)
            raise refuse(fault.step, why, f"`{fix}`") from None
        if fault.kind == "links":
            raise StateDirError(f"state directory {directory}: too many symbolic links on "
                                f"its way (a loop?), at {fault.step}: point WGVSOCK_STATE_DIR "
                                "at the real directory") from None
        raise StateDirError(f"state directory {directory}: {fault.step} on its way is not a "
                            "directory: remove it or point WGVSOCK_STATE_DIR at a "
                            "directory") from None
    except OSError as e:
        raise RoleError(f"cannot make or check the state directory {directory}: "
                        f"{e.strerror or e} "
                        f"({e.filename or directory})") from None
    if found is None:
        return directory
    real, st = found
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state directory {directory} is not a directory: remove it or "
                            "point WGVSOCK_STATE_DIR at a directory")
    if st.st_mode & 0o022:  # sticky, or walk would have said so
        mode = stat.S_IMODE(st.st_mode)
        raise refuse(real, f"is shared (mode {mode:o}): anyone may add files to it",
                     f"`chmod go-w {shell(str(real))}` if it is wgvsock's own; a shared directory "
                     "such as /tmp is no place for them")
    return directory


# What a damaged or untrusted state file means for the user: `down` restores nothing from it.
_ADVICE = ("it is not one `wgvsock parent up` wrote. `parent down` removes what it can without "
           "it but cannot put back the IP forwarding settings it recorded: check them "
           "(sysctl net.ipv4.ip_forward net.ipv6.conf.all.forwarding and accept_ra), then "
           "remove the file")
# What State.families may hold: the families enable_forwarding turns on.
FAMILIES = ("ipv4", "ipv6")
# Linux's largest pid (PID_MAX_LIMIT, 2^22 on 64-bit).
PID_MAX = 4194304
# The host's record of the forwarding values stopped parents replaced (restore_forwarding),
# beside the state files: no parent's.
_RECORD = "forwarding.json"


def read_trusted(path: Path, what: str) -> str:
    """The text of PATH, a file that says what root's commands do (WHAT names it in errors):
    it must be a regular file owned by root or this user that no one else may write, as the
    parent's key file must. Raises FileNotFoundError when it is not there, StateFileError
    when it may not be trusted, RoleError when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except PermissionError as e:
        raise RoleError(f"cannot read the {what} {path}: permission denied (run as root, as "
                        "`parent up` does)") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateFileError(f"{what} {path} is a symbolic link: wgvsock writes a file "
                                 f"there; {_ADVICE}") from e
        raise RoleError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(f"{what} {path} is not a regular file; {_ADVICE}")
        if st.st_uid not in (0, os.geteuid()):
            raise StateFileError(
                f"{what} {path} is owned by uid {st.st_uid}, not by root or this user (uid "
                f"{os.geteuid()}): whoever wrote it would choose the sysctls `parent down` "
                f"writes and the process it signals. Nothing was taken from it; check it, then "
                f"remove it")
        if st.st_mode & 0o022:
            raise StateFileError(
                f"{what} {path} is writable by others (mode {st.st_mode & 0o777:o}): whoever "
                f"wrote it would choose the sysctls `parent down` writes and the process it "
                f"signals. Nothing was taken from it; check it, then remove it (wgvsock writes "
                f"it 0600)")
        try:
            return f.read().decode()
        except UnicodeDecodeError as e:
            raise StateFileError(f"{what} {path} is not text; {_ADVICE}") from e
        except OSError as e:
            raise RoleError(f"cannot read the {what} {path}: {e.strerror or e}") from e


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


def started_at(pid: int, started: int) -> float | None:
    """The wall-clock time process PID started, if it still runs with start time STARTED
    (clock ticks since boot; 0: not recorded, as by releases before it was, and then the pid's
    own)."""
    now = start_time(pid)
    if now is None or (started and now != started):
        return None
    started = now
    try:
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return boot + started / os.sysconf("SC_CLK_TCK")


def request_path(name: str) -> Path:
    return State.path_for(name).with_suffix(".reload-request")


def others_running(name: str) -> dict[str, str]:
    """The profiles other than NAME whose parent runs on this host, or may: by their state
    files. Each maps to "" when its file was read and names a running parent, and to what is
    wrong with its file when that cannot be used (damaged, or not to be
    trusted): such a parent counts as running unless the pid its file names shows otherwise,
    since taking it for stopped would put forwarding back under it."""
    out = {}
    for file in sorted(Path(state_dir()).glob("*.json")):
        if file.stem == name or file.name == _RECORD:
            continue
        try:
            state = State.load(file.stem)
        except RoleError as e:
            if _may_run(file, e):
                out[file.stem] = str(e)
            continue
        if state is not None and state.running():
            out[state.name] = ""
    return out


def _may_run(path: Path, error: RoleError) -> bool:
    """Whether the parent of PATH, a state file State.load refused with ERROR, may still run.
    It may unless the file can be trusted and parsed, and the pid in it is not a running
    wgvsock (or runs with another start time than recorded). Whatever else is wrong with the
    file does not make its pid less likely to be right."""
    if isinstance(error, StateDirError):
        return True  # nothing in the directory says anything
    try:
        raw = json.loads(read_trusted(path, "state file"))
    except FileNotFoundError:
        return False  # its parent stopped and removed it meanwhile
    except (RoleError, ValueError):
        return True
    if not isinstance(raw, dict):
        return True
    pid, started = raw.get("pid"), raw.get("started", 0)
    if type(pid) is not int or not 0 < pid <= PID_MAX:
        return True
    if type(started) is not int or not 0 <= started < 2**64:
        started = 0  # not recorded: the pid alone decides
    return State(path.stem, pid, "", "", started=started).running()


@dataclass(frozen=True)
class LeftOn:
    """Why restore_forwarding left forwarding on. UNCERTAIN: a state file that cannot be used
    decided it, which the operator has to look at (else it stays on after the last parent)."""

    message: str
    uncertain: bool = False

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def forwarding_lock() -> Iterator[None]:
    """Held while a parent turns forwarding on and records what it changed (`up`), and while
    one decides whether to put it back (a parent stopping, `down`): across processes, so that
    neither decides from what the other is half-way through. A flock on the state directory,
    which leaves no file behind."""
    directory = state_directory(make=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _forwarding_record(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(read_trusted(path, "forwarding record"))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise StateFileError(f"forwarding record {path} is not valid JSON ({e}); "
                             f"{_ADVICE}") from e
    try:
        return firewall.check_forwarding_record(raw)
    except ValueError as e:
        raise StateFileError(f"forwarding record {path}: {e}; {_ADVICE}") from None


def restore_forwarding(name: str, previous: dict) -> LeftOn | None:
    """Puts back the forwarding sysctls parent NAME changed (PREVIOUS: their values before),
    of each family (IPv4, IPv6) no other parent that still runs, or may (others_running),
    needs: such a parent found that family's forwarding on, so it recorded nothing of it to
    restore. PREVIOUS goes to the host's record first, which holds a family's values until
    the last parent needing it stops. Returns why some were left on, or None.

    Under forwarding_lock(), and a parent stopping (this process's own state file) removes
    its state file there before it looks for others: two parents stopping at once each saw
    the other still running and both left forwarding on."""
    path = Path(state_dir()) / _RECORD
    with forwarding_lock():
        record = _forwarding_record(path)
        merged = {**previous, **record}  # the earliest value before any parent wins
        if merged != record:
            _write_record(path, merged)
        with contextlib.suppress(RoleError):
            own = State.load(name)
            if own is not None and own.pid == os.getpid():
                State.path_for(name).unlink(missing_ok=True)
        others = others_running(name)
        needed = _families_needed(others)
        # An IPv4-only parent's values were kept until an IPv6-only one stopped too: the
        # record was one, whatever family each value was of.
        back = {k: v for k, v in merged.items() if _family(k) not in needed}
        kept = {k: v for k, v in merged.items() if _family(k) in needed}
        if back:
            firewall.restore_forwarding(back)
        if kept:
            if kept != merged:
                _write_record(path, kept)
        else:
            path.unlink(missing_ok=True)
        if others and needed:
            return _left_on(others, needed, {_family(k) for k in back})
    return None


def _write_record(path: Path, record: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(json.dumps(record))
    os.replace(tmp, path)


def _family(key: str) -> str:
    # accept_ra is IPv6's: it went to 2 because IPv6 forwarding came on.
    return "ipv4" if key.startswith("net/ipv4/") else "ipv6"


def _families_needed(others: dict[str, str]) -> set[str]:
    """The families whose forwarding the parents OTHERS (others_running) need. One whose
    state file cannot be used, or names no families (an older release), needs both."""
    needed: set[str] = set()
    for other, why in others.items():
        families: list[str] | None = None
        if not why:
            with contextlib.suppress(RoleError):
                state = State.load(other)
                if state is None:  # stopped meanwhile, and removed its file
                    continue
                families = state.families
        needed.update(FAMILIES if families is None else families)
    return needed


def _left_on(others: dict[str, str], needed: set[str], put_back: set[str]) -> LeftOn:
    running = [other for other, why in others.items() if not why]
    parts = [f"the parent of {', '.join(running)} still runs and needs it"] if running else []
    parts += [f"the parent of {other} may still run and need it, and is counted as running: "
              f"{_first_clause(why)}. Once no parent of {other} runs, `wgvsock parent down` "
              f"with its profile says what to check; remove that file, and the next `parent "
              f"down` puts these settings back"
              for other, why in others.items() if why]
    which = " and ".join(_FAMILY_NAMES[f] for f in FAMILIES if f in needed)
    back = " and ".join(_FAMILY_NAMES[f] for f in FAMILIES if f in put_back)
    also = f" ({back} forwarding put back: no parent left needs it)" if back else ""
    return LeftOn(f"IP forwarding left on for {which}{also}: " + "; ".join(parts),
                  uncertain=len(running) < len(others))


_FAMILY_NAMES = {"ipv4": "IPv4", "ipv6": "IPv6"}


def _first_clause(why: str) -> str:
    # A StateFileError's text goes on with advice for `down` of its own profile.
    return why.split("; ")[0].split(". Nothing was")[0]



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


def parents_of_file(path: str, name: str | None) -> list[State]:
    """The running parents of the profile file PATH that cannot be loaded (`parent down` with a
    file broken under its parent): the one running from PATH (running_from), and the one of
    profile NAME (what the file still says, if anything), as `down` finds it with a good file.
    Each by a state file State.load trusts, naming a process that is still that parent
    (State.running: its pid a wgvsock started when recorded). Two when they differ."""
    found = []
    if (by_path := running_from(path)) is not None:
        found.append(by_path)
    if name is not None and (by_path is None or by_path.name != name):
        with contextlib.suppress(RoleError):
            state = State.load(name)
            if state is not None and state.running():
                found.append(state)
    return found


def request_reload(profile, timeout: float = 60.0) -> tuple[bool, str]:
    """`wgvsock parent reload`: signals the running parent of PROFILE and waits for the
    outcome it records. PROFILE must be the file it runs from (that is what it re-reads).
    Reloads of one profile take turns (a lock file), so each waits for its own outcome."""
    from ..services.profile import ProfileError, load_profile_digest

    state = State.load(profile.name)
    if state is None or not state.running():
        other = running_from(profile.path)
        if other is not None:
            raise RoleError(f"the parent running from {profile.path} is profile "
                            f"{other.name!r}; the file now names {profile.name!r} (line "
                            f"{profile.line_of('name')}): a new name needs `wgvsock parent "
                            f"down` and `up`, or put the old name back")
        raise RoleError(f"{named(profile.name)} is not up: start it with "
                        f"`wgvsock parent up --profile {shell(profile.path)}`")
    if os.path.realpath(state.profile) != os.path.realpath(profile.path):
        raise RoleError(f"the running parent of {named(profile.name)} reads {state.profile}, "
                        f"not {profile.path}: edit that file and reload, or run `parent down` "
                        "and `up` with this one")
    try:
        raw = json.loads(State.path_for(profile.name).read_text())
    except (OSError, ValueError) as e:
        raise RoleError(f"cannot read {State.path_for(profile.name)}: {e}") from None
    if "reload" not in raw:
        raise RoleError(f"the running parent of {named(profile.name)} (pid {state.pid}) is an "
                        "older version that cannot reload (SIGHUP would stop it): restart it with "
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
            raise RoleError(f"the parent of {named(profile.name)} (pid {state.pid}) "
                            "stopped") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = State.load(profile.name)
            if now is None or not state.running():
                raise RoleError(f"the parent of {named(profile.name)} (pid {state.pid}) stopped")
            outcome = now.reload
            # A parent of a build before request ids echoes none: then any newer outcome.
            if outcome.get("request", request if outcome.get("seq", 0) > seq else None) \
                    == request:
                message = str(outcome.get("message", ""))
                if digest and outcome.get("sha256") and outcome["sha256"] != digest:
                    message += (f"\n(note: {profile.path} changed while it was reloaded; the "
                                "parent applied the version it read then)")
                return bool(outcome.get("ok")), message
    raise RoleError(f"the parent of {named(profile.name)} (pid {state.pid}) did not answer "
                    f"within {timeout:.0f} s; see its log")


def already_up(profile) -> int | None:
    state = State.load(profile.name)
    if state is not None and state.running():
        return state.pid
    return None


def running_code_note(profile) -> str:
    """For `up` that finds PROFILE's parent running: when wgvsock's files changed after it
    started, that it still runs the old code and how to switch ("" otherwise)."""
    with contextlib.suppress(RoleError):
        state = State.load(profile.name)
        if state is not None and state.running() and state.code_replaced():
            return (f"note: wgvsock's files changed after pid {state.pid} started (an upgrade or "
                    f"downgrade): it still runs the wgvsock it started with. To run this one, "
                    f"restart it: `wgvsock parent down --profile {shell(profile.path)}` and `up` "
                    f"again, or `systemctl restart wgvsock-parent@{profile.name}` under "
                    f"systemd; the enclave registers again within seconds")
    return ""
