"""Keeping a process that holds keys out of core dumps and from same-user inspection.

A daemon that crashes, or that systemd's watchdog aborts (SIGABRT), is dumped by the host's
core handler: on Amazon Linux 2023 systemd-coredump keeps the dump on disk, and with it the
interface's private key, the preshared keys and every session key. Like ssh-agent and
gpg-agent, the processes that hold keys make themselves non-dumpable: no core file, and
/proc/PID/mem, environ and ptrace are closed to every process that lacks CAP_SYS_PTRACE,
the same user's included. `faulthandler` still prints each thread's stack on the abort, which
is what a stuck daemon's journal needs; root can still attach a debugger or py-spy. An exec
(the enclave's CMD) starts dumpable again.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("wgvsock.nodump")

_PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Makes this process non-dumpable; says so in the log if the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
        why = os.strerror(ctypes.get_errno()) if failed else ""
    except (OSError, AttributeError) as e:  # not Linux
        failed, why = True, str(e)
    if failed:
        log.warning("cannot keep this process out of core dumps (prctl: %s): a crash may "
                    "write its keys to disk", why)
