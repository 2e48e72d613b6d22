"""How `enclave up` starts CMD: as its child, through a small exec helper that has the kernel
SIGKILL CMD should `up` die.

Outside Nitro (`--outside-enclave` in a container whose PID 1 is not `up`), an `up` that is
SIGKILLed (the OOM killer, `kill -9`) would leave CMD running on with no network and no
parent, and nothing to stop it. The parent-death signal (prctl PR_SET_PDEATHSIG) is SIGKILL,
not SIGTERM: nothing is left to follow a SIGTERM that CMD ignores or takes long over with the
SIGKILL `up` sends after its grace, and a container whose PID 1 dies has all its processes
SIGKILLed the same way.

The signal can only be asked for by the child itself, between fork and exec. Popen's
preexec_fn would run Python there, in the fork of a process with threads (the tunnel's),
where a lock another thread held at the fork is held for ever. The helper is a fresh
interpreter of its own instead, with no thread: it asks for the signal, checks that `up`
did not die before it did (the child of a dead parent is adopted by another, and the signal
then never comes), and execs CMD in its place, with the same pid. The kernel sends the signal
when the thread that started the helper ends: `run_up` starts it from the main thread, which
lives as long as the process. It does not reach what CMD starts itself, nor a set-user-ID CMD
(the kernel clears it at such an exec).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# argv: `up`'s pid, the descriptor to report an exec failure on, CMD and its arguments. Run
# with -I -S: neither PYTHON* variables nor site-packages of the app's image have a say in it.
# CMD gets the environment as `up` has it.
_HELPER = r"""
import ctypes, os, signal, sys
parent, report, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
PR_SET_PDEATHSIG = 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    print(f"wgvsock enclave up: {args[0]} would not be stopped should `enclave up` be killed "
          f"(prctl: {os.strerror(ctypes.get_errno())}); running it all the same",
          file=sys.stderr, flush=True)
if os.getppid() != parent:  # `enclave up` died before the prctl took: as its death would
    os.kill(os.getpid(), signal.SIGKILL)
os.set_inheritable(report, False)  # closed by the exec: `up` then knows CMD runs
# Python ignores these, and an exec would pass that on (Popen's restore_signals, for CMD);
# nor does CMD start with signals blocked. SIGINT came blocked (start): a Ctrl-C meanwhile
# ends the helper by the default action, as it would have ended CMD.
for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
    signal.signal(s, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
try:
    os.execvp(args[0], args)
except OSError as e:
    os.write(report, str(e.errno or 0).encode())
    os._exit(127)
"""


def start(command: list[str]) -> subprocess.Popen:
    """Runs COMMAND as a child that is SIGKILLed should this process die, and returns once
    COMMAND itself runs, so that a signal passed on to the child reaches COMMAND rather than
    the helper. Raises OSError as Popen does for a COMMAND that cannot be run (a script's
    missing interpreter: FileNotFoundError) or a child that cannot be made (fork failed)."""
    report_r, report_w = os.pipe()
    try:
        # A Ctrl-C reaches the helper too (the terminal signals the whole process group).
        # Taken by the interpreter's own handler, it raised KeyboardInterrupt in the helper's
        # code and printed a traceback; the helper inherits the mask and keeps it pending.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            # (Popen's defaults, stated: CMD gets none of our descriptors, the TUN and the
            # sockets among them.)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(os.getpid()), str(report_w),
                 *command], close_fds=True, restore_signals=True, pass_fds=(report_w,))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(report_w)
        report = b""
        while chunk := os.read(report_r, 64):  # until the exec, or the helper's end
            report += chunk
    finally:
        os.close(report_r)
    if report:
        proc.wait()
        code = int(report)
        raise OSError(code, os.strerror(code), command[0])
    return proc
