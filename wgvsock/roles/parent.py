"""`wgvsock parent up|down|reload|doctor`: the EC2 host's side of one profile.

`up` creates the WireGuard interface, NAT and ingress rules and the control listener; the
enclave registers its key over the control channel and becomes the profile's one peer.
Everything `up` makes is recorded in a state file (state.py) so `down` can remove it even
after a crash. `reload` (or SIGHUP) applies a changed egress policy, ingress ports and
attestation policy to the running parent without touching the tunnel; anything else needs
`down` and `up`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..conn import make_bind
from ..conn.unixsock import remove_stale, socket_dir
from ..core.crypto import KeyFormatError, generate_private_key, key_from_base64, key_to_base64
from ..device import netconf
from ..device.device import Device
from ..device.uapi import UAPIError
from ..nodump import forbid_core_dumps
from ..pathwalk import Replaceable, keepers, walk
from ..regular import read_regular
from ..safetext import error, message, prose, shell
from ..sdnotify import Notifier, Watchdog
from ..services import firewall
from ..services.control import (
    UAPI_ATTESTED,
    ControlError,
    ControlServer,
    Verdict,
    attested_nonce,
)
from ..services.egress.refusals import RefusalReader, Refusals
from ..services.metrics.counters import DnsCounters, ParentCounters
from ..services.nflog import open_free_group
from ..signals import Wakeup
from ..threads import enable_stack_dumps, on_thread_death
from .common import (
    RoleError,
    configure,
    control_listener,
    named,
    port_refused,
    run_dir,
    state_dir,
    unix_socket_path,
)
from .state import (
    LeftOn,
    State,
    StateDirError,
    StateFileError,
    code_fingerprint,
    forwarding_lock,
    request_path,
    restore_forwarding,
    start_time,
    started_at,
    state_directory,
)

log = logging.getLogger("wgvsock.parent")


# -- checks ----------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here
    detail: str
    # Passes, with something to say that `up` only warns of (the doctor marks it so).
    warning: bool = False


# The local checks judged for the user running them: a refusal of them for a user who is not
# root says what that user cannot do, not what root would find.
_AS_THIS_USER = frozenset({"root", "socket directories", "state directory"})


def local_checks(profile) -> list[Check]:
    checks = [
        Check("root", os.geteuid() == 0,
              "running as root" if os.geteuid() == 0 else "run as root (or with CAP_NET_ADMIN)"),
        Check("TUN device", os.path.exists("/dev/net/tun"),
              "/dev/net/tun present" if os.path.exists("/dev/net/tun")
              else "/dev/net/tun missing: load the tun module (modprobe tun)"),
        Check("nftables", shutil.which("nft") is not None,
              "nft found" if shutil.which("nft") else "nft not found: apt-get install nftables"),
    ]
    if profile.parent.egress.uses_names:
        checks.append(_dns_check(profile))
    if profile.transport.kind == "vsock":
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
            checks.append(Check("vsock", True, "AF_VSOCK available"))
        except (OSError, AttributeError) as e:
            checks.append(Check("vsock", False, f"AF_VSOCK unavailable ({e}): on EC2, load "
                                "vsock_loopback/vhost_vsock or install aws-nitro-enclaves-cli"))
    else:
        checks.append(Check("vsock", None, f"transport is {profile.transport.kind}"))
    checks.append(_socket_dirs_check(profile))
    checks.append(state_dir_check())
    if profile.parent.egress.interface:
        checks.append(egress_interface_check(profile))
    if profile.attestation.test_root_ca:
        checks.append(test_root_check(profile.attestation.test_root_ca))
    if profile.parent.enclave is not None:
        from ..services.nitro import launch_checks

        checks += [Check(*c) for c in launch_checks(profile.parent.enclave)]
    return checks


def egress_interface_check(profile) -> Check:
    """parent.egress.interface must be an interface of this host: nft compares `oifname` as
    a string, so a name no interface has (a typo, another instance type's ens5) loads fine and
    masquerades nothing, and the enclave's traffic leaves with its tunnel address."""
    name = profile.parent.egress.interface
    try:
        socket.if_nametoindex(name)
    except OSError:
        return Check("egress interface", False,
                     f"{profile.path}:{profile.line_of('parent.egress.interface')}: "
                     f"parent.egress.interface: this host has no interface {name}, so nothing "
                     "would be masqueraded — name the one the enclave's traffic leaves by "
                     "(`ip -br link`), or remove the key to use the default route's")
    return Check("egress interface", True, f"masquerades out of {name}")


def test_root_check(path: str) -> Check:
    """attestation.test_root_ca: documents its key signs pass for a genuine enclave's, so the
    file must be as safe from others as the parent's key (the EIF's rule,
    nitro.replaceable_at)."""
    from ..services.nitro import replaceable_at

    try:
        found = replaceable_at(path)
    except OSError as e:
        return Check("test root CA", False, f"attestation.test_root_ca {path}: "
                     f"{e.strerror or e}" + (f" ({e.filename})" if e.filename not in (None, path)
                                         else ""))
    if found is not None:
        where, why, fix = found
        return Check("test root CA", False,
                     f"attestation.test_root_ca {path}: {where} {why}, and whoever can replace "
                     "it can sign documents the parent takes for a genuine enclave's: "
                     f"{fix}. It, every directory on its way and every link there must be "
                     f"{keepers()} and writable by no one else")
    return Check("test root CA", True, f"attestation.test_root_ca {path} is trusted as a Nitro "
                 "root: for tests only, never on a real parent")


def read_test_root(path: str | None) -> tuple[str, Any] | None:
    """attestation.test_root_ca PATH and its certificate, read after test_root_check passes;
    None without one (AWS's root, which ships in the package). The parent reads it here once,
    at `up` and at each reload, and judges every registration by that certificate: read again
    at each registration, it was whatever the file held then, unchecked since. Raises
    RoleError naming the file and what is wrong."""
    if not path:
        return None
    check = test_root_check(path)
    if check.ok is False:
        raise RoleError(check.detail)
    try:
        from ..attestation.verify import AttestationError, trusted_root
    except ImportError:  # judge() then says this version cannot verify documents
        return path, None
    try:
        return path, trusted_root(path)
    except AttestationError as e:
        raise RoleError(f"attestation.test_root_ca {path}: {e.reason}") from None


def state_dir_check() -> Check:
    """The state directory, as `up`, `down` and `reload` judge it before they read or write a
    state file there (state.state_directory); a missing one is made 0700 by `up`."""
    try:
        directory = state_directory()
    except RoleError as e:
        return Check("state directory", False, str(e))
    return Check("state directory", True, f"only root or this user can change {directory}")


def running_check(profile) -> Check:
    """Whether PROFILE's parent runs now, as `up`, `down` and `reload` find it: by its state
    file, the process it names checked to be that parent still (State.running)."""
    try:
        state = State.load(profile.name)
    except RoleError as e:  # `up` refuses it too, and `down` says what it does about it
        return Check("parent", False, str(e))
    if state is None:
        try:
            renamed(profile)
        except RoleError as e:
            return Check("parent", False, str(e))
        return Check("parent", None, f"not running: no state file {State.path_for(profile.name)}"
                     f" (start it with `wgvsock parent up --profile {shell(profile.path)}`)")
    if not state.running():
        return Check("parent", True, f"not running, but its state file "
                     f"{State.path_for(profile.name)} is left, naming pid {state.pid} (it "
                     f"crashed or was killed): `up` takes over what it left, `wgvsock parent "
                     f"down --profile {shell(profile.path)}` removes it", warning=True)
    began = started_at(state.pid, state.started)
    since = (time.strftime(" since %Y-%m-%d %H:%M:%S %Z", time.localtime(began))
             if began is not None else "")
    detail = f"up: pid {state.pid}{since}, running from {state.profile}"
    elsewhere = os.path.realpath(state.profile) != os.path.realpath(profile.path)
    if elsewhere:  # `reload` with this file is refused
        detail += f", not {profile.path}: edit that one to reload it"
    replaced = state.code_replaced()
    if replaced:
        detail += ("; wgvsock's files changed after it started: it still runs the wgvsock it "
                   "started with until restarted")
    return Check("parent", True, detail, warning=elsewhere or replaced)


def _socket_dirs_check(profile) -> Check:
    """The directories the parent's sockets go in (the UAPI run directory `wg` looks in, and
    the Unix stand-in's), as the socket servers judge them, before anything is made."""
    dirs = [(run_dir(), True)]
    if profile.transport.kind == "unix":
        dirs.append((str(profile.transport.path), False))
    try:
        for path, listable in dirs:
            socket_dir(path, listable=listable, make=False)
    except PermissionError as e:
        return Check("socket directories", False, str(e))
    # Said as `up` refuses it, before anything is made: the doctor passed a transport.path
    # on a read-only file system (the unit's sandbox) that `up` then refused.
    if read_only := unix_sockets_read_only(profile):
        return Check("socket directories", False, read_only)
    return Check("socket directories", True, "only root or this user can change "
                 + ", ".join(path for path, _ in dirs))


def _dns_check(profile) -> Check:
    """Host names in parent.egress need a resolver for the parent's DNS forwarder."""
    if profile.parent.egress.resolver:
        upstream, left_out = profile.parent.egress.resolver, []
    else:
        upstream, left_out = _system_upstream(profile)
    if not upstream:
        return Check("DNS forwarder", False, _no_resolver(left_out))
    return Check("DNS forwarder", True, "forwards allowed names to "
                 + ", ".join(map(str, upstream)) + _left_out_note(left_out))


def _system_upstream(profile) -> tuple[list, list[str]]:
    """The nameservers of this host's /etc/resolv.conf that PROFILE's DNS forwarder may ask,
    and why each other one may not: what parent.egress.resolver may not name either, one in
    the tunnel subnet (before, only the parent's own addresses were taken out, so a
    resolv.conf that named the enclave's address made the enclave the judge of what its
    names resolve to), unspecified or multicast (resolver_unusable). The parent's own tunnel
    addresses are left out silently, as ever."""
    from ..services.egress.forwarder import system_resolvers
    from ..services.profile import resolver_unusable

    ours, theirs = profile.parent.addresses, profile.enclave.addresses
    kept, left_out = [], []
    for r in system_resolvers(exclude=[a.ip for a in ours]):
        if (why := resolver_unusable(r, ours, theirs)) is None:
            kept.append(r)
        else:
            left_out.append(why)
    return kept, left_out


def _left_out_note(left_out: list[str]) -> str:
    return ("; left out of /etc/resolv.conf's nameservers: " + "; ".join(left_out)
            if left_out else "")


def _no_resolver(left_out: list[str]) -> str:
    return ("parent.egress has host names but /etc/resolv.conf names no resolver"
            + (" the DNS forwarder may ask" + _left_out_note(left_out) if left_out else "")
            + ": set parent.egress.resolver")


def forward_chain_check(profile, netns: str | None = None) -> Check:
    """Another table's forward chain that drops what it did not accept (Docker's `ip filter
    FORWARD`, firewalld's last reject, legacy iptables' FORWARD policy) drops the enclave's
    forwarded traffic whatever our table accepts: an accept ends only its own chain, a drop
    is final. Not in local_checks(): `parent up` warns rather than refuses."""
    tun = profile.interface
    try:
        chains = firewall.conflicting_forward_chains(netns, tunnel=tun)
    except firewall.FirewallTimeout as e:
        # Not "cannot tell here": a hung tool is the host's to look at.
        return Check("forward chains", False, f"cannot list the forward chains: {e}")
    except (firewall.FirewallError, OSError, ValueError) as e:
        return Check("forward chains", None, f"cannot list the forward chains: {e}")
    if not chains:
        return Check("forward chains", True, "no other table's forward chain drops the "
                     "enclave's traffic")
    fixes = []
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        if any(c.startswith(f"{tool} ") for c in chains):
            fixes.append(f"for {tool}, `{tool} -I FORWARD -i {tun} -j ACCEPT` and `{tool} -I "
                         f"FORWARD -o {tun} -j ACCEPT` (in DOCKER-USER instead with Docker)")
    if any(c.startswith("inet firewalld ") for c in chains):
        fixes.append(f"for firewalld, `firewall-cmd --permanent --zone=trusted "
                     f"--add-interface={tun}` and `firewall-cmd --reload`")
    if any(not c.startswith(("iptables-legacy ", "ip6tables-legacy ", "inet firewalld "))
           for c in chains):
        fixes.append(f"with Docker, `iptables -I DOCKER-USER -i {tun} -j ACCEPT` and "
                     f"`iptables -I DOCKER-USER -o {tun} -j ACCEPT` (ip6tables too for IPv6); "
                     f"otherwise `nft insert rule FAMILY TABLE CHAIN iifname {tun} accept` "
                     "and the same with oifname, for each chain named")
    return Check("forward chains", False,
                 f"{'; '.join(chains)}, with no accept for {tun}: the enclave's forwarded "
                 f"traffic is dropped there whatever wgvsock's table allows. Accept the "
                 f"tunnel before the drop: {'; '.join(fixes)}")


CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")


def metrics_port_check(profile) -> Check:
    """Whether parent.metrics.listen can be bound now. Not in local_checks(): a port another
    process holds does not stop `up`, which comes up without metrics until it is free."""
    listen = profile.parent.metrics.listen
    if listen is None:
        return Check("metrics port", None, "parent.metrics.listen is not set")
    host, port = listen
    where = f"parent.metrics.listen {host} port {port}"
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the exporter binds (http.server's allow_reuse_address): TIME_WAIT is no holder.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((str(host), port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return Check("metrics port", False, f"{where}: {e.strerror or e}: `up` refuses "
                             "it; choose a free port, or an address of this host")
        else:
            return Check("metrics port", True, f"{where} is free")
    holder = _listener_of(port)
    if holder is not None and _is_parent_up(holder[1], profile):
        return Check("metrics port", True, f"{where} is served by this profile's running "
                     f"`wgvsock parent up` (pid {holder[1]})")
    who = f"{holder[0]} (pid {holder[1]})" if holder else "another process"
    return Check("metrics port", False,
                 f"{where} is held by {who}: `up` comes up without metrics and takes the port "
                 "when it is free; whatever answers there meanwhile is not wgvsock. Free it, "
                 "or choose a port below 1024, which only root may take")


def _listener_of(port: int) -> tuple[str, int] | None:
    """The process name and pid listening on TCP PORT, as ss(8) tells (root sees all)."""
    import re
    import subprocess

    try:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'users:\(\("((?:[^"\\]|\\.)*)",pid=(\d+)', out)
    return (prose(m.group(1), 40), int(m.group(2))) if m else None


def ingress_port_holders(profile) -> list[str] | None:
    """One line for each parent.ingress port a process of this host listens on where the DNAT
    takes it: at an address of a family the enclave has that the kernel delivers here (`fib
    daddr type local`, as the DNAT asks), not loopback's (ingress passes over 127.0.0.0/8 and
    ::1). That process is cut off at once: every other host, and this one at its own
    addresses, reaches the enclave there instead (the host's sshd, for port 22).
    [] when none; None when ss(8) cannot tell."""
    versions = {a.version for a in profile.enclave.addresses}
    local: dict[str, bool] = {}
    found: dict[int, str] = {}
    for protocol in ("tcp", "udp"):
        entries = [(i, ing) for i, ing in enumerate(profile.parent.ingress)
                   if ing.protocol == protocol]
        if not entries:
            continue
        ports = sorted({ing.listen for _, ing in entries})
        rows = _listening(protocol, ports, processes=False)
        if rows is None:
            return None
        # Naming the processes has ss read every descriptor of every process of the host
        # (seconds on a busy one): only once something is found to name.
        if not any(_taken_at(row, versions, local) for row in rows):
            continue
        rows = _listening(protocol, ports, processes=True)
        if rows is None:
            return None
        for i, ing in entries:
            for row in rows:
                where = _taken_at(row, versions, local)
                if where is None or where[1] != ing.listen:
                    continue
                m = re.search(r'users:\(\("((?:[^"\\]|\\.)*)",pid=(\d+)', row)
                if m and _is_parent_up(int(m.group(2)), profile):
                    continue  # its own (the DNS forwarder at the tunnel's address)
                who = f"{prose(m.group(1), 40)} (pid {m.group(2)})" if m else "a process"
                head = (f"parent.ingress[{i}] {ing.listen}/{ing.protocol}: {who} listens on "
                        f"that port of this host ({prose(where[0], 80)})")
                if _at_tunnel_address(where[0], profile):
                    # The DNAT passes over what comes in by the tunnel: the enclave is not
                    # turned back to itself, and whether it gets through is the parent policy's
                    # (a catch-all allow opens no port of the parent). The host's own
                    # connections to that address (the output hook) and anything routed there
                    # from outside are taken.
                    found[i] = (
                        f"{head}, the parent's tunnel address, which ingress forwards to the "
                        "enclave for all but the enclave: with the parent up, this host's own "
                        "processes (and any host routed to that address through this one) "
                        "reach the enclave there instead of it; the enclave's own connections "
                        "to it are not forwarded, and pass where parent.egress.allow names "
                        "that address. Choose another listen port, unless that is meant")
                else:
                    found[i] = (
                        f"{head}, which ingress forwards to the enclave on every address of "
                        "the host but loopback: with the parent up, other hosts (and this "
                        "one, at its own addresses) reach the enclave there instead of it. "
                        "Choose another listen port, unless that is meant")
                break
    return [found[i] for i in sorted(found)]


def _ss_address(host: str):
    """The IP address in ss's HOST text (the part before the port, `[fd77::1]` or
    `10.0.0.1%eth0` too), an IPv4-mapped one as IPv4; None for `*` or anything else."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def _at_tunnel_address(where: str, profile) -> bool:
    """Whether ss's local address WHERE (`10.77.0.1:8443`, `[fd77::1]:53`) is one of the
    parent's own tunnel addresses, not a wildcard or another of the host's."""
    addr = _ss_address(where.rpartition(":")[0])
    return addr is not None and any(a.ip == addr for a in profile.parent.addresses)


def _listening(protocol: str, ports: list[int], *, processes: bool) -> list[str] | None:
    """ss(8)'s rows of the PROTOCOL sockets listening on PORTS (with their processes when
    PROCESSES), or None when it cannot tell. One run for all of them."""
    import subprocess

    match = " or ".join(f"sport = :{port}" for port in ports)
    try:
        res = subprocess.run(["ss", "-Hlnp" if processes else "-Hln",
                              "-t" if protocol == "tcp" else "-u", f"( {match} )"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.splitlines() if res.returncode == 0 else None


def _taken_at(row: str, versions: set[int], local: dict[str, bool]) -> tuple[str, int] | None:
    """The local address and port of ss's ROW when the ingress DNAT takes traffic to it:
    a wildcard, or an address the kernel delivers here (not a multicast group or broadcast
    address a socket may be bound to, which `fib daddr type local` never matches), of a family
    in VERSIONS, not loopback. LOCAL caches the kernel's answers."""
    fields = row.split()
    if len(fields) < 4:
        return None
    host, _, port = fields[3].rpartition(":")
    host, _, device = host.strip("[]").partition("%")
    if device == "lo" or not port.isdigit():
        return None
    if host != "*":
        addr = _ss_address(host)
        if addr is None:
            return None
        if addr.is_loopback or addr.version not in versions:
            return None
        if not addr.is_unspecified:
            if str(addr) not in local:
                try:
                    local[str(addr)] = netconf.is_local_address(str(addr))
                except OSError:
                    local[str(addr)] = True  # cannot ask: say what ss says
            if not local[str(addr)]:
                return None
    return fields[3], int(port)


def ingress_port_check(profile) -> Check:
    """parent.ingress against the ports the host's own services listen on. Not in
    local_checks(): `up` warns rather than refuses, since the profile asks for the port."""
    if not profile.parent.ingress:
        return Check("ingress ports", None, "parent.ingress is empty")
    holders = ingress_port_holders(profile)
    if holders is None:
        return Check("ingress ports", None, "cannot tell which ports this host listens on "
                     "(ss failed)")
    if holders:
        return Check("ingress ports", True, "; ".join(holders), warning=True)
    ports = ", ".join(f"{i.listen}/{i.protocol}" for i in profile.parent.ingress)
    return Check("ingress ports", True, f"no service of this host listens on {ports}")


def _is_parent_up(pid: int, profile) -> bool:
    """Whether PID is this profile's running parent, as its state file records it. The same
    process, not its pid reused: a crashed parent's file stays, and its pid may be another
    listener's by now."""
    try:
        state = State.load(profile.name)
    except RoleError:
        return False
    return state is not None and state.pid == pid and state.running()


def connection_limit_check(profile) -> Check:
    """parent.egress.max_connections against the host's conntrack table, which it protects."""
    limit = profile.parent.egress.max_connections
    try:
        table: int | None = int(CONNTRACK_MAX.read_text())
    except (OSError, ValueError):
        table = None  # nf_conntrack not loaded yet: `up` loads it
    if limit is None:
        room = (f"the host's conntrack table ({table} entries, net.netfilter.nf_conntrack_max)"
                if table is not None else "the host's conntrack table")
        return Check("connection limit", None, "parent.egress.max_connections is not set: the "
                     f"enclave may hold connections until it fills {room}")
    if table is None:
        return Check("connection limit", True, f"at most {limit} connections (nf_conntrack "
                     "is not loaded yet, so its table's size is not known)")
    if limit >= table:
        return Check("connection limit", False,
                     f"parent.egress.max_connections {limit} is not below the {table} entries "
                     "of the host's conntrack table (net.netfilter.nf_conntrack_max): the "
                     f"enclave can still fill it. Set it well below, e.g. {max(1, table // 4)}")
    return Check("connection limit", True, f"at most {limit} connections, "
                 f"{100 * limit / table:.0f}% of the host's conntrack table ({table} entries)")


# -- keys ------------------------------------------------------------------------------------


def _read_only_fix(instead: str, target: Path) -> str:
    """What to do about a read-only file system where the parent writes in TARGET (a
    directory, made if missing), which as a rule is the unit's sandbox (ProtectSystem=strict),
    not a read-only disk: INSTEAD, or ReadWritePaths= of the nearest directory that exists (of
    a missing one it fails the unit). When that is /, ReadWritePaths=/ would undo
    ProtectSystem= altogether: TARGET is to be made first and only it added, or, TARGET being
    / itself, INSTEAD alone."""
    there = _nearest_existing(target)
    add = "add `ReadWritePaths={}` with `systemctl edit wgvsock-parent@NAME`"
    if there != Path("/"):
        alt = ", or " + add.format(there)
    elif target != there:
        alt = (f", or make {target} first (`mkdir -p -m 0700 {shell(str(target))}`) and "
               + add.format(target))
    else:
        alt = ""
    return f" (under wgvsock-parent@.service {instead}{alt})"


def unix_sockets_read_only(profile) -> str | None:
    """The one line `up` refuses a Unix stand-in's transport.path with, and the doctor fails
    it with, when it is on a read-only file system (the unit's ProtectSystem=strict makes
    everything so but its own directories); None when it is not, or the transport is not
    Unix. Nothing is made: a missing directory would be made on the file system of the
    nearest one that exists, so that is the one looked at."""
    if profile.transport.kind != "unix":
        return None
    path = Path(profile.transport.path)
    try:
        read_only = os.statvfs(_nearest_existing(path)).f_flag & os.ST_RDONLY
    except OSError:  # not this check's to say: socket_dir and the bind name what is wrong
        return None
    return _read_only_sockets(profile) if read_only else None


def _nearest_existing(path: Path) -> Path:
    return next(d for d in (path, *path.parents) if os.path.exists(d))


def _read_only_sockets(profile) -> str:
    path = Path(profile.transport.path)
    return (f"transport.path {path} is on a read-only file system, where the parent cannot "
            "make its sockets"
            + _read_only_fix(f"sockets may go under /run/wgvsock: leave transport.path out "
                             f"(its default is /run/wgvsock/{profile.name})", path))


def _unix_sockets_writable(profile) -> None:
    """Makes the Unix stand-in's socket directory (transport.path) as the sockets' servers
    would, and RoleError, in one line, when it is on a read-only file system: the unit's
    ProtectSystem=strict makes everything so but its own directories, and the bind of the
    first socket failed with a bare "[Errno 30] Read-only file system", naming neither the
    path nor the fix, after the interface was made."""
    path = Path(profile.transport.path)
    try:
        socket_dir(str(path))
    except OSError as e:
        if e.errno is None:  # socket_dir's own refusal, said in full
            raise RoleError(str(e)) from None
        if e.errno != errno.EROFS:
            raise RoleError(f"transport.path {path}: {e.strerror or e}") from None
        raise RoleError(_read_only_sockets(profile)) from None
    if words := unix_sockets_read_only(profile):
        raise RoleError(words)


def load_parent_key(spec: str, *, create: bool = True) -> bytes:
    """The parent's private key from SPEC (a file, ssm:NAME or secretsmanager:NAME). A missing
    file is created with a new key when CREATE. The file must be 0600 (or stricter) and owned
    by root or by the running user: anyone else could have put their own key there."""
    if spec.startswith(("ssm:", "secretsmanager:")):
        from ..services import aws

        try:
            return aws.load_private_key(spec)
        except aws.AWSError as e:
            raise RoleError(f"parent key {spec}: {e}") from e
    path = Path(spec)
    try:
        exists = path.exists()
    except OSError as e:
        # EACCES: a directory on the way this user may not search (`up` makes them 0700).
        # Path.exists() raises it, and pin-parent, which catches RoleError, ended in a
        # traceback.
        raise RoleError(f"private key {path}: {e.strerror or e}") from e
    if not exists:
        if not create:
            # `wgvsock genkey`, not `wg genkey`: wireguard-tools need not be installed.
            raise RoleError(f"private key {path} does not exist (make one with `wgvsock genkey "
                            f"| install -m 0600 /dev/stdin {shell(str(path))}`, or let "
                            "`wgvsock parent up` create it)")
        # Each missing directory 0700, not only the last (Path.mkdir's parents= makes the
        # others 0777 less the umask): one others may write lets them put a directory of
        # their own in the key's way.
        try:
            for directory in [*reversed(path.parents)]:
                if not directory.exists():
                    with contextlib.suppress(FileExistsError):
                        directory.mkdir(mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key_to_base64(generate_private_key()) + "\n")
        except OSError as e:
            why = f"cannot create private key {path}: {e.strerror or e}"
            if e.errno == errno.EROFS:
                why += _read_only_fix("only /etc/wgvsock is writable: keep the key there",
                                      path.parent)
            raise RoleError(why) from e
        log.info("created a new private key at %s", path)
    st = path.stat()
    if st.st_uid not in (0, os.geteuid()):
        raise RoleError(f"private key {path} is owned by uid {st.st_uid}, not by root or this "
                        f"user (uid {os.geteuid()}): chown root:root {shell(str(path))}, after "
                        "checking that the key in it is yours")
    mode = st.st_mode & 0o777
    if mode & 0o077:
        # Named as it is: a key others may write (0620) is not one they may read, but whoever
        # writes it chooses the parent's identity.
        how = " and ".join(w for bits, w in ((0o044, "readable"), (0o022, "writable"))
                           if mode & bits) or "open"
        raise RoleError(f"private key {path} is {how} by others (mode {mode:o}): "
                        f"chmod 600 {shell(str(path))}")
    try:
        # A key is 45 bytes: a bound keeps /dev/zero and the like out, as the read of a
        # regular file only keeps a FIFO from blocking the start.
        return key_from_base64(read_regular(path, 4096).decode("ascii", "replace"))
    except KeyFormatError as e:
        raise RoleError(f"private key {path}: {e} (expected the output of `wg genkey`)") from e
    except OSError as e:
        raise RoleError(f"private key {path}: {e.strerror}") from e


def check_pinned_key(profile, key: bytes) -> None:
    """Refuses a private key whose public key is not the profile's parent.public_key."""
    pinned = profile.parent.public_key
    if pinned is None:
        return
    from ..core.crypto import public_key

    own = key_to_base64(public_key(key))
    if pinned == key_to_base64(key):
        # Said without either key: this message goes to the journal, and the value pinned is
        # the private key itself, pasted in the wrong place.
        raise RoleError(f"parent.public_key in {profile.path} is the private key of "
                        f"{profile.parent.private_key} itself, not its public key: anyone who "
                        "reads the profile (or the enclave image built from it) has the key. "
                        "Make a new key, then pin its public key with "
                        f"`wgvsock profile pin-parent {shell(profile.path)}` and rebuild the image")
    if own != pinned:
        raise RoleError(f"the private key {profile.parent.private_key} has public key {own}, "
                        f"but the profile pins parent.public_key {pinned}: the enclave would "
                        "refuse this parent. Restore the matching key, or pin this one with "
                        f"`wgvsock profile pin-parent {shell(profile.path)}` and rebuild the image")


def _missing_pinned_key(profile) -> str:
    return (f"{profile.parent.private_key} does not exist, and parent.public_key is pinned: "
            "`parent up` makes no new key, which could not match the pin. Restore the key "
            "file, or make a new key there and pin it with `wgvsock profile "
            f"pin-parent {profile.path}` (then rebuild the enclave image)")


def _key_file_missing(spec: str, hint: str) -> bool:
    """Whether parent.private_key names a file that is not there (never an ssm: or
    secretsmanager: key). Not lexists(), which says False too of a key in a directory this user
    may not search (`up` makes them 0700): that one is there, and RoleError says so, with
    `hint` (who to run as) when it is a permission error."""
    if spec.startswith(("ssm:", "secretsmanager:")):
        return False
    try:
        os.lstat(spec)
    except FileNotFoundError:
        return True
    except OSError as e:
        raise RoleError(f"private key {spec}: {e.strerror or e}"
                        f"{hint if isinstance(e, PermissionError) else ''}") from e
    return False


def key_path_warning(spec: str) -> str | None:
    """Why a user other than root and this one could put a key of their own at SPEC, a key
    file (made there by `up` when missing), before `parent up` reads it; None when none could,
    when SPEC is an ssm: or secretsmanager: key, or when the walk cannot tell (a directory
    this user may not search: parent_key_check says so). SPEC is walked from / as the socket
    directories, the state directory, the EIF and the test root are (pathwalk.walk).

    Only a warning, never a refusal: keys have lived in such places (a home directory) with
    releases that did not look, and a pinned parent.public_key already turns a swapped key
    into a refusal. Faults of the key file itself (its owner, its mode) are not said here:
    load_parent_key refuses them in its own words."""
    if spec.startswith(("ssm:", "secretsmanager:")):
        return None
    try:
        walk(spec)
    except Replaceable as e:
        fault = e.fault
        if fault.st is None or stat.S_ISREG(fault.st.st_mode):
            return None  # a loop of links, a file on the way, the key's own owner or mode
        why, command = fault.said(os.geteuid())
        if stat.S_ISDIR(fault.st.st_mode):
            # As a rule someone's home: chown would take it from them.
            fix = (f"move the key into a directory that is {keepers()} all the way up, as "
                   f"/etc/wgvsock (the default) is, and set parent.private_key to it; or, where "
                   f"that suits {fault.step}, `{command}`")
        else:
            fix = f"`{command}`"
        return (f"private key {spec}: {fault.step} {why}, so that user could replace the key "
                "file (or the directory it is in) with their own before `parent up` reads "
                "it, and the parent would use a key they know (with parent.public_key pinned "
                f"it refuses to start instead). Fix: {fix}")
    except OSError:
        return None
    return None


def parent_key_check(profile) -> Check:
    """What `parent up` will make of parent.private_key, without creating or changing it. Not
    in local_checks(): `up` loads the key itself, refusing with the same words. A key another
    user could swap (key_path_warning) passes with a warning, as `up` logs it."""
    check = _parent_key_check(profile)
    warning = key_path_warning(profile.parent.private_key)
    if warning is None:
        return check
    return Check(check.name, check.ok, f"{check.detail}; warning: {warning}",
                 warning=check.ok is True)


def _parent_key_check(profile) -> Check:
    spec = profile.parent.private_key
    pinned = profile.parent.public_key is not None
    try:
        missing = _key_file_missing(
            spec, " (run the doctor as the user `parent up` runs as, root as a rule)")
    except RoleError as e:
        return Check("parent key", False, str(e))
    if missing:
        if not pinned:
            return Check("parent key", True,
                         f"{spec} does not exist yet: `parent up` creates it (0600)")
        return Check("parent key", False, _missing_pinned_key(profile))
    try:
        check_pinned_key(profile, load_parent_key(spec, create=False))
    except RoleError as e:
        return Check("parent key", False, str(e))
    except OSError as e:  # stat() of a path under a directory we may not search
        return Check("parent key", False, f"private key {spec}: {e.strerror or e}")
    return Check("parent key", True,
                 spec + (", matches parent.public_key" if pinned else " (no public key pinned)"))


# -- attestation policy ------------------------------------------------------------------------


# The verifier's words for a pinned PCR the document does not match.
_PCR_DIFFERS = re.compile(r"^attestation refused: PCR(\d{1,2}) is [0-9a-f.]+, expected ")
# The PCRs an image's build gives (nitro-cli build-enclave, describe-eif); 8 with a signed one.
_IMAGE_PCRS = (0, 1, 2, 8)


def judge(policy, public_key: bytes, document: bytes | None, nonce: bytes, *,
          now: float | None = None, root=None) -> Verdict:
    """The verdict of attestation POLICY (a profile's `attestation`) on an enclave that
    registers PUBLIC_KEY with DOCUMENT (or none) for NONCE, at time NOW (default: now; a
    reload asks again about a registration made earlier). ROOT: the certificate of
    POLICY's test_root_ca as the parent read it (read_test_root); None: AWS's, or the file
    read now."""
    if document is None:
        if policy.require:
            return Verdict(False, reason="the profile requires attestation and the enclave "
                                         "sent no attestation document")
        return Verdict(True, attested=False)
    try:
        from ..attestation import verify_enclave
    except ImportError:
        if policy.require:
            return Verdict(False, reason="the profile requires attestation, which this "
                                         "version cannot verify yet")
        return Verdict(True, attested=False, reason="attestation document not verified")
    verdict = verify_enclave(document, public_key=public_key, nonce=attested_nonce(nonce),
                             policy=policy, root=root, now=now)
    code = (verdict.detail or {}).get("code")
    if code == "pcr-mismatch" and (m := _PCR_DIFFERS.search(verdict.reason)):
        # The verifier says which value differs; the operator (log, `wgvsock status`) needs
        # what to change, most often after a rebuilt image.
        index = int(m.group(1))
        if index in _IMAGE_PCRS:
            fix = (f"a rebuilt enclave image has new PCRs: if this image is meant to run, pin "
                   f"its PCR{index} (`nitro-cli describe-eif --eif-path FILE` prints them) in "
                   "attestation.pcrs and run `wgvsock parent reload`")
        else:
            fix = ("if its new value is meant, pin it in attestation.pcrs and run `wgvsock "
                   "parent reload`")
        return replace(verdict, reason=f"{verdict.reason}: {fix}")
    if code == "nonce-mismatch" and _attests_the_challenge(document, nonce):
        return replace(verdict, reason="attestation refused: the document's nonce is the control "
                       "challenge itself, as enclaves of wgvsock before the attested-nonce change "
                       "sent it: rebuild the enclave image with this wgvsock")
    return verdict


def _attests_the_challenge(document: bytes, challenge: bytes) -> bool:
    # Only reached once the signature held (the nonce is compared last): the fields are AWS's.
    from ..attestation.verify import AttestationError, decode_document

    try:
        return decode_document(document).nonce == challenge
    except AttestationError:
        return False


def attestation_state(verdict: Verdict) -> str:
    """What the read-only UAPI key wgvsock_attested says: "true" (the pinned image), "genuine"
    (a genuine Nitro enclave, but no PCR0 pinned: any image), "debug" (a debug-mode enclave
    that allow_debug let in: its image is not measured) or "false" (see Verdict.state)."""
    return UAPI_ATTESTED[verdict.state]


# A session is renewed every 2 minutes while traffic flows; 3 minutes without a handshake means
# the tunnel is idle or gone (wireguard-go's REJECT_AFTER_TIME).
_TUNNEL_QUIET = 180.0
# Seconds between tries for a metrics port another process holds.
_METRICS_RETRY = 5.0
# How long `up`'s main loop may go without coming round (it applies reloads, checks the
# firewall, notices a stopped device and SIGTERM) before systemd's watchdog is no longer fed:
# well above a slow nft or a re-check of the enclave's attestation in a reload.
_MAIN_LOOP_LIMIT = 30.0
# How long our nftables table may go unread (nft failing or timing out: a host under load)
# before the parent stops as it would for a table it cannot put back. Not knowing whether the
# table is there is not knowing that it is gone; a slow nft in a loaded CI guest stopped it.
_FIREWALL_UNREADABLE_LIMIT = 120.0

# What a running parent can change (`reload`); any other key needs `down` and `up`.
_LIVE_KEYS = ("parent.egress.", "parent.ingress", "attestation.")
# Read by the enclave from the profile in its image, never by the parent.
_ENCLAVE_ONLY_KEYS = ("enclave.dns", "enclave.routes", "enclave.user")


def _name_policy(profile):
    from ..services.egress.names import NamePolicy

    egress = profile.parent.egress
    return NamePolicy(egress.allow_names, egress.deny_names,
                      resolve_unlisted=egress.resolves_every_name)


def _upstream(profile) -> list:
    """Where the DNS forwarder sends PROFILE's allowed names: parent.egress.resolver, else
    this host's resolvers (never our own tunnel addresses: that would loop)."""
    if profile.parent.egress.resolver:
        return list(profile.parent.egress.resolver)
    upstream, left_out = _system_upstream(profile)
    if not upstream:  # local_checks() says so before `up`; resolv.conf may change later
        raise RoleError(_no_resolver(left_out))
    if left_out:
        log.warning("%s: DNS forwarder: %s", named(profile.name),
                    _left_out_note(left_out).removeprefix("; "))
    return upstream


# -- the role --------------------------------------------------------------------------------


class Parent:
    def __init__(self, profile) -> None:
        self.profile = profile
        self.device: Device | None = None
        self.control: ControlServer | None = None
        self.stopped = threading.Event()
        self._forwarding: dict = {}
        self._forwarding_on = False  # forwarding enabled: close() puts it back (state.py)
        self._table = False
        self._tunnel_check_failed = False  # check_tunnel has said so; quiet until it works
        # The metrics port another process held at start (check_metrics): (registry, address,
        # port, when to try again).
        self._metrics_waiting: tuple[Any, Any, int, float] | None = None
        self._sockets: list[str] = []
        self.enclave_key: bytes | None = None
        self.supervisor = None  # nitro.EnclaveSupervisor when the profile starts the enclave
        self._state: State | None = None
        self.verdict: Verdict | None = None
        self.counters: ParentCounters | None = None
        # The DNS forwarder's counters, once the parent runs one; until then DNS numbers are
        # absent from status and metrics.
        self.dns_counters: Callable[[], DnsCounters] | None = None
        self.exporter = None  # metrics.prometheus.Exporter with parent.metrics.listen
        self.cloudwatch = None  # metrics.cloudwatch.CloudWatchSender with .cloudwatch
        # Of the enclave the supervisor started, while it runs (None once it has exited).
        # Rules in our nftables table right after we loaded it (None: not counted yet).
        self._rules: int | None = 0
        # Since when (monotonic) check_firewall has failed to read the table, and the first
        # failure's reason; None while it reads.
        self._unreadable: tuple[float, str] | None = None
        # The DNS forwarder when the profile allows egress by name; its .stats holds the
        # refused-name and query counters, kept for one started again after a reload.
        self.dns = None
        self._dns_stats = None
        # What the installed enclave presented (public key, attestation document or None,
        # nonce, wall-clock time): a reload with a new attestation policy asks it again.
        self._registration: tuple[bytes, bytes | None, bytes, float] | None = None
        # attestation.test_root_ca's certificate (read_test_root), which a reload replaces
        # together with the profile, under the lock: a registration is never judged by one
        # profile's policy and another's root.
        self._test_root: tuple[str, Any] | None = None
        self._trust_lock = threading.Lock()
        # Destinations and names refused lately (`wgvsock status`, the log); the table logs
        # refused packets to the reader's group (None: it could not open one).
        self.refusals = Refusals()
        self._refusal_reader: RefusalReader | None = None

    def egress_interface(self, profile=None) -> str | None:
        """The profile's egress interface, else the one this host's own traffic to the
        internet leaves by (netconf.default_route_interface), for each IP version the enclave
        has. When those differ (IPv6 on another ENI, say), None: masquerade out
        of any interface but the tunnel, so each family leaves by its own route."""
        p = profile or self.profile
        if p.parent.egress.interface:
            return p.parent.egress.interface
        found = {netconf.default_route_interface(v)
                 for v in sorted({a.version for a in p.enclave.addresses})}
        found.discard(None)
        return found.pop() if len(found) == 1 else None

    def spec(self, profile=None, *, counters: dict | None = None,
             elements: list | None = None) -> firewall.FirewallSpec:
        """PROFILE's (default: the running one's) table, starting from COUNTERS and with
        ELEMENTS in its name sets (see FirewallSpec)."""
        from ..services.profile import CREDENTIAL_ENDPOINTS

        p = profile or self.profile
        egress_if = self.egress_interface(p)
        return firewall.FirewallSpec(
            name=p.name,
            tunnel_interface=p.interface,
            enclave_addresses=[a.ip for a in p.enclave.addresses],
            egress_nat=p.parent.egress.nat,
            egress_interface=egress_if,
            allow=list(p.parent.egress.allow),
            deny=list(p.parent.egress.deny),
            lifted=list(p.parent.egress.lifted),
            ingress=list(p.parent.ingress),
            allow_names=list(p.parent.egress.allow_names),
            dns_forwarder=([a.ip for a in p.parent.addresses] if p.parent.egress.uses_names
                           else []),
            counters=counters or {},
            name_elements=elements or [],
            log_group=self._refusal_reader.group if self._refusal_reader is not None else None,
            credential_endpoints=[endpoint for endpoint, _ in CREDENTIAL_ENDPOINTS],
            max_connections=p.parent.egress.max_connections,
        )

    def _replace_table(self, profile, *, keep_counters: bool) -> int:
        """Loads PROFILE's table in one nft transaction, with the DNS forwarder's live
        addresses that its name rules allow and, with KEEP_COUNTERS, the counters' values
        right before (so metrics do not go back to zero). Returns how many addresses were
        carried over. Raises FirewallError or ValueError with the old table left in place."""

        def apply(elements: list) -> None:
            counters = {}
            if keep_counters:
                try:
                    counters = firewall.read_counters(profile.name)
                except (firewall.FirewallError, OSError, ValueError) as e:
                    log.warning("%s: cannot read the counters to carry them over "
                                "(%s); they start from zero", named(profile.name), e)
            firewall.apply(self.spec(profile, counters=counters, elements=elements))

        carried = 0
        if self.dns is not None:
            carried = self.dns.rebuild(apply, policy=_name_policy(profile),
                                       grace=profile.parent.egress.dns_grace)
        else:
            apply([])
        try:
            count = firewall.rule_count(profile.name)
        except (firewall.FirewallError, OSError, ValueError) as e:
            log.warning("%s: cannot count the new table's rules: %s", named(profile.name), e)
            count = 0
        # The new table is in. A count that failed (or found it gone already) is no baseline:
        # check_firewall counts again rather than take it for someone else's change.
        self._rules = count if count > 0 else None
        return carried

    def start(self) -> None:
        p = self.profile
        t = p.transport
        for w in p.warnings:
            log.warning("%s", w)
        failed = [c for c in local_checks(p) if c.ok is False]
        if any(c.name == "root" for c in failed):
            # Said first, as the fix of all of it: the socket and state directories were
            # judged for this user, whose chown or chmod advice is wrong for a run that only
            # forgot sudo.
            rest = [c for c in failed if c.name not in _AS_THIS_USER]
            raise RoleError("parent up must run as root (sudo)" + "".join(
                f"; {c.name}: {c.detail}" for c in rest))
        if failed:
            # A check that names the profile's line and key says where itself: the check's
            # name before it said it again ("egress interface: FILE:8: parent.egress...").
            raise RoleError("; ".join(c.detail if _of_the_file(p, c.detail)
                                      else f"{c.name}: {c.detail}" for c in failed))
        self.load_test_root()
        # With a pinned key, never make a new one: it could not match the pin. Said as doctor
        # says it: load_parent_key's own words ("let `wgvsock parent up` create it") are
        # wrong here.
        spec = p.parent.private_key
        if p.parent.public_key is not None and _key_file_missing(
                spec, " (`parent up` runs as root as a rule)"):
            raise RoleError(_missing_pinned_key(p))
        key = load_parent_key(spec, create=p.parent.public_key is None)
        check_pinned_key(p, key)
        if warning := key_path_warning(spec):
            log.warning("%s", warning)
        # One check for both ports: the WireGuard port lets in only the CID the control port
        # does, so another enclave or VM on this host costs it no reader and no buffer.
        enclave_only = self._enclave_filter()
        if t.kind == "unix":
            _unix_sockets_writable(p)
        try:
            bind = make_bind(t.kind, False, unix_dir=t.path if t.kind == "unix" else None)
            bind.refuse_from = enclave_only
            # On its port from the start: the log then names that one port once.
            self.device = Device(p.interface, bind, mtu=p.mtu, run_dir=run_dir(), port=t.port)
            try:
                self.device.start()
                configure(self.device, private_key=key, listen_port=t.port)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                raise RoleError(_interface_taken(p)) from None
            except UAPIError as e:  # the port: start() binds it, as a set would
                # Held by another process: over vsock one in any network namespace (a port is
                # the whole host's), where the TCP and Unix stand-ins clash only within one.
                raise RoleError(port_refused(t, "port", abs(e.errno), e.reason)) from None
            if t.kind == "unix":
                self._sockets.append(unix_socket_path(t.path, t.port))
            # Before the link is up and before enable_forwarding: the tunnel starts from
            # `default`, which a forwarding parent (this one's previous run, another profile's)
            # has set to accept_ra=2, and enable_forwarding leaves a 0 alone.
            try:
                firewall.refuse_router_messages(p.interface)
            except OSError as e:
                raise RoleError(f"cannot keep {p.interface} from taking router advertisements "
                                f"and redirects from the enclave (its accept_ra, autoconf "
                                f"and accept_redirects): {e.strerror or e}: `parent up` needs to "
                                "write /proc/sys/net") from None
            netconf.add_addresses(p.interface, p.parent.addresses)
            # No route of our own: the profile keeps the enclave's address in the parent's
            # subnet (one address a family), whose connected route the kernel adds with the
            # address and takes away with the interface, and which check_host has already
            # found clear of the host's routes.
            netconf.link_up(p.interface, p.mtu)
            self._enable_forwarding({a.version for a in p.enclave.addresses})
            self._start_refusal_reader()
            firewall.apply(self.spec())
            self._table = True
            self.counters = ParentCounters(p.name, dns=self._dns)
            self.device.status_hook = self._status_keys
            # Role and profile from the start: a parent with no enclave yet is still one.
            self._show_verdict(None)
            count = firewall.rule_count(p.name)
            self._rules = count if count > 0 else None  # gone already: check_firewall acts
            forward = forward_chain_check(p)
            if forward.ok is False:  # the tunnel is up either way; the operator must act
                log.warning("%s: %s", named(p.name), forward.detail)
            self._start_dns()
            listener = control_listener(t)
            if t.kind == "unix":
                self._sockets.append(unix_socket_path(t.path, t.control_port))
            from ..core.crypto import public_key

            self.control = ControlServer(
                listener, profile=p.name, public_key=public_key(key), wg_port=t.port,
                verify=self._verify, install=self._install_enclave,
                refuse_from=enclave_only,
            )
            self.control.start()
            self._start_metrics()
            self._save_state()
            self._start_enclave()
        except BaseException:
            self.close()
            raise
        log.info("the parent of %s is up on %s (%s port %d, control %d)", named(p.name),
                 p.interface, t.kind, t.port, t.control_port)

    def _enable_forwarding(self, versions: set[int]) -> None:
        """Turns forwarding on for the IP VERSIONS the tunnel has addresses of (only those:
        an IPv6-only tunnel leaves IPv4 forwarding as it found it; reload cannot add a
        family, the addresses are not live keys), with the values it replaces in the state
        file before each write: `down` after a kill at any point puts back what was changed.
        Under the lock a stopping parent decides in (state.restore_forwarding) and with our
        state file written first, so a parent stopping meanwhile counts this one and leaves
        forwarding on."""
        # A parent of this profile that crashed left forwarding on and, in its state file,
        # the values from before it: those are what to put back, not the "1"s found now,
        # which would leave the host routing for good after the next `down`.
        before = self._crashed_forwarding()

        def record(changed: dict[str, str]) -> None:
            self._forwarding = {**changed, **before}
            self._save_state()

        with forwarding_lock():
            self._forwarding = dict(before)
            self._forwarding_on = True  # from here close() puts back what the record holds
            self._save_state()
            record(firewall.enable_forwarding(ipv4=4 in versions, ipv6=6 in versions,
                                              record=record))

    def _crashed_forwarding(self) -> dict:
        """The forwarding values from before a parent of this profile that died without
        `down` (its state file names a process that is gone), else nothing."""
        state = State.load(self.profile.name)
        if state is None or state.pid == os.getpid() or state.running():
            return {}
        if state.newer_fields:
            # Taking it over would lose the record of what only that release can undo.
            raise RoleError(f"{state.newer_note()} yet, and its parent (pid {state.pid}) is "
                            f"gone: run `wgvsock parent down --profile {shell(self.profile.path)}` "
                            f"first, which undoes what it knows of and names the rest")
        return dict(state.forwarding)

    def _save_state(self) -> None:
        p = self.profile
        if self._state is None:
            self._state = State(p.name, os.getpid(), p.interface, os.path.abspath(p.path),
                                self._forwarding, self._sockets,
                                started=start_time(os.getpid()) or 0,
                                code=code_fingerprint(),
                                families=sorted({f"ipv{a.version}"
                                                 for a in p.enclave.addresses}))
        self._state.forwarding, self._state.sockets = self._forwarding, self._sockets
        self._state.save()

    def _start_refusal_reader(self) -> None:
        try:
            sock = open_free_group(self.profile.name)
        except OSError as e:  # a kernel without nfnetlink_log: the counters still count
            log.warning("%s: refused destinations will not be named in the log or "
                        "`wgvsock status` (no nfnetlink_log group: %s)", named(self.profile.name),
                        e.strerror or e)
            return
        self._refusal_reader = RefusalReader(sock, self.refusals)
        self._refusal_reader.start()

    def _status_keys(self) -> dict[str, str]:
        """The device's read-only UAPI keys: the counters, the recent refusals, and the
        control port's (an enclave refused is otherwise only in the log)."""
        keys = self.counters.uapi_keys() if self.counters is not None else {}
        keys.update(self.refusals.uapi_keys())
        if self.control is not None:
            keys.update(self.control.refusals.uapi_keys())
        sup = self.supervisor
        if sup is not None and sup.info is None and sup.last_reason:
            # As status_line says it: without it the dashboard showed only that no enclave
            # had registered, while the reason (run-enclave failed, with its fix) was in the
            # log. One line without NULs, or the device refuses the whole `get`.
            keys["wgvsock_enclave_down"] = " ".join(sup.last_reason.replace("\0", " ").split())
        return keys

    def _dns(self) -> DnsCounters | None:
        return self.dns_counters() if self.dns_counters is not None else None

    def _start_metrics(self) -> None:
        m = self.profile.parent.metrics
        if m.listen is None and m.cloudwatch is None:
            return
        from ..services.metrics.prometheus import Exporter, registry_for

        registry = registry_for(self)
        if m.listen is not None:
            host, port = m.listen
            try:
                self.exporter = Exporter(registry, host, port)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise RoleError(f"parent.metrics.listen {host} port {port}: "
                                    f"{e.strerror or e}: choose a free port, or an address of "
                                    "this host") from None
                # Taken: any local user may bind a port above 1023, and the tunnel must not
                # stay down for it (nor restart until systemd gives up).
                log.warning("%s: parent.metrics.listen %s port %d is taken by another "
                            "process; the tunnel comes up without metrics and the port is "
                            "tried again every %.0f s. Whatever answers there meanwhile is not "
                            "wgvsock: a port below 1024 only root may take",
                            named(self.profile.name), host, port, _METRICS_RETRY)
                self._metrics_waiting = (registry, host, port,
                                         time.monotonic() + _METRICS_RETRY)
        if m.cloudwatch is not None:
            from ..services.metrics.cloudwatch import CloudWatchSender

            self.cloudwatch = CloudWatchSender(registry, m.cloudwatch.namespace,
                                               m.cloudwatch.interval, self.profile.name)
            self.cloudwatch.start()

    def _enclave_filter(self) -> Callable[[object], str | None] | None:
        """Which vsock peers may use the control and WireGuard ports: the enclave's CID when
        it is known (the profile names it, or `up` starts the enclave and learns it); anyone
        otherwise. For another, what it says is the CID expected and where that comes from.
        Asked at each accept, so a CID nitro-cli reports later (or anew, for a restarted
        enclave) counts from then on."""
        p = self.profile
        if p.transport.kind != "vsock":
            return None  # the stand-ins: the socket's directory or bind address is the fence
        if p.parent.enclave_cid is not None:
            fixed, source = p.parent.enclave_cid, "the profile's parent.enclave_cid"
        elif p.parent.enclave is not None:
            fixed, source = p.parent.enclave.cid, "the profile's parent.enclave.cid"
        else:
            return None

        def refuse(addr: object) -> str | None:
            # Launched by us without a fixed CID: only the CID nitro-cli reported for the
            # enclave running now (the supervisor's); none before it starts or after it
            # exits, when nitro-cli may give that CID to another enclave.
            cid = fixed if fixed is not None else self._running_cid()
            if isinstance(addr, tuple) and addr[:1] == (cid,):
                return None
            if cid is None:
                return ("expected none: the enclave this parent starts is not running, "
                        "and only the CID nitro-cli reports for it is let in")
            return (f"expected CID {cid}, " + (source if fixed is not None else
                    "which nitro-cli reported for the enclave this parent started"))

        return refuse

    def _running_cid(self) -> int | None:
        # Read once: close() sets supervisor to None while both ports still accept (on their
        # own threads), and a second read could then find None.
        sup = self.supervisor
        info = sup.info if sup is not None else None
        return info.cid if info is not None else None

    def check_firewall(self) -> None:
        """Puts our nftables table back when someone deleted or emptied it (`nft flush
        ruleset`, a firewall reload): without it the enclave would be forwarded unfiltered.
        If it cannot be put back, raises RoleError; the caller then stops, which removes the
        interface and so ends all forwarding to and from the enclave."""
        if not self._table:
            return
        name = self.profile.name
        try:
            count = firewall.rule_count(name)
        except (firewall.FirewallError, OSError, ValueError) as e:
            self._table_unreadable(name, e)
            return
        if self._unreadable is not None:
            log.info("%s: nftables table %s read again", named(name), firewall.table_name(name))
            self._unreadable = None
        try:
            if self._rules is None and count > 0:  # our table always has rules
                self._rules = count
                return
            if count == self._rules:
                return
            log.warning("%s: nftables table %s was deleted or changed by someone else; "
                        "putting it back", named(name), firewall.table_name(name))
            # The name sets' addresses come back with it; the counters start again from zero.
            self._replace_table(self.profile, keep_counters=False)
        except (firewall.FirewallError, OSError, ValueError) as e:
            raise RoleError(f"nftables table {firewall.table_name(name)} is gone and cannot be "
                            f"put back ({e}); stopping so the enclave is not left "
                            "unfiltered") from e

    def _table_unreadable(self, name: str, e: Exception) -> None:
        """check_firewall could not read the table: said once, tried again each second, and
        after _FIREWALL_UNREADABLE_LIMIT a RoleError, as for a table that cannot be put back
        (nothing then shows the enclave's traffic is still filtered)."""
        now = time.monotonic()
        table = firewall.table_name(name)
        if self._unreadable is None:
            self._unreadable = (now, str(e))
            log.warning("%s: cannot read nftables table %s to check it is there (%s); trying "
                        "again, and stopping if it stays unreadable for %.0f s", named(name),
                        table, e, _FIREWALL_UNREADABLE_LIMIT)
            return
        since, first = self._unreadable
        if now - since >= _FIREWALL_UNREADABLE_LIMIT:
            raise RoleError(f"nftables table {table} could not be read for {now - since:.0f} s "
                            f"({e}; first: {first}); stopping so the enclave is not left "
                            "unfiltered") from e

    def check_metrics(self) -> None:
        """Tries again for a metrics port that was taken at start (_start_metrics)."""
        waiting = self._metrics_waiting
        if waiting is None or time.monotonic() < waiting[3]:
            return
        from ..services.metrics.prometheus import Exporter

        registry, host, port, _ = waiting
        try:
            self.exporter = Exporter(registry, host, port)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                log.warning("%s: parent.metrics.listen %s port %d: %s",
                            named(self.profile.name), host, port, e.strerror or e)
            self._metrics_waiting = (registry, host, port, time.monotonic() + _METRICS_RETRY)
            return
        self._metrics_waiting = None

    def check_tunnel(self) -> None:
        """Puts the tunnel's accept_ra, autoconf and accept_redirects back to 0 when something
        set them (a tool, a second `up` racing this one's start, IPv6 coming back to the
        interface after an MTU below 1280, which starts it again from `default`)."""
        if self.device is None:
            return
        try:
            changed = firewall.refuse_router_messages(self.profile.interface)
        except (firewall.FirewallError, OSError, ValueError) as e:
            if not self._tunnel_check_failed:
                log.warning("%s: cannot keep %s from taking router advertisements and "
                            "redirects from the enclave: %s", named(self.profile.name),
                            self.profile.interface, e)
            self._tunnel_check_failed = True
            return
        self._tunnel_check_failed = False
        if changed:
            log.warning("%s: %s set to 0 again: the enclave must not configure the "
                        "parent's routing", named(self.profile.name),
                        ", ".join(k.replace("/", ".") for k in changed))

    def _start_dns(self) -> None:
        """With host names in parent.egress, the DNS forwarder on the tunnel addresses."""
        if not self.profile.parent.egress.uses_names:
            return
        self.dns = self._new_forwarder(self.profile)
        self.dns.start()
        self._dns_stats = stats = self.dns.stats  # plain ints, each read whole elsewhere
        self.dns_counters = lambda: DnsCounters(stats.queries, stats.refused)

    def _new_forwarder(self, profile):
        from ..services.egress.forwarder import Forwarder

        name = profile.name
        return Forwarder(
            listen=[a.ip for a in profile.parent.addresses], upstream=_upstream(profile),
            policy=_name_policy(profile),
            update_sets=lambda elements: firewall.add_to_sets(name, elements),
            grace=profile.parent.egress.dns_grace, log=log,
            clients=[a.ip for a in profile.enclave.addresses],
            stats=self._dns_stats,  # names back after a reload: the counters go on
            refusals=self.refusals,
        )

    def load_test_root(self) -> None:
        """Reads the profile's attestation.test_root_ca, after its check, for every
        registration from now on (`up`; a reload reads its own). Raises RoleError."""
        root = read_test_root(self.profile.attestation.test_root_ca)
        with self._trust_lock:
            self._test_root = root

    def _trust(self) -> tuple[Any, Any]:
        """The attestation policy in force and the test root it trusts (None: AWS's)."""
        with self._trust_lock:
            policy, held = self.profile.attestation, self._test_root
        if not policy.test_root_ca:
            return policy, None
        if held is None or held[0] != policy.test_root_ca:
            # Never read: a bug. Refused (the control server refuses on any error) rather
            # than read now, unchecked. The path stays out of what the enclave is told.
            raise RuntimeError("the test root CA (attestation.test_root_ca) was not read")
        return policy, held[1]

    def _verify(self, public_key: bytes, document: bytes | None, nonce: bytes) -> Verdict:
        """The control server's verifier: the profile's attestation policy, now."""
        trust, when = self._trust(), time.time()
        verdict = judge(trust[0], public_key, document, nonce, now=when, root=trust[1])
        return replace(verdict, evidence=(document, nonce, when, trust))

    def _install_enclave(self, public_key: bytes, verdict: Verdict) -> None:
        assert self.device is not None
        if verdict.evidence is not None:
            document, nonce, when, trust = verdict.evidence
            if trust != (current := self._trust()):
                # A reload changed the policy (or the root) between this enclave's verdict and
                # now (installs and the reload's check of the running enclave take turns): ask
                # the new one.
                verdict = judge(current[0], public_key, document, nonce, now=when,
                                root=current[1])
                if not verdict.accepted:
                    raise ControlError(f"refused an enclave under the reloaded attestation "
                                       f"policy: {prose(verdict.reason, 300)}")
            registration: tuple | None = (public_key, document, nonce, when)
        else:
            registration = None
        allowed = [
            (type(a.network)(f"{a.ip}/{a.max_prefixlen}"), True)
            for a in self.profile.enclave.addresses
        ]
        # The profile has exactly one enclave: a new key (a restarted enclave) replaces the
        # peer; the same key (only the control connection was new) keeps its session.
        if public_key != self.enclave_key:
            configure(self.device, replace_peers=True,
                      peers=[{"public_key": public_key, "allowed_ips": allowed}])
        self.enclave_key, self.verdict = public_key, verdict
        self._registration = registration
        self._show_verdict(verdict)

    def _show_verdict(self, verdict: Verdict | None) -> None:
        """The device's read-only role keys; VERDICT None: no enclave judged yet."""
        assert self.device is not None
        status = {"wgvsock_profile": self.profile.name, "wgvsock_role": "parent"}
        if verdict is not None:
            status["wgvsock_attested"] = attestation_state(verdict)
        if self.enclave_key is not None:
            # Which peer the verdict is about: `wgvsock status` must not take a peer added by
            # hand (`wg set`) for the attested enclave. Hex, as the UAPI writes keys.
            status["wgvsock_enclave_key"] = self.enclave_key.hex()
        self.device.extra_status = status

    # -- reload ----------------------------------------------------------------------------

    def reload(self, new) -> list[str]:
        """Applies NEW's egress policy, ingress ports and attestation policy to the running
        parent; the tunnel, the enclave's session and established connections stay. Returns
        what it did, a line each. Raises RoleError, with nothing changed, when NEW changes
        anything else (that needs `down` and `up`) or cannot be applied."""
        from ..services.profile import changed_keys

        changed = changed_keys(self.profile, new)
        fixed = [k for k in changed if not k.startswith(_LIVE_KEYS + _ENCLAVE_ONLY_KEYS)]
        if fixed:
            raise RoleError(
                "not reloaded: " + ", ".join(f"{k} (line {new.line_of(k)})" for k in fixed)
                + " changed, which a running parent cannot take. Put the old value back, or "
                "run `wgvsock parent down` and `up` (the enclave registers again)")
        if "parent.egress.interface" in changed and new.parent.egress.interface:
            check = egress_interface_check(new)
            if check.ok is False:
                raise RoleError(f"not reloaded: {check.detail}")
        # Read again at each reload, changed or not: the file is what the operator edits.
        try:
            root = read_test_root(new.attestation.test_root_ca)
        except RoleError as e:
            raise RoleError(f"not reloaded: {e}") from None
        with self._trust_lock:
            old_root = self._test_root
        new_root = (root is not None and "attestation.test_root_ca" not in changed
                    and root != old_root)
        if not changed and not new_root:
            return ["nothing changed"]
        done: list[str] = []
        if any(k.startswith(("parent.egress.", "parent.ingress")) for k in changed):
            done.append(self._reload_firewall(new, changed))
        old = self.profile
        with self._trust_lock:
            self.profile, self._test_root = new, root
        if new_root:
            done.append(f"attestation.test_root_ca: {new.attestation.test_root_ca} holds "
                        "another certificate now")
        if new_root or any(k.startswith("attestation.") for k in changed):
            try:
                done.append(self._recheck_enclave())
            except Exception as e:
                # The old policy stays in force, so reloading the file again retries this.
                with self._trust_lock:
                    self.profile = replace(new, attestation=old.attestation)
                    self._test_root = old_root
                log.exception("%s: attestation re-check failed", named(new.name))
                raise RoleError("partly reloaded: " + "; ".join(done or ["nothing else"])
                                + f"; but the new attestation policy was not applied: asking "
                                f"it about the running enclave failed ({error(e)})") from None
        if only := [k for k in changed if k.startswith(_ENCLAVE_ONLY_KEYS)]:
            done.append(f"{', '.join(only)}: read by the enclave from the profile in its image, "
                        "not by the parent; they take effect with a new image")
        return done + [f"warning: {w}" for w in new.warnings]

    def _reload_firewall(self, new, changed: list[str]) -> str:
        """The table for NEW, and the DNS forwarder started, updated or stopped to match."""
        uses_names = new.parent.egress.uses_names
        upstream = _upstream(new) if uses_names else []  # may refuse: nothing changed yet
        started = None
        if uses_names and self.dns is None:
            started = self._new_forwarder(new)
            try:
                started.start()
            except OSError as e:
                raise RoleError(f"not reloaded: the DNS forwarder for the names in "
                                f"parent.egress cannot start: {e}") from None
            self.dns = started
        try:
            carried = self._replace_table(new, keep_counters=True)
        except (firewall.FirewallError, OSError, ValueError) as e:
            if started is not None:
                started.close()
                self.dns = None
            raise RoleError(f"not reloaded: nftables refused the new table ({e}); the old "
                            "one is still in place") from None
        if started is not None:
            self._dns_stats = stats = started.stats
            self.dns_counters = lambda: DnsCounters(stats.queries, stats.refused)
        elif uses_names:
            self.dns.set_upstream(upstream)
        elif self.dns is not None:
            self.dns_counters = None
            self.dns.close()
            self.dns = None
        keys = [k for k in changed if k.startswith(("parent.egress.", "parent.ingress"))]
        text = (f"{', '.join(keys)}: nftables table {firewall.table_name(new.name)} replaced "
                "in one transaction (established connections carry on; counters kept)")
        if self.dns is not None:
            text += f"; {carried} address(es) of allowed names carried over"
        return text

    def _recheck_enclave(self) -> str:
        """Asks the (new) attestation policy again about the running enclave, as of its
        registration; an enclave the policy refuses is removed."""
        if self.control is None:
            return "attestation: the new policy applies from the next registration"
        refusal: list[str] = []
        installed = [True]

        def admitted() -> bool:
            # Under the control server's install lock: an install in progress has finished,
            # and the next one compares its verdict's policy with the new one.
            if self.enclave_key is None:
                installed[0] = False
                return True
            reg = self._registration
            if reg is None or reg[0] != self.enclave_key:
                refusal.append("what it presented when it registered is not known")
                return False
            key, document, nonce, when = reg
            policy, root = self._trust()
            verdict = judge(policy, key, document, nonce, now=when, root=root)
            if not verdict.accepted:
                refusal.append(verdict.reason)
                return False
            self.verdict = verdict
            self._show_verdict(verdict)
            return True

        if self.control.revalidate(admitted, self._remove_enclave):
            if not installed[0]:
                return "attestation: the new policy applies from the next registration"
            return ("attestation: the running enclave meets the new policy (attested: "
                    f"{attestation_state(self.verdict)})")  # type: ignore[arg-type]
        why = prose(refusal[0] if refusal else "refused", 300)
        log.warning("%s: removed the running enclave: the new attestation policy "
                    "refuses it (%s)", named(self.profile.name), why)
        return (f"attestation: removed the running enclave, which the new policy refuses "
                f"({why}); it is refused when it registers again")

    def _remove_enclave(self) -> None:
        assert self.device is not None
        configure(self.device, replace_peers=True, peers=[])
        self.enclave_key = self._registration = None
        self.verdict = Verdict(False, reason="removed by a reload")
        self._show_verdict(self.verdict)

    def _start_enclave(self) -> None:
        """With `parent.enclave` in the profile, start the enclave and keep it running."""
        if self.profile.parent.enclave is None:
            return
        from ..services.nitro import EnclaveSupervisor, NitroCli, enclave_name

        def started(info) -> None:
            if self._state is not None and not self.stopped.is_set():
                self._state.enclave = {"id": info.enclave_id, "cid": info.cid,
                                       "name": info.name}
                self._state.save()

        self.supervisor = EnclaveSupervisor(NitroCli(), self.profile.parent.enclave,
                                            enclave_name(self.profile.name), started, log)
        self.supervisor.start()

    def status_line(self, now: float) -> str:
        """One line for `systemctl status` (sd_notify STATUS): changes only on events."""
        sup = self.supervisor
        if sup is not None and sup.info is None and sup.last_reason:
            # Between an exit or a failed run-enclave and the next start: the reason (with
            # its fix) is what the operator needs, not the tunnel of an enclave now gone.
            return f"{self.profile.interface} up; enclave not running: {sup.last_reason}"
        if self.enclave_key is None or self.device is None:
            return f"{self.profile.interface} up; waiting for the enclave to register"
        attested = attestation_state(self.verdict) if self.verdict is not None else "false"
        last = self.device.last_handshake(self.enclave_key)
        if last is None:
            tunnel = "waiting for its first handshake"
        elif now - last < _TUNNEL_QUIET:
            tunnel = "tunnel up"
        else:
            tunnel = f"no handshake for over {_TUNNEL_QUIET:.0f} s"
        return (f"{self.profile.interface} up; enclave registered (attested: {attested}); "
                f"{tunnel}")

    def close(self) -> None:
        self.stopped.set()
        for service in (self.cloudwatch, self.exporter):
            if service is not None:
                service.close()
        self.cloudwatch = self.exporter = None
        if self.supervisor is not None:
            self.supervisor.stop()  # terminates the enclave it started
            self.supervisor = None
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.dns is not None:
            self.dns_counters = None
            self.dns.close()
            self.dns = None
        # The interface first: once it is gone nothing reaches or leaves the enclave, so
        # removing the filter afterwards never leaves it unfiltered on a forwarding host.
        if self.device is not None:
            self.device.close()
            self.device = None
        if self._refusal_reader is not None:  # what the table logs from now on is dropped
            self._refusal_reader.close()
            self._refusal_reader = None
        if self._table:
            firewall.remove(self.profile.name)
            self._table = False
        if self._forwarding_on:  # start() switched it on (recording what it changed)
            try:
                if (left := restore_forwarding(self.profile.name, self._forwarding)) is not None:
                    log.log(logging.WARNING if left.uncertain else logging.INFO,
                            "%s: %s", named(self.profile.name), left)
            except (RoleError, OSError, ValueError, firewall.FirewallError) as e:
                # The values are in the host's record (state.py): the next parent to stop, or
                # `parent down`, tries again.
                log.error("%s: could not put back the IP forwarding settings: %s",
                          named(self.profile.name), e)
            self._forwarding, self._forwarding_on = {}, False
        for path in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # Only our own: a second `up` that failed must not delete the running one's record.
        try:
            state = State.load(self.profile.name)
        except RoleError:
            state = None
        if state is not None and state.pid == os.getpid():
            State.path_for(self.profile.name).unlink(missing_ok=True)


def renamed(profile, *, its_interface: bool = False) -> None:
    """Raises RoleError when a parent runs from PROFILE's file under another name: the file's
    `name` was changed under it, and `up` or `down` would act on a profile nothing runs (`down`
    stopped nothing, then `up` found the interface taken by the old name's parent).
    ITS_INTERFACE (`up`): only when that parent holds PROFILE's interface. The file may be a
    link since moved to another profile, which runs beside it, and `up` of that one is no
    rename; where the interfaces differ nothing clashes."""
    from .state import running_from

    other = running_from(profile.path)
    if other is not None and other.name != profile.name \
            and (not its_interface or other.interface == profile.interface):
        raise RoleError(
            f"the parent running from {profile.path} is profile {other.name!r} (pid "
            f"{other.pid}); the file now names {profile.name!r} (line "
            f"{profile.line_of('name')}): a new name needs that parent stopped first. Put the "
            f"old name back, run `wgvsock parent down --profile {shell(profile.path)}`, then "
            "the new name and `up`")


def _of_the_file(profile, text: str) -> bool:
    """Whether TEXT starts as a profile problem does, "FILE:LINE: key: ...", naming PROFILE's
    file: what it is about is said there, and nothing need be put before it."""
    return text.startswith(f"{profile.path}:")


def _interface_taken(profile) -> str:
    """Why PROFILE's interface could not be made: another process holds a TUN of that name
    (the kernel's EBUSY). Names the parent that runs it when a state file says so."""
    from .state import others_running

    ifname = profile.interface
    holder = "another parent, or another program (wireguard-go, wg-quick),"
    for name in [*others_running(profile.name), profile.name]:
        with contextlib.suppress(RoleError):
            state = State.load(name)
            if state is not None and state.interface == ifname and state.running():
                holder = f"the parent of profile {state.name} (pid {state.pid})"
                break
    return (f"interface {ifname} is taken: {holder} already runs it. One interface serves "
            f"one parent: stop that one first (`wgvsock parent down` with its profile), or "
            f"give this profile another `interface`")


# What a running parent imports only when it first needs it (a registration with a document,
# a reload that brings in host names), relative to this package. run_up imports them at the
# start: a package upgraded under a running parent would otherwise hand it the next release's
# module (or none, half installed) at that moment.
_LATER_MODULES = ("attestation", "attestation.verify", "services.egress.names",
                  "services.egress.forwarder")


def _import_what_it_may_need(profile) -> None:
    """_LATER_MODULES, and those the profile's settings that `up` alone reads call for (the
    metrics, nitro-cli's, AWS's): the others cost a parent that never uses them memory (boto3
    alone some 8 MiB)."""
    import importlib

    names = list(_LATER_MODULES)
    metrics = profile.parent.metrics
    if metrics.listen is not None:
        names.append("services.metrics.prometheus")
    if metrics.cloudwatch is not None:
        names.append("services.metrics.cloudwatch")
    if metrics.cloudwatch is not None or profile.parent.private_key.startswith(
            ("ssm:", "secretsmanager:")):
        names.append("services.aws")
    if profile.parent.enclave is not None:
        names.append("services.nitro")
    package = __name__.rsplit(".", 2)[0]
    for name in names:
        # One that cannot be imported (attestation without its dependencies) is said where
        # it is needed (judge: "this version cannot verify"), as before.
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{package}.{name}")


def run_up(profile, ready_fd: int | None) -> int:
    from ..daemon import report_ready

    _import_what_it_may_need(profile)

    # Under a Type=notify unit: READY=1 once up, the watchdog while the data path moves, and a
    # dump of every thread's stack to the journal when the watchdog's SIGABRT comes.
    notifier = Notifier.from_environ()
    enable_stack_dumps()
    forbid_core_dumps()  # before the key is read
    parent = Parent(profile)
    # The handler only notes what was asked, and the loop waits on a Wakeup (wgvsock.signals
    # says why). Installed before `start`, which writes the state file: from then on `parent
    # reload` may send SIGHUP, whose default action would kill us.
    asked = {"stop": False, "reload": False}
    wakeup = Wakeup()

    def on_signal(signum: int, _frame: object) -> None:
        asked["reload" if signum == signal.SIGHUP else "stop"] = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    failures: list[str] = []

    def on_death(reason: str) -> None:  # on the dying thread
        failures.append(reason)
        asked["stop"] = True
        wakeup.wake()

    passed = [time.monotonic()]  # when the main loop last came round

    def health(now: float) -> str | None:
        device = parent.device
        stalled = device.stalled(now) if device is not None else None
        if stalled is None and now - passed[0] > _MAIN_LOOP_LIMIT:
            stalled = (f"the main loop has not come round for {now - passed[0]:.0f} s "
                       "(it applies reloads and answers SIGTERM)")
        return stalled

    watchdog = Watchdog(notifier, health)
    reloaded = ""  # the last reload's outcome, kept in the status line
    try:
        try:
            parent.start()
        except Exception as e:  # start() has undone what it made; say why, wherever asked
            # The launcher puts "wgvsock parent up: " before it, the log its logger's name.
            # The profile is named unless the message names its file already.
            text = message(e)
            msg = text if _of_the_file(profile, text) else f"{named(profile.name)}: {text}"
            if isinstance(e, RoleError | OSError | ValueError | firewall.FirewallError):
                log.error("%s", msg)
            else:  # e.g. botocore's own errors: a traceback helps
                log.exception("%s", msg)
            report_ready(ready_fd, msg)
            notifier.status(msg)
            return 1
        on_thread_death(on_death)
        if parent.device is not None:  # its stopping by itself is read in the loop below
            parent.device.on_stop(wakeup.wake)
        try:
            if asked["stop"]:  # SIGTERM while starting (`parent down`): never claim to be up
                report_ready(ready_fd, f"{named(profile.name)}: stopped by a signal while "
                             "starting")
            else:
                report_ready(ready_fd)
                notifier.ready(parent.status_line(time.monotonic()))
            watchdog.start()
            while not asked["stop"]:
                passed[0] = time.monotonic()
                wakeup.wait(1.0)
                if asked["stop"]:
                    break
                if asked["reload"]:
                    asked["reload"] = False
                    ok = reload_from_file(parent, notifier)
                    reloaded = (f"reloaded at {time.strftime('%H:%M:%S')}" if ok else
                                f"reload at {time.strftime('%H:%M:%S')} refused (see the log)")
                now = time.monotonic()
                stalled = parent.device.stalled(now) if parent.device is not None else None
                notifier.status(f"stuck: {stalled}" if stalled else
                                "; ".join(filter(None, (parent.status_line(now), reloaded))))
                if parent.device is not None and parent.device.wait(0):
                    log.error("%s: %s", named(profile.name), parent.device.stop_reason)
                    # Stopping on its own is a failure, whatever the reason: the unit's
                    # Restart=on-failure then brings it back.
                    failures.append(parent.device.stop_reason or "the device stopped")
                    break
                try:
                    parent.check_firewall()
                except RoleError as e:
                    failures.append(str(e))
                    break
                parent.check_tunnel()
                parent.check_metrics()
        finally:
            watchdog.close()
            notifier.stopping(f"stopping: {failures[0]}" if failures else "stopping")
            parent.close()
    finally:
        notifier.close()
        wakeup.close()
    if failures:
        # Non-zero, so systemd restarts us: a part of the data path is gone.
        log.error("the parent of %s stopped: %s", named(profile.name), failures[0])
        return 1
    return 0


def reload_from_file(parent: Parent, notifier: Notifier | None = None) -> bool:
    """SIGHUP: reads the running profile's file again and applies it (Parent.reload). The
    outcome goes to the log and to the state file, where `parent reload` waits for it, and to
    systemd (RELOADING=1, then READY=1 before the outcome is recorded: the unit's ExecReload,
    which waits for that record, then ends with the service back in its running state)."""
    from ..services.profile import ProfileError, load_profile_digest

    name, path = parent.profile.name, parent.profile.path
    if notifier is not None:
        notifier.reloading()
    # Which `parent reload` asked (it waits for its own outcome): read before the file, so
    # an outcome never claims a request made after the file was read.
    try:
        request = request_path(name).read_text()[:64]
    except OSError:
        request = ""  # a bare SIGHUP
    digest = ""
    try:
        new, digest = load_profile_digest(path)
        if new.name != name:
            raise RoleError(f"not reloaded: {path} now names profile {new.name!r} (line "
                            f"{new.line_of('name')}), not {name!r}: a new name needs "
                            "`wgvsock parent down` and `up`")
        done = parent.reload(new)
        ok, message = True, "\n".join(done)
        log.info("%s reloaded from %s: %s", named(name), path, "; ".join(done))
    except ProfileError as e:
        ok, message = False, f"not reloaded: {path} is not a valid profile:\n{e}"
    except RoleError as e:
        ok, message = False, str(e)
    except Exception as e:  # a bug in one reload must not stop the parent
        log.exception("%s: reload failed", named(name))
        ok, message = False, f"not reloaded: internal error: {error(e)}"
    if not ok:
        log.error("%s: %s", named(name), message)
    if notifier is not None:
        first = message.splitlines()[0] if message else ""
        notifier.ready(("reloaded: " if ok else "") + prose(first, 200))
    state = parent._state
    if state is not None:
        state.reload = {"seq": state.reload.get("seq", 0) + 1, "ok": ok, "message": message,
                        "sha256": digest, "request": request}
        try:
            state.save()
        except (OSError, RoleError) as e:  # `parent reload` times out, saying to read the log
            log.error("%s: cannot record the reload's outcome in %s: %s", named(name),
                      State.path_for(name), e)
    return ok


def down(profile) -> tuple[list[str], list[str]]:
    """Stops a running parent and removes everything `up` made: what it did, and what it
    could not do. A step that fails does not keep the others from being tried."""
    done: list[str] = []
    failed: list[str] = []

    def attempt(what: str, step: Callable[[], object]) -> bool:
        try:
            step()
            return True
        except Exception as e:  # cleanup goes on: each failure is reported
            failed.append(f"could not {what}: {message(e)}")
            return False

    unsafe_dir = False  # nothing in the state directory is read, written or removed
    try:
        state = State.load(profile.name)
    except StateDirError as e:
        failed.append(str(e))
        failed.append("IP forwarding settings not restored, and nothing in the state "
                      "directory removed: their values from before `up` are recorded there")
        state, unusable, unsafe_dir = None, True, True
    except StateFileError as e:
        # Damaged, or not to be trusted: what it names (a pid, sysctls) is not acted on; the
        # rest goes as after a crash, except what only the state could say is ours.
        failed.append(str(e))
        failed.append("IP forwarding settings not restored: their values from before `up` "
                      "were recorded in that file")
        state, unusable = None, True
    else:
        unusable = False
    if state is None and not unusable:
        renamed(profile)
    ours_alive = False  # a parent of this profile that ignored SIGKILL so far
    if state is not None and state.running():
        stopped, ours_alive = _stop(state)
        done.append(stopped)
    # Whatever a crashed `up` may have left behind:
    if profile.parent.enclave is not None:
        from ..services.nitro import NitroCli, enclave_name, terminate_leftovers

        known = [state.enclave["id"]] if state is not None and state.enclave.get("id") else []
        terminated, not_done = terminate_leftovers(NitroCli(), enclave_name(profile.name), known)
        done += terminated
        if known or shutil.which("nitro-cli"):  # silent when there is nothing to look for
            failed += not_done
    # Our TUN goes with the process that made it, so an interface of this name is ours only
    # while that process lingers; otherwise it is someone else's (wg-quick's, wireguard-go's)
    # and stays. Ours goes before the filter, as in Parent.close: once it is gone nothing
    # reaches or leaves the enclave unfiltered.
    unfiltered = False
    if netconf.interface_exists(profile.interface):
        if unusable:
            # A parent of this profile may still run it, forwarding through our table.
            unfiltered = True
            failed.append(f"left interface {profile.interface} alone: with the state file "
                          "unusable, whether a parent of this profile still runs it is not "
                          "known")
        elif not ours_alive:
            done.append(f"left interface {profile.interface} alone: no parent of "
                        f"{named(profile.name)} holds it")
        elif attempt(f"delete interface {profile.interface} (pid {state.pid} still holds it)",
                     lambda: netconf.delete_interface(profile.interface)):
            done.append(f"deleted interface {profile.interface}")
        else:
            unfiltered = True
    if unfiltered:
        failed.append(f"left the nftables table of {named(profile.name)} in place: the "
                      f"enclave's interface {profile.interface} is still up")
    elif firewall.exists(profile.name) and attempt(
            f"remove the nftables table of {named(profile.name)}",
            lambda: firewall.remove(profile.name)):
        done.append(f"removed the nftables table of {named(profile.name)}")
    # A parent that stopped cleanly has restored them and removed its state file itself.
    keep_state = ours_alive or unusable  # its record is all that says what to put back later
    # Also when only the host's record is left (the values of parents that stopped while
    # another ran, or whose own restore failed): put back once no parent runs. Not while an
    # interface of the profile's name stays whose parent the unusable state file hid.
    ours = state is not None and State.path_for(profile.name).exists()
    record_left = (Path(state_dir()) / "forwarding.json").exists()
    if not unsafe_dir and (ours or (record_left and not (unusable and unfiltered))):
        previous = state.forwarding if ours and state is not None else {}
        left: list[LeftOn | None] = []
        if not attempt("restore the IP forwarding settings",
                       lambda: left.append(restore_forwarding(profile.name, previous))):
            keep_state = True
        elif left[0] is not None:
            # Our values are in the host's record either way: our state file may go.
            if left[0].uncertain:
                failed.append(str(left[0]))
            elif ours:
                done.append(str(left[0]))
        elif not ours:
            done.append("put back the IP forwarding settings that stopped parents recorded")
    sockets = list(state.sockets) if state else []
    sockets.append(os.path.join(run_dir(), f"{profile.interface}.sock"))
    for path in sockets:
        # Only a leftover: a socket somebody answers on is theirs (a wireguard-go serving an
        # interface of the same name, a parent started since), whoever bound it first.
        if os.path.lexists(path) and _remove_stale(path):
            done.append(f"removed {path}")
    if ours and state is not None and state.newer_fields:
        # A newer release's parent that did not remove its file (it crashed): all this one
        # knows of is undone above; the rest is for the operator.
        failed.append(f"{state.newer_note()}. Run `wgvsock parent down` of that release, or "
                      "check by hand what it may have left")
    if unusable:
        pass  # said above: the operator looks at it and removes it
    elif keep_state:
        failed.append(f"kept the state file {State.path_for(profile.name)}: run "
                      "`wgvsock parent down` again once the cause above is fixed")
    else:
        with contextlib.suppress(FileNotFoundError):
            State.path_for(profile.name).unlink()
            done.append(f"removed the state file {State.path_for(profile.name)}")
    # `parent reload`'s lock and request, and temporary files of a writer that was killed.
    leftovers: list[Path] = []
    if not unsafe_dir:
        leftovers += [State.path_for(profile.name).with_suffix(s)
                      for s in (".reload.lock", ".reload-request", ".tmp-request")]
        leftovers += Path(state_dir()).glob(f".{profile.name}.*.tmp")
    for path in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return done, failed


def _stop(state: State) -> tuple[str, bool]:
    """SIGTERM to the running parent STATE names, SIGKILL if it has not stopped within 15 s:
    what was done, and whether it still runs even so."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGTERM)
    if _wait_gone(state, 15):
        return f"stopped the parent (pid {state.pid})", False
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGKILL)
    return (f"killed the parent (pid {state.pid}): it did not stop within 15 s",
            not _wait_gone(state, 5))


def down_unloaded(path: str) -> tuple[list[str], list[str]]:
    """`parent down` with a profile file that cannot be loaded (broken while its parent runs):
    stops the parent running from PATH, or that of the name the file still gives, as its
    state file says (state.parents_of_file: only a process that is still that parent is
    signalled). A parent stopped by SIGTERM removes what it made itself; what else `down`
    looks for (a crashed parent's leftovers) only the profile can say is its own, so nothing
    else is touched. Returns what was done and what was not, both empty when no parent was
    found. RoleError when the file leads to two parents."""
    from ..services.profile import name_in
    from .state import parents_of_file

    found = parents_of_file(path, name_in(path))
    if len(found) > 1:
        by_path, by_name = found
        raise RoleError(
            f"the parent running from {path} is {named(by_path.name)} (pid {by_path.pid}), "
            f"but the file names '{by_name.name}', whose parent runs from {by_name.profile} "
            f"(pid {by_name.pid}): nothing was stopped. Fix the profile so that it says "
            "which, and run `down` again")
    if not found:
        return [], []
    state = found[0]
    how = (f"running from {path}" if os.path.realpath(state.profile) == os.path.realpath(path)
           else f"of the name {path} gives, running from {state.profile}")
    what, alive = _stop(state)
    what = what.replace("the parent", f"the parent of {named(state.name)}", 1)
    where = f"found by its state file {State.path_for(state.name)} ({how})"
    if alive or what.startswith("killed"):
        return [], [f"{what}; {where}. What it made (interface {state.interface}, its "
                    f"nftables table, the IP forwarding settings it changed) is left"
                    + (" and it still runs" if alive else "") + ": fix the profile and run "
                    "`down` again to remove it"]
    if State.path_for(state.name).exists():
        return [], [f"{what}, {where}, but it left its state file: it could not remove all "
                    "it made (its log says what). Fix the profile and run `down` again"]
    return [f"{what}, {where}: it removed what it had made as it stopped. Fix the profile "
            "before the next `up`"], []


def _wait_gone(state: State, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while state.running():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _remove_stale(path: str) -> bool:
    try:
        return remove_stale(path)
    except OSError:  # not a socket, or cannot tell: leave it
        return False
