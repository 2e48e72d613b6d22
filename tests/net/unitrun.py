"""Runs a systemd service's ExecStart the way systemd would, where systemd is not PID 1 (as on
this test machine, so `systemctl` and `systemd-run` cannot be used).

What is modelled, from systemd.service(5) and systemd.exec(5), for the settings our unit uses:
  - Type=exec: the main process is the ExecStart command itself, in the foreground;
  - a clean environment (PATH only, plus what the caller adds), cwd /, stdin /dev/null,
    stdout and stderr to one file (the journal's stand-in);
  - NoNewPrivileges=yes through setpriv(1), ProtectHome=yes as empty read-only mounts over
    /home, /root and /run/user in a private mount namespace;
  - when the main process ends, ExecStop runs (systemd runs it even when the process died on
    its own), then Restart=on-failure restarts it after RestartSec unless it exited 0 or was
    ended by SIGHUP, SIGINT, SIGTERM or SIGPIPE;
  - StartLimitIntervalSec/StartLimitBurst: a start beyond the burst within the interval is
    refused and the service stays down.
Not modelled: PrivateTmp (the Unix stand-in's sockets live under /tmp, which the enclave must
share; on vsock nothing of ours is in /tmp) and the journal itself.
"""

from __future__ import annotations

import configparser
import contextlib
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .netlab import Namespace

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEAN_SIGNALS = {-signal.SIGHUP, -signal.SIGINT, -signal.SIGTERM, -signal.SIGPIPE}
PROTECTED = ("/home", "/root", "/run/user")
# ProtectHome=yes: the three directories appear empty and cannot be written. $1 is a scratch
# directory and $2 one directory to keep visible (or ""): the test's Python installation, when
# it lives under one of them (pyenv under /root; a real host's is under /usr).
PROTECT_HOME = """
stage=$1 keep=$2; shift 2
if [ -n "$keep" ]; then mkdir -p "$stage" && mount --bind "$keep" "$stage" || exit 1; fi
for d in /home /root /run/user; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=000 tmpfs "$d" || exit 1; fi
done
if [ -n "$keep" ]; then
  mkdir -p "$keep" && mount --move "$stage" "$keep" && mount -o remount,bind,ro "$keep" || exit 1
fi
for d in /home /root /run/user; do
  if [ -d "$d" ]; then mount -o remount,ro "$d" || exit 1; fi
done
exec "$@"
"""
_TIME = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m)?$")
_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "min": 60.0, "m": 60.0}


def seconds(value: str) -> float:
    """A systemd time span as used in our unit ("5", "5s", "300", "1min")."""
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(f"unsupported time span {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Unit:
    exec_start: list[str]
    exec_stop: list[str]
    exec_reload: list[str] | None
    type: str
    restart: str
    restart_sec: float
    start_limit_interval: float
    start_limit_burst: int
    no_new_privileges: bool
    protect_home: bool


def load_unit(path: Path, instance: str) -> Unit:
    cp = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    cp.read_string(path.read_text())
    svc, unit = cp["Service"], cp["Unit"]

    def command(key: str) -> list[str]:
        line = svc[key].replace("%i", instance)
        # Prefixes such as "-" or "+" change how systemd runs a command; ours have none.
        assert line[:1] not in "-@+!:", f"{key} has a prefix this runner does not model"
        return shlex.split(line)

    return Unit(
        exec_start=command("ExecStart"),
        exec_stop=command("ExecStop"),
        exec_reload=command("ExecReload") if "ExecReload" in svc else None,
        type=svc.get("Type", "simple"),
        restart=svc.get("Restart", "no"),
        restart_sec=seconds(svc.get("RestartSec", "0.1")),
        start_limit_interval=seconds(unit.get("StartLimitIntervalSec", "10")),
        start_limit_burst=int(unit.get("StartLimitBurst", "5")),
        no_new_privileges=svc.get("NoNewPrivileges", "no") == "yes",
        protect_home=svc.get("ProtectHome", "no") == "yes",
    )


@dataclass
class Run:
    pid: int
    started: float  # monotonic
    code: int | None = None  # as Popen reports it: negative for a signal
    ended: float | None = None


@dataclass
class Supervisor:
    """Runs `unit` in `ns` until stop() or until it must not be restarted. `paths` maps paths
    in the unit's command lines to where they are on this machine; `env` is added to the clean
    environment."""

    unit: Unit
    ns: Namespace
    log: Path
    paths: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    keep: str = ""  # see PROTECT_HOME
    runs: list[Run] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)  # ExecStop's exit codes
    gave_up: bool = False

    def __post_init__(self) -> None:
        assert self.unit.type == "exec", "only Type=exec is modelled"
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._main: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, name="unit", daemon=True)

    def _argv(self, command: list[str]) -> list[str]:
        argv = [self.paths.get(a, a) for a in command]
        wrap = ["ip", "netns", "exec", self.ns.name]
        if self.unit.protect_home:
            stage = str(self.log.parent / "protect-home-stage")
            wrap += ["unshare", "-m", "--propagation", "private", "sh", "-c", PROTECT_HOME, "sh",
                     stage, self.keep]
        if self.unit.no_new_privileges:
            wrap += ["setpriv", "--no-new-privs", "--"]
        return wrap + argv

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **self.env}
        with open(self.log, "ab") as out:
            return subprocess.Popen(self._argv(command), env=env, cwd="/",
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def _should_restart(self, code: int) -> bool:
        if self.unit.restart == "always":
            return True
        if self.unit.restart == "on-failure":
            return code != 0 and code not in CLEAN_SIGNALS
        assert self.unit.restart == "no", f"Restart={self.unit.restart} is not modelled"
        return False

    def _loop(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            recent = [r for r in self.runs if now - r.started < self.unit.start_limit_interval]
            if len(recent) >= self.unit.start_limit_burst:
                self.gave_up = True
                break
            main = self._spawn(self.unit.exec_start)
            with self._changed:
                self._main = main
                self.runs.append(Run(main.pid, time.monotonic()))
                self._changed.notify_all()
            code = main.wait()
            with self._changed:
                self.runs[-1].code, self.runs[-1].ended = code, time.monotonic()
                self._changed.notify_all()
            stop = self._spawn(self.unit.exec_stop)
            self.stops.append(stop.wait(60))
            if self._stopping.is_set() or not self._should_restart(code):
                break
            self._stopping.wait(self.unit.restart_sec)
        with self._changed:
            self._main = None
            self._changed.notify_all()

    def start(self) -> None:
        self._thread.start()

    @property
    def main_pid(self) -> int | None:
        with self._changed:
            return self._main.pid if self._main is not None and self._main.poll() is None \
                else None

    def wait_runs(self, count: int, timeout: float) -> Run:
        """Waits until the `count`-th start has happened; returns that run."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.runs) >= count, timeout):
                raise TimeoutError(f"the unit was not started {count} times within {timeout} s")
            return self.runs[count - 1]

    def wait_done(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the unit's supervisor is still running"

    def stop(self, timeout: float = 30) -> None:
        """`systemctl stop`: SIGTERM to the main process, then ExecStop; no restart."""
        self._stopping.set()
        main = self._main
        if main is not None and main.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                main.send_signal(signal.SIGTERM)
            try:
                main.wait(timeout)
            except subprocess.TimeoutExpired:
                main.kill()
        if self._thread.is_alive():
            self._thread.join(timeout + 60)

    def reload(self, timeout: float = 90) -> int:
        """`systemctl reload`: runs ExecReload beside the main process (systemd would set
        $MAINPID for it; our command needs none) and returns its exit code."""
        assert self.unit.exec_reload is not None, "the unit has no ExecReload"
        return self._spawn(self.unit.exec_reload).wait(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def env_for(base: Mapping[str, str], *keys: str) -> dict[str, str]:
    """Only `keys` from `base`: what a test adds to systemd's clean environment."""
    return {k: base[k] for k in keys if k in base}


__all__ = ["Supervisor", "Unit", "env_for", "load_unit", "seconds"]
