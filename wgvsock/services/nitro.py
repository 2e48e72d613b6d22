"""Running the enclave from the parent: a `nitro-cli` wrapper and a supervisor (issue 4).

When a profile has `parent.enclave: {eif, cpu_count, memory_mib, cid, debug}`, `wgvsock parent
up` starts the enclave itself with `nitro-cli run-enclave`, reads the enclave's ID and CID back
from the JSON that command prints, watches it with `nitro-cli describe-enclaves` and its
nitro-cli enclave process (EnclaveProcess), and starts it again (with exponential backoff) when
it is gone, logging why. `parent down` terminates it.

What nitro-cli prints (aws-nitro-enclaves-cli, src/common/json_output.rs and the AWS user guide's
command reference):

- `run-enclave` writes progress ("Start allocating memory...", "Started enclave with
  enclave-cid: 16, memory: 1024 MiB, cpu-ids: [1, 3]") to stderr and one JSON object to stdout:
  {"EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB"}
  (older releases omit EnclaveName and ProcessID). A name already in use gets "_1", "_2", ...
- `describe-enclaves` prints a JSON list of {"EnclaveName", "EnclaveID", "ProcessID",
  "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB", "State", "Flags"}; State is "RUNNING" or
  "TERMINATING", Flags "NONE" or "DEBUG_MODE". An enclave that has exited is no longer listed,
  nor is one still booting: its enclave process opens the socket describe-enclaves (and
  terminate-enclave) connect to only once run-enclave has seen it boot (resource_manager.rs).
- `terminate-enclave --enclave-id ID` prints "Successfully terminated enclave ID." to stderr and
  {"EnclaveID": ID, "Terminated": true} (newer releases add "EnclaveName") to stdout.
- Failures exit non-zero with blocks like "[ E26 ] Insufficient memory requested. ..." on
  stderr, each followed by "For more details, please visit ..." and "If you open a support
  ticket, please provide the error log found at "...""; NitroError keeps the E-code blocks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..pathwalk import Replaceable, keepers, walk
from ..safetext import prose
from ..threads import NamedThread
from .profile import EnclaveLaunch

log = logging.getLogger("wgvsock.nitro")

NITRO_CLI = "nitro-cli"
# The least a run-enclave may take. nitro-cli loads the EIF, then waits for the enclave's
# heartbeat 90 s for each started 6 GiB of EIF plus 90 s for each started 100 GiB of its
# memory (resource_manager.rs, calculate_necessary_timeout): NitroCli.run_timeout_for.
RUN_TIMEOUT = 300.0
_BOOT_WAIT_UNIT = 90.0
_BOOT_MARGIN = 120.0  # loading the EIF into the enclave's memory comes before the wait
CALL_TIMEOUT = 60.0
# run-enclave refuses (E26) unless the enclave's memory is at least 4x its EIF file's size in
# bytes (resource_manager.rs, ENCLAVE_MEMORY_EIF_SIZE_RATIO; DESIGN.md §4).
EIF_MEMORY_FACTOR = 4

_ECODE_RE = re.compile(r"^\[ (E\d+) \]")
_E39_ECHO_RE = re.compile(r"; \[ E39 \] [^;]*$")
_FILE_RE = re.compile(r"File: '([^']*)', failing operation: '([^']*)'")
_LOG_RE = re.compile(r'error log found at "([^"]+)"')
_NOISE = ("For more details, please visit", "If you open a support ticket", "Failed connections:")


class NitroError(Exception):
    """nitro-cli failed. str() is nitro-cli's own message (its "[ Exx ] ..." blocks)."""

    def __init__(self, message: str, *, code: str | None = None, returncode: int | None = None,
                 stderr: str = "", stdout: str = "", log_path: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.returncode = returncode
        self.stderr = stderr
        # Kept: describe-enclaves prints the enclaves that answered before it fails (E38, E39).
        self.stdout = stdout
        self.log_path = log_path


def parse_error(stderr: str, stdout: str = "", returncode: int | None = None) -> NitroError:
    """Turns a failed nitro-cli's output into a NitroError carrying its own words."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for raw in stderr.splitlines():
        line = raw.strip()
        if _ECODE_RE.match(line):
            current = [line]
            blocks.append(current)
        elif not line or line.startswith(_NOISE):
            current = None
        elif current is not None:
            current.append(line)
    m = _LOG_RE.search(stderr)
    log_path = m.group(1) if m else None
    if blocks:
        message = "; ".join(" ".join(b) for b in blocks)
        code = _ECODE_RE.match(blocks[0][0]).group(1)  # type: ignore[union-attr]
        return NitroError(message, code=code, returncode=returncode, stderr=stderr,
                          stdout=stdout, log_path=log_path)
    # No E-code: most likely clap refusing the command line. Its "error: ..." paragraph comes
    # first and usage text after it, so the last lines alone would be the usage.
    errors = _clap_errors(stderr)
    if errors:
        message = "; ".join(errors)
        if "'--enclave-name'" in message:
            message += ("; nitro-cli before 1.1 has no --enclave-name: upgrade "
                        "aws-nitro-enclaves-cli")
        return NitroError(message, returncode=returncode, stderr=stderr, stdout=stdout,
                          log_path=log_path)
    lines = [ln.strip() for ln in (stderr or stdout).splitlines() if ln.strip()]
    message = " ".join(lines[-3:]) if lines else f"nitro-cli exited with status {returncode}"
    return NitroError(message, returncode=returncode, stderr=stderr, stdout=stdout,
                      log_path=log_path)


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def _clap_errors(stderr: str) -> list[str]:
    """The "error: ..." paragraphs of a clap message, each joined to one line: clap 2 and 3
    (nitro-cli up to 1.3) and clap 4 all start one so, and continue it (the arguments that are
    missing, say) up to a blank line. Colour codes, which clap adds on a terminal, go."""
    found: list[list[str]] = []
    current: list[str] | None = None
    for raw in _ANSI_RE.sub("", stderr).splitlines():
        line = raw.strip()
        if line.lower().startswith("error:"):
            current = [line]
            found.append(current)
        elif not line:
            current = None
        elif current is not None:
            current.append(line)
    return [" ".join(p) for p in found]


def _json_from(stdout: str, kind: type) -> Any:
    """The JSON document in stdout. nitro-cli writes its progress to stderr, but tolerate text
    before the document (as older releases and wrappers print)."""
    text = stdout.strip()
    try:
        value = json.loads(text)
    except RecursionError:  # nested deeper than the parser goes: no document of ours
        value = None
    except ValueError:
        value = None
        opener = "{" if kind is dict else "["
        decoder = json.JSONDecoder()
        for m in re.finditer(rf"^\s*\{opener}", stdout, re.MULTILINE):
            try:
                value, _ = decoder.raw_decode(stdout, m.end() - 1)
                break
            except (ValueError, RecursionError):
                continue
    if not isinstance(value, kind):
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise NitroError(f"nitro-cli printed no JSON {kind.__name__}: {shown!r}")
    return value


@dataclass(frozen=True)
class EnclaveInfo:
    """One enclave as nitro-cli reports it (run-enclave or describe-enclaves)."""

    enclave_id: str
    cid: int
    name: str | None = None
    memory_mib: int | None = None
    cpu_ids: tuple[int, ...] = ()
    cpu_count: int | None = None
    process_id: int | None = None
    state: str | None = None  # describe-enclaves only: RUNNING / TERMINATING
    flags: str | None = None  # describe-enclaves only: NONE / DEBUG_MODE
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: Any) -> EnclaveInfo:
        if not isinstance(obj, dict):
            raise NitroError(f"nitro-cli printed {type(obj).__name__}, not an enclave object")
        enclave_id, cid = obj.get("EnclaveID"), obj.get("EnclaveCID")
        if not isinstance(enclave_id, str) or not enclave_id:
            raise NitroError(f"nitro-cli's JSON has no EnclaveID: {obj!r}")
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise NitroError(f"nitro-cli's JSON has no valid EnclaveCID: {obj!r}")

        def opt_int(key: str) -> int | None:
            v = obj.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        def opt_str(key: str) -> str | None:
            v = obj.get(key)
            return v if isinstance(v, str) else None

        cpus = obj.get("CPUIDs")
        cpu_ids = tuple(c for c in cpus if isinstance(c, int)) if isinstance(cpus, list) else ()
        return cls(enclave_id, cid, opt_str("EnclaveName"), opt_int("MemoryMiB"), cpu_ids,
                   opt_int("NumberOfCPUs"), opt_int("ProcessID"), opt_str("State"),
                   opt_str("Flags"), dict(obj))

    @property
    def debug(self) -> bool:
        return self.flags == "DEBUG_MODE"


def enclave_name(profile_name: str) -> str:
    """The --enclave-name wgvsock gives the enclave of a profile."""
    return f"wgvsock-{profile_name}"


def is_named(info_name: str | None, name: str) -> bool:
    """nitro-cli renames a duplicate NAME to NAME_1, NAME_2, ...: all of them are ours."""
    if not info_name:
        return False
    return info_name == name or re.fullmatch(re.escape(name) + r"_\d+", info_name) is not None


class NitroCli:
    """`nitro-cli` run as a subprocess (never through a shell)."""

    def __init__(self, path: str = NITRO_CLI, *, env: dict[str, str] | None = None,
                 run_timeout: float | None = None, timeout: float = CALL_TIMEOUT) -> None:
        self.path = path
        self.env = env
        self.run_timeout = run_timeout
        self.timeout = timeout
        self._calls: set[subprocess.Popen] = set()  # in flight, for cancel()
        self._calls_lock = threading.Lock()

    def _call(self, args: Sequence[str], timeout: float,
              cancelled: Callable[[], bool] | None = None) -> str:
        """Runs nitro-cli ARGS. CANCELLED, asked as its process is registered for cancel():
        whether the caller was told to stop before then, when cancel() could not find it."""
        cmd = [self.path, *args]
        try:
            # errors="replace": bytes that are not UTF-8 must be a parse error, not a crash.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace", env=self.env)
        except FileNotFoundError:
            raise NitroError(f"{self.path} not found: install aws-nitro-enclaves-cli "
                             "(dnf install aws-nitro-enclaves-cli on Amazon Linux)") from None
        except PermissionError as e:
            raise NitroError(f"cannot run {self.path}: {e.strerror}") from None
        with self._calls_lock:
            self._calls.add(proc)
            if cancelled is not None and cancelled():
                proc.kill()
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise NitroError(f"`nitro-cli {args[0]}` did not finish within {timeout:.0f} s") \
                from None
        finally:
            with self._calls_lock:
                self._calls.discard(proc)
        if proc.returncode < 0:
            raise NitroError(f"`nitro-cli {args[0]}` was stopped (signal {-proc.returncode})")
        if proc.returncode != 0:
            raise parse_error(stderr, stdout, proc.returncode)
        return stdout

    def cancel(self) -> None:
        """Kills the calls in flight (a run-enclave booting for minutes, say); each raises
        NitroError. Later calls run as usual."""
        with self._calls_lock:
            calls = list(self._calls)
        for proc in calls:
            with contextlib.suppress(OSError):
                proc.kill()

    @staticmethod
    def run_args(launch: EnclaveLaunch, name: str | None = None) -> list[str]:
        args = ["run-enclave", "--eif-path", launch.eif, "--cpu-count", str(launch.cpu_count),
                "--memory", str(launch.memory_mib)]
        if launch.cid is not None:
            args += ["--enclave-cid", str(launch.cid)]
        if launch.debug:
            args.append("--debug-mode")
        if name:
            args += ["--enclave-name", name]
        return args

    def run_timeout_for(self, launch: EnclaveLaunch) -> float:
        """How long a run-enclave of LAUNCH may take: run_timeout when given, else what
        nitro-cli itself waits for the boot, and the time to load the EIF before it; at least
        RUN_TIMEOUT. (A fixed 300 s killed a large enclave mid-boot, and the next try too.)"""
        if self.run_timeout is not None:
            return self.run_timeout
        try:
            size = max(os.stat(launch.eif).st_size, 1)
        except OSError:
            return RUN_TIMEOUT  # run-enclave fails at once (E19)
        units = -(-size // (6 << 30)) + -(-launch.memory_mib // (100 << 10))
        return max(RUN_TIMEOUT, units * _BOOT_WAIT_UNIT + _BOOT_MARGIN)

    def run_enclave(self, launch: EnclaveLaunch, name: str | None = None,
                    cancelled: Callable[[], bool] | None = None) -> EnclaveInfo:
        try:
            out = self._call(self.run_args(launch, name), self.run_timeout_for(launch),
                             cancelled)
        except NitroError as e:
            # Its enclave process failed and sent no JSON, so the client adds E39 ("fails to
            # connect to at least one enclave process ... description information"): an
            # echo that misleads, after the cause.
            if e.code is not None and e.code != "E39":
                e.message = _E39_ECHO_RE.sub("", e.message)
                e.args = (e.message,)
            raise
        return EnclaveInfo.from_json(_json_from(out, dict))

    def describe_enclaves(self) -> list[dict]:
        out = self._call(["describe-enclaves"], self.timeout)
        value = _json_from(out, list)
        if not all(isinstance(e, dict) for e in value):
            raise NitroError(f"describe-enclaves printed a list of something else: {value!r}")
        return value

    def enclaves(self) -> list[EnclaveInfo]:
        return [EnclaveInfo.from_json(e) for e in self.describe_enclaves()]

    def terminate_enclave(self, enclave_id: str) -> dict:
        out = self._call(["terminate-enclave", "--enclave-id", enclave_id], self.timeout)
        value = _json_from(out, dict)
        if value.get("Terminated") is not True:
            raise NitroError(f"terminate-enclave did not terminate {enclave_id}: {value!r}")
        return value


# -- checks ------------------------------------------------------------------------------------


ALLOCATOR_FILE = "/etc/nitro_enclaves/allocator.yaml"
ALLOCATOR = f"{ALLOCATOR_FILE} and restart nitro-enclaves-allocator.service"


def launch_checks(launch: EnclaveLaunch, path: str = NITRO_CLI, *,
                  sys_root: str = "/sys") -> list[tuple[str, bool, str]]:
    """What `parent doctor` (and `parent up`, before it changes anything) checks when the
    profile starts the enclave: (name, ok, detail). SYS_ROOT is where sysfs is."""
    return _image_checks(launch, path) + _pool_checks(launch, sys_root)


def _pool_checks(launch: EnclaveLaunch, sys_root: str) -> list[tuple[str, bool, str]]:
    """The profile's CPUs and memory against what the allocator reserved: the driver's CPU
    pool (its ne_cpus parameter) and the huge pages, all sizes and nodes together (the least
    the pool can hold is what is left after other uses of huge pages, so only a definite
    shortfall fails). Nothing where the driver is not loaded: nitro-cli then says so."""
    try:
        with open(f"{sys_root}/module/nitro_enclaves/parameters/ne_cpus") as f:
            cpus = f.read().strip()
    except OSError:
        return []
    checks = []
    count = _cpulist_len(cpus)
    if not count:
        checks.append(("enclave CPU pool", False,
                       "the nitro_enclaves driver has no CPU pool: `systemctl enable --now "
                       f"nitro-enclaves-allocator.service` (cpu_count in {ALLOCATOR_FILE})"))
    elif launch.cpu_count > count:
        checks.append(("enclave CPU pool", False,
                       f"parent.enclave.cpu_count {launch.cpu_count} is more than the pool's "
                       f"{count} CPUs (ne_cpus {cpus}): raise cpu_count in {ALLOCATOR}, or "
                       "lower parent.enclave.cpu_count"))
    else:
        checks.append(("enclave CPU pool", True, f"{count} CPUs (ne_cpus {cpus})"))
    mib = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"{sys_root}/kernel/mm/hugepages"):
            m = re.fullmatch(r"hugepages-(\d+)kB", entry.name)
            if m:
                with open(f"{entry.path}/nr_hugepages") as f:
                    mib += int(f.read()) * int(m.group(1)) // 1024
    if launch.memory_mib > mib:
        checks.append(("enclave memory pool", False,
                       f"parent.enclave.memory_mib {launch.memory_mib} is more than the {mib} "
                       f"MiB of huge pages reserved: raise memory_mib in {ALLOCATOR}, or lower "
                       "parent.enclave.memory_mib"))
    else:
        checks.append(("enclave memory pool", True, f"{mib} MiB of huge pages"))
    return checks


def _cpulist_len(text: str) -> int:
    """How many CPUs a cpulist ("1-3,5") names; 0 for one that does not parse."""
    count = 0
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            return 0
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            return 0
        count += last - first + 1
    return count


def _image_checks(launch: EnclaveLaunch, path: str) -> list[tuple[str, bool, str]]:
    found = shutil.which(path)
    checks = [("nitro-cli", found is not None,
               f"{found}" if found else f"{path} not found on PATH: install "
               "aws-nitro-enclaves-cli (the profile has parent.enclave)")]
    try:
        size = os.stat(launch.eif).st_size
    except OSError as e:
        checks.append(("enclave image", False, f"{launch.eif}: {e.strerror} (parent.enclave.eif)"))
        return checks
    if not os.access(launch.eif, os.R_OK):
        checks.append(("enclave image", False, f"{launch.eif} is not readable"))
        return checks
    try:
        found = replaceable_at(launch.eif)
    except OSError as e:
        at = f"{e.filename}; " if e.filename not in (None, launch.eif) else ""
        checks.append(("enclave image", False,
                       f"{launch.eif}: {e.strerror or e} ({at}parent.enclave.eif)"))
        return checks
    if found is not None:
        # Whatever image this path holds starts under the CID the control port admits: with
        # no PCR0 pinned, it would be taken for the enclave.
        where, why, fix = found
        checks.append(("enclave image", False,
                       f"{where} {why}, so another user could replace the enclave's image "
                       f"(parent.enclave.eif): {fix}. It, every directory on its way and "
                       f"every link there must be {keepers()} and writable by no one else"))
        return checks
    mib = size / (1 << 20)
    checks.append(("enclave image", True, f"{launch.eif} ({mib:.0f} MiB)"))
    # nitro-cli compares bytes: it refuses when 4 * EIF size > memory_mib * 2**20, so the least
    # it takes is the product rounded up to a whole MiB. (Its E26 message names
    # 4 * ceil(EIF MiB), which can be a few MiB more than it needs.)
    need = -(-EIF_MEMORY_FACTOR * size // (1 << 20))
    if launch.memory_mib < need:
        checks.append(("enclave memory", False,
                       f"memory_mib {launch.memory_mib} is less than {EIF_MEMORY_FACTOR}x the "
                       f"EIF ({mib:.0f} MiB): nitro-cli refuses it (E26); set "
                       f"parent.enclave.memory_mib to at least {need}"))
    else:
        checks.append(("enclave memory", True, f"memory_mib {launch.memory_mib}"))
    return checks


def replaceable_at(path: str) -> tuple[str, str, str] | None:
    """Why someone other than root and this user could change what PATH names, or None: the
    path at fault, what is wrong with it ("is owned by uid N", "is writable by group (mode
    775)") and the command that fixes it. It, each directory on its way, and each link
    followed on the way, every link of a chain where it is, must be root's or this user's,
    and none writable by group or others (a sticky directory, as /tmp, excepted):
    pathwalk.walk. OSError when PATH cannot be followed (missing, a file on the way, a loop
    of links)."""
    try:
        found = walk(path)
    except Replaceable as e:
        fault = e.fault
        if fault.kind == "links":
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), fault.step) from None
        if fault.kind == "not a directory":
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), fault.step) from None
        why, command = fault.said(os.geteuid())
        if fault.st is not None and stat.S_ISDIR(fault.st.st_mode):
            # A directory above the file, as a rule someone's home (nitro-cli builds the EIF
            # where it is run): chown would take it from them, chmod open it to others' use.
            return fault.step, why, (
                f"move the file into a directory that is {keepers()} all the way up, such as "
                f"/var/lib/wgvsock, or, if {fault.step} is meant to be, `{command}`")
        return fault.step, why, f"`{command}`"
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    return None


def listed_before_failing(err: NitroError) -> list[EnclaveInfo] | None:
    """The enclaves a failed describe-enclaves printed anyway: it lists those whose enclave
    process answered, then exits with E39 (one did not answer in time) or E38 (one failed the
    command). None when it printed no list. Not a full listing: an enclave missing from it may
    be running still."""
    if not err.stdout.strip():
        return None
    try:
        value = _json_from(err.stdout, list)
        return [EnclaveInfo.from_json(e) for e in value]
    except NitroError:
        return None


def terminate_leftovers(nitro: NitroCli, name: str,
                        known_ids: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Terminates the enclaves recorded as ours and any still running under our name (a parent
    killed before it could record or terminate one). Returns what it did and what failed."""
    done: list[str] = []
    failed: list[str] = []
    try:
        running = nitro.enclaves()
    except NitroError as e:
        partial = listed_before_failing(e)
        if partial is None:
            failed.append(f"could not list the enclaves to look for leftovers named {name}: {e}")
        else:
            failed.append(f"describe-enclaves listed only the enclaves that answered ({e}): one "
                          f"named {name} may be left; run `nitro-cli describe-enclaves` to see")
        running = partial or []
    listed = {e.enclave_id for e in running}
    # A recorded ID is tried even when the listing fails or leaves it out: the enclave may be
    # the one whose process did not answer describe-enclaves.
    ids = list(dict.fromkeys(known_ids))
    ids += [e.enclave_id for e in running if is_named(e.name, name) and e.enclave_id not in ids]
    for enclave_id in ids:
        try:
            nitro.terminate_enclave(enclave_id)
            done.append(f"terminated enclave {enclave_id}")
        except NitroError as e:
            # E11: nitro-cli found no enclave process socket for the ID to connect to, which is
            # how it answers for an enclave that has exited: nothing is left to terminate.
            if e.code == "E11" and enclave_id not in listed:
                continue
            failed.append(f"could not terminate enclave {enclave_id}: {e}; try `nitro-cli "
                          f"terminate-enclave --enclave-id {enclave_id}`")
    return done, failed


def run_failure_fix(err: NitroError, launch: EnclaveLaunch,
                    listed: Callable[[], list[EnclaveInfo]], ours: str) -> str | None:
    """What to change when run-enclave failed with ERR: nitro-cli names what failed, not
    what in the profile or on the host to change, and for a CID in use only says "Ioctl
    failure". LISTED gives describe-enclaves' enclaves (asked only when they matter); OURS is
    our enclave name (its leftovers are cleared anyway). None when there is nothing to add."""
    code = err.code
    logged = f"; nitro-cli's log {err.log_path} says more" if err.log_path else ""
    if code == "E19":
        m = _FILE_RE.search(err.message)
        path = m.group(1) if m else launch.eif
        if path == launch.eif:
            # Not opened here: a FIFO put in its place would block the supervisor.
            try:
                os.stat(launch.eif)
            except OSError as e:
                return (f"cannot open {launch.eif}: {e.strerror}; set parent.enclave.eif to "
                        "the image `make eif` built")
            if not os.access(launch.eif, os.R_OK):
                return f"{launch.eif} is not readable: it must be root's, mode 0644 or 0600"
            return f"nitro-cli could not open {launch.eif} (parent up can read it){logged}"
        if path.startswith("/dev/nitro_enclaves"):
            return ("no Nitro Enclaves device: enable enclaves on the instance (its "
                    "EnclaveOptions), install aws-nitro-enclaves-cli, `systemctl enable --now "
                    "nitro-enclaves-allocator.service`, and run the parent as root or in the ne "
                    "group")
        if path.startswith("/sys/module/nitro_enclaves"):
            return ("the nitro_enclaves driver has no CPU pool: `systemctl enable --now "
                    "nitro-enclaves-allocator.service`")
        return f"nitro-cli could not use {path}{logged}"
    if code == "E22":
        return (f"raise cpu_count in {ALLOCATOR}, or lower parent.enclave.cpu_count "
                f"({launch.cpu_count})")
    if code == "E26":
        try:
            size = os.stat(launch.eif).st_size
        except OSError:
            return None
        need = -(-EIF_MEMORY_FACTOR * size // (1 << 20))
        return (f"set parent.enclave.memory_mib to at least {need} ({EIF_MEMORY_FACTOR}x the "
                f"EIF's {size / (1 << 20):.0f} MiB)")
    if code in ("E27", "E29"):
        try:
            others = [e for e in listed() if not is_named(e.name, ours)]
        except NitroError:
            others = []
        if code == "E29" and launch.cid is not None:
            holder = next((e for e in others if e.cid == launch.cid), None)
            if holder is not None:
                return (f"CID {launch.cid} is taken by enclave {holder.enclave_id} "
                        f"({holder.name or 'no name'}): terminate it (nitro-cli "
                        f"terminate-enclave --enclave-id {holder.enclave_id}) or set another "
                        "parent.enclave.cid")
        beside = ", ".join(f"{e.enclave_id} ({e.name or 'no name'}: "
                           f"{e.cpu_count or len(e.cpu_ids)} CPUs, {e.memory_mib} MiB)"
                           for e in others)
        if code == "E27":
            return (f"raise memory_mib in {ALLOCATOR}, or lower parent.enclave.memory_mib "
                    f"({launch.memory_mib})" + (f"; running beside: {beside}" if beside else ""))
        if beside:
            return (f"other enclaves may hold the pool's CPUs ({beside}): stop one, or raise "
                    f"cpu_count in {ALLOCATOR}{logged}")
        return logged[2:] or None
    if code == "E35":
        return ("the EIF is not a valid enclave image, or the hugepages to load it are not "
                f"there: build it again (`make eif`) and check memory_mib in {ALLOCATOR}")
    if code == "E36":
        return ("the enclave did not boot: the EIF may be damaged, or memory_mib too small to "
                "unpack it; with parent.enclave.debug: true, `nitro-cli console` shows its "
                "kernel's messages" + logged)
    return logged[2:] or None


# -- the supervisor ------------------------------------------------------------------------------

# The most of an enclave process's command line read: run-enclave's arguments are a few
# hundred bytes (an EIF path at most PATH_MAX).
_CMDLINE_MAX = 16384
# How often the watch asks whether the enclave's nitro-cli process has ended (a poll() of its
# pidfd, no nitro-cli call).
PROCESS_CHECK = 0.1


class EnclaveProcess:
    """nitro-cli's enclave process of one enclave (run-enclave's ProcessID), through a pidfd.

    That process holds the enclave's device file and exits as soon as the driver reports the
    enclave ended (a hang-up on that file: enclave_proc/mod.rs, process_event_loop). Its exit
    closes the file, and only that frees the enclave's slot, and with it its CID, for another
    enclave (the driver's ne_enclave_release). So its end is known before an enclave given
    that CID next could connect from it (that one has yet to load and boot), where the
    describe-enclaves poll learns of the exit up to a poll interval later.

    Opened after run-enclave returned: had the process ended before that and its number gone to
    another process, the enclave ended with it, so a pidfd that reads as ended never says so of
    a running enclave; one that does not is checked by the poll as before.

    The exception is a ProcessID of another PID namespace (nitro-cli run by a wrapper in a
    container): here that number is any process, or none. So `watch` takes a process only if
    its command line carries run-enclave's arguments: nitro-cli forks its enclave process from
    the run-enclave client without an exec (enclave_proc_comm.rs, enclave_proc_spawn; then
    daemon()), so its /proc/PID/cmdline is that client's. Read between pidfd_open and a check
    that the pidfd's process is still there, the command line is that process's and no later
    holder's of its number. An unrelated process that ended would otherwise read as the
    enclave's exit: its CID refused at once and, when describe-enclaves failed too, a healthy
    enclave restarted. (One that passed the check and ended while the enclave is still listed
    is caught by the poll: EnclaveSupervisor._watch.)
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        # ended() polls under it and close() takes the number under it: a number closed and
        # reused meanwhile (another file's) would be polled in its place.
        self._lock = threading.Lock()

    @classmethod
    def watch(cls, pid: int | None, command: Sequence[str] | None = None
              ) -> tuple[EnclaveProcess | None, str]:
        """The process PID, when it can be watched and (given COMMAND, run-enclave's
        arguments) is the enclave process of that run-enclave; else None and why, in words
        that follow "its exit is known by describe-enclaves only: ". None where there is no
        ProcessID (nitro-cli before 1.0 prints none), no such process (ended already, or
        another PID namespace's), another process (another PID namespace's number), one whose
        command line cannot be read (/proc mounted with hidepid=), or no pidfd_open (Linux
        before 5.3). The describe-enclaves poll is then all there is (its
        first made at once)."""
        if pid is None:
            return None, "nitro-cli printed no ProcessID (nitro-cli before 1.0 prints none)"
        if pid <= 0:
            return None, f"nitro-cli's ProcessID {pid} is no process's"
        try:
            process = cls(pid, os.pidfd_open(pid))
        except AttributeError:
            return None, "no pidfd_open here (Python built for Linux before 5.3)"
        except OverflowError:
            # A ProcessID past a C int (nitro-cli's is a u32) is no process, and must not end
            # the supervisor's thread, and with it `parent up`.
            return None, f"nitro-cli's ProcessID {pid} is no process's"
        except OSError as e:
            if e.errno == errno.ESRCH:
                return None, (f"no process {pid} (ended already, or nitro-cli runs in "
                              "another PID namespace)")
            return None, f"cannot watch process {pid}: {e.strerror or e}"
        if command is None:
            return process, ""
        unreadable: OSError | None = None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read(_CMDLINE_MAX).split(b"\0")
        except OSError as e:
            argv, unreadable = [], e
        if process.ended():
            # What was read may be a later holder's of its number.
            process.close()
            return None, f"process {pid} ended as it was looked at"
        if unreadable is not None:
            # Running, but hidden from us (/proc mounted with hidepid=, say): not another's.
            process.close()
            return None, (f"process {pid}'s command line cannot be read, so it cannot be "
                          f"told to be the enclave process (/proc/{pid}/cmdline: "
                          f"{unreadable.strerror or unreadable})")
        want = [os.fsencode(a) for a in command]
        if any(argv[i:i + len(want)] == want for i in range(len(argv) - len(want) + 1)):
            return process, ""
        process.close()
        # Its program only: the rest of another process's command line may be a secret.
        program = os.path.basename(argv[0].decode("utf-8", "replace")) if argv and argv[0] else "?"
        return None, (f"process {pid} ({prose(program, 60)}) is not the enclave process of "
                      "our run-enclave (nitro-cli runs in another PID namespace?)")

    def ended(self) -> bool:
        with self._lock:
            if self._fd < 0:
                return True  # closed: the supervisor is done with this enclave
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            return bool(poller.poll(0))

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)



class EnclaveSupervisor:
    """Keeps one enclave running: starts it, polls describe-enclaves (and, between polls, its
    enclave process: EnclaveProcess), restarts it when it is gone.

    Restarts back off exponentially from `backoff_min` to `backoff_max` seconds, counting failed
    `run-enclave` calls and enclaves that exit too; the delay resets once an enclave has run
    for `stable_after` seconds. Every wait is on the stop event, so stop() is prompt; `clock` is
    injectable so tests can fake long runs.
    """

    def __init__(
        self,
        nitro: NitroCli,
        launch: EnclaveLaunch,
        name: str,
        on_started: Callable[[EnclaveInfo], None] | None = None,
        log: logging.Logger | None = None,
        *,
        poll_interval: float = 2.0,
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        stop_timeout: float = RUN_TIMEOUT + 10,
    ) -> None:
        self.nitro = nitro
        self.launch = launch
        self.name = name
        self.on_started = on_started
        self.log = log if log is not None else logging.getLogger("wgvsock.nitro")
        self.poll_interval = poll_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.clock = clock
        self.stop_timeout = stop_timeout
        self._info: EnclaveInfo | None = None  # see `info`
        self._process: EnclaveProcess | None = None  # its nitro-cli enclave process
        self.starts = 0  # successful run-enclave calls
        self.delays: list[float] = []  # every backoff delay waited, in order
        self._last_reason: str | None = None  # see `last_reason`
        self._stop = threading.Event()
        self._started = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = NamedThread(target=self._run, name=f"enclave-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stops supervising and terminates the enclave this supervisor started."""
        self._stop.set()
        with self._started:
            self._started.notify_all()
        # A run-enclave may be booting for minutes: kill it; the thread then terminates what
        # it may have started under our name (and the enclave it watches) and ends.
        cancel = getattr(self.nitro, "cancel", None)
        if cancel is not None:
            cancel()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(self.stop_timeout if timeout is None else timeout)
            if t.is_alive():
                self.log.warning("enclave %s: supervisor still busy in nitro-cli after stop; "
                                 "`wgvsock parent down` terminates what is left", self.name)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def info(self) -> EnclaveInfo | None:
        """The enclave running now, if any: the one run-enclave last started, until the watch
        finds it gone, or at once when its nitro-cli enclave process has ended (the parent's
        CID check asks this at each accept, and the CID may be another enclave's soon after)."""
        with self._started:
            info, process = self._info, self._process
        if info is None or (process is not None and process.ended()):
            return None
        return info

    @property
    def last_reason(self) -> str | None:
        """Why the last enclave went away or failed to start: the running one's as soon as its
        enclave process has ended, when `info` reads None (status shows both together), not
        the reason of the one before, which the watch replaces only after its next poll."""
        with self._started:
            info, process = self._info, self._process
        if info is not None and process is not None and process.ended():
            return _process_ended(process)
        return self._last_reason

    @last_reason.setter
    def last_reason(self, reason: str | None) -> None:
        self._last_reason = reason

    def wait_started(self, count: int = 1, timeout: float = 10.0) -> EnclaveInfo | None:
        """Waits until run-enclave has succeeded `count` times in all; returns the enclave."""
        deadline = time.monotonic() + timeout
        with self._started:
            while self.starts < count and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._started.wait(left)
            return self._info if self.starts >= count else None

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.backoff_min
        # A failed run-enclave may have started one that is not cleared yet: stop() kills the
        # nitro-cli calls in flight, the clearing's among them, so the end clears again.
        leftover = False
        try:
            self._clear_leftovers()
            while not self._stop.is_set():
                try:
                    # stop() sets the event before it cancels the calls in flight: one whose
                    # process it could not find yet is killed as it registers.
                    info = self.nitro.run_enclave(self.launch, self.name, self._stop.is_set)
                except NitroError as e:
                    if self._stop.is_set():
                        # stop() killed it: no failure to report or retry. What it may have
                        # started is cleared at the end.
                        leftover = True
                        break
                    fix = run_failure_fix(e, self.launch, self.nitro.enclaves, self.name)
                    self.last_reason = f"run-enclave failed: {e}" + (f"; {fix}" if fix else "")
                    self.log.error("enclave %s: %s; retrying in %s", self.name, self.last_reason,
                                   _secs(delay))
                    # It may have started one before failing (output we could not read, a
                    # timeout while it booted): that one would hold the CPUs and memory the
                    # retry needs, and run on unwatched.
                    leftover = not self._clear_leftovers("left by the failed run-enclave")
                    if self._backoff(delay):
                        break
                    delay = min(delay * 2, self.backoff_max)
                    continue
                started_at = self.clock()
                process, unwatched = EnclaveProcess.watch(
                    info.process_id, NitroCli.run_args(self.launch, self.name))
                with self._started:
                    self._info, self._process = info, process
                    self.starts += 1
                    self._started.notify_all()
                if self._stop.is_set():
                    break  # stop() came while run-enclave ran: the finally terminates it
                self._announce(info)
                if process is None:
                    self.log.info("enclave %s: its exit is known by describe-enclaves only, "
                                  "every %s: %s", self.name, _secs(self.poll_interval),
                                  unwatched)
                reason = self._watch(info)
                if reason is None:
                    break
                ran = self.clock() - started_at
                self.last_reason = reason  # before _forget: `info` None with the old reason
                self._forget()
                if ran >= self.stable_after:
                    delay = self.backoff_min
                self.log.warning("enclave %s (%s, CID %d) %s after %s; restarting in %s",
                                 self.name, info.enclave_id, info.cid, reason, _secs(ran),
                                 _secs(delay))
                if self._backoff(delay):
                    break
                delay = min(delay * 2, self.backoff_max)
        except Exception:
            # Not swallowed: the thread-death hook then stops `parent up`, which exits 1, and
            # systemd (Restart=on-failure) starts it again with a new enclave. A parent left up
            # without an enclave and nothing restarting it would be worse.
            self.log.exception("enclave %s: supervisor failed", self.name)
            raise
        finally:
            self._terminate_current()
            # (A few tries: stop() may kill the first, if it calls cancel() only now.)
            for _ in range(3):
                if not leftover:
                    break
                leftover = not self._clear_leftovers("left by the failed run-enclave")

    def _backoff(self, delay: float) -> bool:
        """Waits `delay` seconds; True if stop() came first."""
        self.delays.append(delay)
        return self._stop.wait(delay)

    def _announce(self, info: EnclaveInfo) -> None:
        self.log.info("enclave %s started: %s, CID %d, %d CPUs %s, %s MiB%s", self.name,
                      info.enclave_id, info.cid, info.cpu_count or len(info.cpu_ids),
                      list(info.cpu_ids), info.memory_mib,
                      f"; debug console: nitro-cli console --enclave-id {info.enclave_id}"
                      if self.launch.debug else "")
        if self.on_started is not None:
            try:
                self.on_started(info)
            except Exception:
                self.log.exception("enclave %s: on_started failed", self.name)

    def _watch(self, info: EnclaveInfo) -> str | None:
        """Polls until the enclave is gone (returns why) or stop() is called (returns None)."""
        failures = 0
        strays: set[str] = set()
        # Nothing to watch: the first poll at once. An enclave gone by the time run-enclave's
        # ProcessID was looked up (so "no such process") would otherwise be let in for a whole
        # interval, while nitro-cli could give its CID to another enclave.
        at_once = self._process is None
        while not (self._stop.is_set() if at_once else self._wait_poll()):
            at_once = False
            process = self._process
            ended = process is not None and process.ended()
            gone = _process_ended(process) if process else ""
            try:
                listed = self.nitro.enclaves()
            except NitroError as e:
                if ended:
                    return gone  # and the enclave with it: nothing to poll for
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    self.log.warning("enclave %s: describe-enclaves failed (%d in a row): %s",
                                     self.name, failures, e)
                continue
            failures = 0
            mine = next((e for e in listed if e.enclave_id == info.enclave_id), None)
            if mine is None:
                return gone if ended else "exited (describe-enclaves no longer lists it)"
            if mine.state and mine.state.upper() != "RUNNING":
                return f"is {mine.state.lower()}"
            if ended and process is not None:
                # Listed, so its enclave process answered: ProcessID named another (nitro-cli
                # run in another PID namespace, say). The poll alone tells from now on. Dropped
                # before it is said: the line must not come while the CID is still refused.
                with self._started:
                    self._process = None
                process.close()
                self.log.warning("enclave %s: process %d ended, but nitro-cli still lists %s "
                                 "as running: watching it by describe-enclaves only, every %s",
                                 self.name, process.pid, info.enclave_id,
                                 _secs(self.poll_interval))
            self._terminate_strays(listed, info, strays)
        return None

    def _wait_poll(self) -> bool:
        """Waits for the next poll: poll_interval, or less once the enclave's nitro-cli process
        has ended. True if stop() came first."""
        process = self._process
        if process is None:
            return self._stop.wait(self.poll_interval)
        deadline = time.monotonic() + self.poll_interval
        while not process.ended():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._stop.wait(min(left, PROCESS_CHECK)):
                return True
        return self._stop.is_set()

    def _terminate_strays(self, listed: list[EnclaveInfo], mine: EnclaveInfo,
                          tried: set[str]) -> None:
        """Terminates the enclaves under our name other than MINE, each once (TRIED: those
        tried already; `parent down` clears by name whatever resists). nitro-cli lists an
        enclave only once it has booted, so the clearing before ours started could not see
        one that was booting then (a run-enclave of a parent killed meanwhile): it would run
        unwatched, holding CPUs and memory."""
        for e in listed:
            # RUNNING only: one TERMINATING (ours before a restart) is going already.
            if e.enclave_id not in tried and e.enclave_id != mine.enclave_id \
                    and is_named(e.name, self.name) and (e.state or "").upper() == "RUNNING":
                tried.add(e.enclave_id)
                self.log.warning("enclave %s: terminating %s, which booted under our name "
                                 "beside ours (%s)", self.name, e.enclave_id, mine.enclave_id)
                try:
                    self.nitro.terminate_enclave(e.enclave_id)
                except NitroError as err:
                    self.log.error("enclave %s: terminate-enclave %s failed: %s", self.name,
                                   e.enclave_id, err)

    def _clear_leftovers(self, why: str = "left running by an earlier parent") -> bool:
        """An enclave under our name left by an earlier parent (killed before `down`), or by a
        run-enclave that failed, holds CPUs, memory and maybe our CID: terminate it so ours
        can start. False when nitro-cli failed (some may be left), or listed only some.

        An enclave still booting is not listed yet (nitro-cli opens its socket after the boot):
        one that boots later is the watch's to terminate (_terminate_strays)."""
        try:
            listed = self.nitro.enclaves()
            cleared = True
        except NitroError as e:
            # E39/E38: it printed the enclaves that answered before failing; those named ours
            # still go (as `parent down` does), or one of them would keep our CID.
            partial = listed_before_failing(e)
            if partial is None:
                self.log.warning("enclave %s: describe-enclaves failed: %s", self.name, e)
                return False
            self.log.warning("enclave %s: describe-enclaves listed only the enclaves that "
                             "answered (%s): one under our name may be left", self.name, e)
            listed, cleared = partial, False
        for e in listed:
            if is_named(e.name, self.name):
                self.log.warning("enclave %s: terminating %s %s", self.name, e.enclave_id, why)
                try:
                    self.nitro.terminate_enclave(e.enclave_id)
                except NitroError as err:
                    cleared = False
                    self.log.error("enclave %s: terminate-enclave %s failed: %s", self.name,
                                   e.enclave_id, err)
        return cleared

    def _forget(self) -> EnclaveInfo | None:
        """Ends what the supervisor knew of the enclave it ran; returns that enclave."""
        with self._started:
            info, self._info = self._info, None
            process, self._process = self._process, None
        if process is not None:
            process.close()
        return info

    def _terminate_current(self) -> None:
        info = self._forget()
        if info is None:
            return
        try:
            self.nitro.terminate_enclave(info.enclave_id)
            self.log.info("enclave %s: terminated %s", self.name, info.enclave_id)
        except NitroError as e:
            self.log.warning("enclave %s: terminate-enclave %s: %s", self.name,
                             info.enclave_id, e)


def _process_ended(process: EnclaveProcess) -> str:
    return f"exited (its enclave process {process.pid} ended)"


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s" if s >= 0.1 else f"{s * 1000:.0f} ms"
