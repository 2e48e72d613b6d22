"""End-to-end tunnel benchmark: our daemon, the Go seed (wireguard-go-vsock) and Debian's
wireguard-go, side by side at several tunnel MTUs.

Run as root: .venv/bin/python bench/tunnel_bench.py [--seconds S] [--rounds N] [--mtu M ...]
             [--case KEY ...] [--json FILE]

Two network namespaces joined by a veth cable (MTU 1500). Per tunnel MTU, a pair of interfaces
for every case is started at once; then N rounds go round the cases (so each case sees the same
mix of load from whatever else shares the machine), each round being: ping latency through
every case in turn (4 slices of 50 pings at -i 0.01, the issue's interval, the order of the
cases flipped every slice), then per case iperf3 with one TCP stream for S seconds a->b and
with -R (b->a), each against its own one-shot server. The table shows each throughput's median
over the rounds, the median and the mean of every ping's round trip, and the daemons' VmRSS
after the last round. Stream transports run over TCP
(and Unix stream), the stand-ins for vsock (DESIGN.md §5: never connect AF_VSOCK); the seed
runs only with `-n tcp`. Everything made is removed at the end, also on Ctrl-C or failure.

The machine the figures come from is usually shared: read the ratio columns (against the
seed at the same MTU, and for UDP against wireguard-go), not the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wgvsock.ui.nslab import (
    Keys,
    Lab,
    LabError,
    Namespace,
    preflight,
    rss_kib,
    run_in_lab,
    seed_binary,
)

MTUS = (1420, 8920, 65000)
PING_COUNT = 50  # pings per slice
PING_SLICES = 4  # slices per round, every case pinged in each, in turn
PING_INTERVAL = 0.01
IPERF_PORT = 5201
_PING_TIME = re.compile(r"time=([\d.]+) ms")
TOOLS = ("ip", "wg", "iperf3", "ping", "ss", "wireguard-go")
VETH_A, VETH_B = "192.168.201.1", "192.168.201.2"
# --forward: a third namespace behind b, as the internet is behind a parent that forwards.
FAR_NET, FAR_B, FAR_C = "192.168.202.0/24", "192.168.202.1", "192.168.202.2"
OFFLOAD_OFF = {"WGVSOCK_OFFLOAD": "0"}


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    impl_a: str  # "ours", "seed", "wireguard-go" or "relay"
    impl_b: str
    network: str
    env: tuple[tuple[str, str], ...] = ()  # for our daemons
    python: str = ""  # our daemons' interpreter, if not this one (a baseline's venv)
    args: tuple[str, ...] = ()  # for the relay
    # A yardstick rather than a tunnel (bench/relay.py): only when named with --case.
    calibration: bool = False


CASES = (
    Case("ours-tcp", "ours tcp", "ours", "ours", "tcp"),
    Case("ours-unix", "ours unix", "ours", "ours", "unix"),
    Case("ours-udp", "ours udp", "ours", "ours", "udp"),
    Case("ours-tcp-nooffload", "ours tcp offload off", "ours", "ours", "tcp",
         tuple(OFFLOAD_OFF.items())),
    Case("seed-tcp", "seed tcp", "seed", "seed", "tcp"),
    Case("ours-seed-tcp", "ours -> seed tcp", "ours", "seed", "tcp"),
    Case("wireguard-go-udp", "wireguard-go udp", "wireguard-go", "wireguard-go", "udp"),
    Case("relay-tcp", "relay tcp (no WireGuard)", "relay", "relay", "tcp", calibration=True),
    Case("relay-tcp-plain", "relay tcp, no AEAD", "relay", "relay", "tcp", args=("--plain",),
         calibration=True),
)
RELAY = Path(__file__).with_name("relay.py")
SEED = "seed-tcp"
WGGO = "wireguard-go-udp"


@dataclass
class Result:
    key: str
    label: str
    mtu: int
    mbps_a_to_b: list[float] = field(default_factory=list)
    mbps_b_to_a: list[float] = field(default_factory=list)
    ping_ms: list[float] = field(default_factory=list)  # every reply's round trip
    pings_lost: int = 0
    rss_kib_a: int | None = None
    rss_kib_b: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def median(self, what: str) -> float | None:
        values = getattr(self, what)
        return statistics.median(values) if values else None

    def ping_mean(self) -> float | None:
        return statistics.fmean(self.ping_ms) if self.ping_ms else None


def iperf(client: Namespace, server: Namespace, addr: str, port: int, seconds: float,
          reverse: bool, *extra: str) -> float:
    """Receiver-side Mbit/s of one TCP stream (what actually crossed the tunnel)."""
    data = iperf_json(client, server, addr, port, seconds, reverse, *extra)
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def iperf_json(client: Namespace, server: Namespace, addr: str, port: int, seconds: float,
               reverse: bool, *extra: str) -> dict[str, Any]:
    """iperf3's JSON report of one TCP stream (`extra`: more client options), against a
    one-shot server on its own port: a server still busy with the last run cannot refuse it."""
    srv = server.popen("iperf3", "-s", "-1", "-B", addr, "-p", str(port))
    try:
        _wait_listening(server, addr, port)
        cmd = ["iperf3", "-c", addr, "-p", str(port), "-t", f"{seconds:g}", "-J",
               "--connect-timeout", "3000", *extra]
        if reverse:
            cmd.append("-R")
        res = client.run(*cmd, check=False, timeout=seconds + 30)
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise LabError(f"iperf3 gave no JSON (rc {res.returncode}): {res.stderr.strip()}") from e
    if "error" in data:
        raise LabError(f"iperf3: {data['error']}")
    return data


def wait_ping(ns: Namespace, addr: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.ping(addr, 1, timeout=1).returncode == 0:
            return
    raise LabError(f"no ping reply from {addr} through the tunnel within {timeout:g} s")


def _start(lab: Lab, ns: Namespace, ifname: str, impl: str, case: Case,
           seed: Path | None) -> int:
    if impl == "wireguard-go":
        return lab.start_wireguard_go(ns, ifname)
    if impl == "seed":
        if seed is None:
            raise LabError("the Go seed binary is missing")
        return lab.start_seed(ns, ifname, seed)
    env = dict(case.env)
    # A baseline checkout: run there too, since `python -m` puts the working directory first.
    return lab.start_ours(ns, ifname, case.network, cwd=env.get("PYTHONPATH"),
                          python=case.python or None, **env)


def _start_relay(lab: Lab, ns: Namespace, ifname: str, case: Case, *side: str) -> int:
    lab.ifnames.append(ifname)
    p = ns.popen(sys.executable, str(RELAY), ifname, *side, *case.args, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    if p.stdout.readline().strip() != "ready":
        p.wait(10)
        raise LabError(f"the relay for {ifname} did not start: {p.stderr.read().strip()}")
    return p.pid


@dataclass
class Tunnel:
    """One case's pair of interfaces, up at one MTU."""

    case: Case
    result: Result
    if_a: str
    if_b: str
    tun_b: str
    pids: dict[str, int | None]


def bring_up(lab: Lab, a: Namespace, b: Namespace, case: Case, mtu: int, index: int,
             seed: Path | None, forward: bool = False) -> Tunnel:
    tag = f"{os.getpid() % 100000}"
    if_a, if_b = f"wgb{tag}{index}a"[:15], f"wgb{tag}{index}b"[:15]
    # Its own subnet and ports per case: all cases of one MTU are up at once.
    tun_a, tun_b = f"10.201.{index}.1", f"10.201.{index}.2"
    port_a, port_b = 51000 + 10 * index, 51001 + 10 * index
    t = Tunnel(case, Result(case.key, case.label, mtu), if_a, if_b, tun_b,
               {if_a: None, if_b: None})
    try:
        if case.impl_a == "relay":
            # The relay has no WireGuard to configure: b listens, a dials it.
            t.pids[if_b] = _start_relay(lab, b, if_b, case, "--listen", f"{VETH_B}:{port_b}")
            t.pids[if_a] = _start_relay(lab, a, if_a, case, "--connect", f"{VETH_B}:{port_b}")
        else:
            t.pids[if_a] = _start(lab, a, if_a, case.impl_a, case, seed)
            t.pids[if_b] = _start(lab, b, if_b, case.impl_b, case, seed)
            # The unix transport ignores the host: port N names <unix_dir>/N.sock.
            host = "127.0.0.1" if case.network == "unix" else VETH_B
            ka, kb = Keys(), Keys()
            lab.configure(if_a, ka, kb, f"{tun_b}/32,{FAR_NET}" if forward else f"{tun_b}/32",
                          listen_port=port_a, endpoint=f"{host}:{port_b}")
            # b learns a's endpoint from the first handshake, as a parent does from its enclave.
            lab.configure(if_b, kb, ka, f"{tun_a}/32", listen_port=port_b)
        lab.address(a, if_a, f"{tun_a}/24", mtu)
        lab.address(b, if_b, f"{tun_b}/24", mtu)
        wait_ping(a, tun_b)
    except (LabError, subprocess.TimeoutExpired) as e:
        _failed(lab, t, e)
    return t


def ping_times(output: str) -> list[float]:
    """Each reply's round trip in ms, from ping's output."""
    return [float(x) for x in _PING_TIME.findall(output)]


def ping_round(a: Namespace, tunnels: list[Tunnel], round_index: int) -> None:
    """Every case's pings of one round: PING_SLICES slices, each pinging through every case in
    turn, the order flipped from slice to slice. A round trip at -i 0.01 depends on how cold
    the caches are and on what else the two cores run (bench/README.md, seventeenth round):
    pinging the cases in one stretch each, after different iperf3 runs, left the 50-ping
    column scattering by 2x from run to run (0.64x to 1.62x the seed in one day's tables)."""
    for s in range(PING_SLICES):
        order = tunnels if (round_index + s) % 2 == 0 else tunnels[::-1]
        for t in order:
            r = t.result
            if r.error:
                continue
            try:
                res = a.run("ping", "-n", "-c", str(PING_COUNT), "-i", f"{PING_INTERVAL:g}",
                            "-W", "3", t.tun_b, check=False,
                            timeout=PING_COUNT * PING_INTERVAL + 15)
            except subprocess.TimeoutExpired as e:
                r.notes.append(f"ping timed out: {e}")
                continue
            times = ping_times(res.stdout)
            if not times:
                r.notes.append(f"ping: {res.stdout.strip()[-200:]} {res.stderr.strip()}")
            r.ping_ms += times
            r.pings_lost += PING_COUNT - len(times)


def measure(a: Namespace, b: Namespace, t: Tunnel, index: int, seconds: float,
            profile: Path | None = None, iperf_args: tuple[str, ...] = (),
            far: Namespace | None = None) -> None:
    """One case's iperf3 runs of a round, a->b and b->a (under py-spy when `profile` is a
    folder; `iperf_args` go to each iperf3 client). With `far` (--forward) the other end is
    that namespace behind b, reached through this case's tunnel."""
    r = t.result
    if r.error:
        return
    server, addr = (b, t.tun_b) if far is None else (far, FAR_C)
    try:
        if far is not None:
            a.ip("route", "replace", FAR_NET, "dev", t.if_a)
        port = IPERF_PORT + 2 * index
        with _profiled(t, profile, "a2b", seconds):
            r.mbps_a_to_b.append(iperf(a, server, addr, port, seconds, False, *iperf_args))
        with _profiled(t, profile, "b2a", seconds):
            r.mbps_b_to_a.append(iperf(a, server, addr, port + 1, seconds, True, *iperf_args))
    except (LabError, subprocess.TimeoutExpired) as e:
        # One failed run (the machine is shared) leaves a round out, not the whole row.
        r.notes.append(f"a round failed: {e}")


@contextlib.contextmanager
def _profiled(t: Tunnel, folder: Path | None, direction: str, seconds: float) -> Iterator[None]:
    """py-spy samples each of our daemons of `t` while the body runs: raw stacks (with
    thread names, idle included) go to <folder>/<case>-<mtu>-<direction>-<side>.txt."""
    ours = [(side, pid) for side, impl, pid in (("a", t.case.impl_a, t.pids[t.if_a]),
                                                  ("b", t.case.impl_b, t.pids[t.if_b]))
            if impl == "ours" and pid]
    if folder is None or not ours:
        yield
        return
    spy = str(Path(sys.executable).with_name("py-spy"))
    procs = [subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", f"{max(1, int(seconds))}", "-r", "250", "-f",
         "raw", "-t", "--nonblocking", "-o",
         str(folder / f"{t.case.key}-{t.result.mtu}-{direction}-{side}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for side, pid in ours]
    try:
        yield
    finally:
        for p in procs:
            try:
                p.wait(seconds + 15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def split_cores() -> tuple[set[int], set[int]]:
    """This process's CPUs in two halves: side a's and side b's, for `--split-cores`."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise LabError(f"--split-cores needs two CPUs or more; this process may use {cpus}")
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def pin_sides(t: Tunnel, cpus_a: set[int], cpus_b: set[int]) -> None:
    """Confines every thread of the tunnel's two daemons to their side's CPUs; threads they
    start later inherit it."""
    for pid, cpus in ((t.pids[t.if_a], cpus_a), (t.pids[t.if_b], cpus_b)):
        try:
            tids = os.listdir(f"/proc/{pid}/task") if pid else []
        except FileNotFoundError:
            continue  # the daemon has died: its rounds fail and say so
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(int(tid), cpus)


def tear_down(lab: Lab, a: Namespace, b: Namespace, t: Tunnel) -> None:
    # What each daemon holds once it has been under load.
    t.result.rss_kib_a = rss_kib(t.pids[t.if_a]) if t.pids[t.if_a] else None
    t.result.rss_kib_b = rss_kib(t.pids[t.if_b]) if t.pids[t.if_b] else None
    lab.stop_interface(a, t.if_a, t.pids[t.if_a])
    lab.stop_interface(b, t.if_b, t.pids[t.if_b])


def _failed(lab: Lab, t: Tunnel, e: Exception) -> None:
    t.result.error = str(e)
    for ifname in (t.if_a, t.if_b):
        log = lab.log_path(ifname)
        if log.exists() and log.stat().st_size:
            t.result.notes.append(f"{ifname} log tail: {log.read_text()[-400:]}")


def add_compare_options(ap: argparse.ArgumentParser, mtu: int, cycles: int) -> None:
    """The options of the tools that run a few cases side by side, cycle after cycle."""
    ap.add_argument("--case", action="append", choices=[c.key for c in CASES],
                    help="cases to compare (default ours-tcp and seed-tcp); the last is the "
                         "reference of the ratio column")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run our cases with the wgvsock package and the venv's "
                         "interpreter of this checkout")
    ap.add_argument("--mtu", type=int, default=mtu, help=f"tunnel MTU (default {mtu})")
    ap.add_argument("--cycles", type=int, default=cycles,
                    help=f"cycles round the cases (default {cycles})")


def baseline_python(checkout: str) -> str:
    """The interpreter of a checkout's own venv, or this one if it has none. Its own: the
    interpreter's build moves our figures too (bench/README.md, nineteenth round)."""
    venv = Path(checkout, ".venv", "bin", "python")
    return str(venv) if venv.exists() else sys.executable


def baseline_cases(cases: list[Case], checkout: str) -> list[Case]:
    """Our cases once more, run with the wgvsock package of another checkout (PYTHONPATH) and
    its venv's interpreter."""
    base = str(Path(checkout).resolve())
    return [replace(c, key=f"{c.key}@base", label=f"{c.label} (before)",
                    env=(*c.env, ("PYTHONPATH", base)), python=baseline_python(base))
            for c in cases if "ours" in (c.impl_a, c.impl_b)]


def compared_cases(args: argparse.Namespace) -> list[Case]:
    """The cases add_compare_options chose, the baseline's first (the last is the reference)."""
    cases = [next(c for c in CASES if c.key == k) for k in args.case or ["ours-tcp", SEED]]
    return (baseline_cases(cases, args.baseline) if args.baseline else []) + cases


@contextlib.contextmanager
def tunnels_up(lab: Lab, cases: list[Case], mtu: int, name: str,
               forward: bool = False) -> Iterator[tuple[Namespace, Namespace, list[Tunnel]]]:
    """Two namespaces on a veth and every case's tunnel up at `mtu` (`name` tells the
    namespaces apart from other runs'; `forward`: a's side routes FAR_NET into each tunnel,
    see far_side); all torn down on leaving."""
    seed, why = seed_binary(lab.tmp)
    if seed is None and any("seed" in (c.impl_a, c.impl_b) for c in cases):
        raise LabError(why)
    tag = f"{os.getpid() % 100000}"
    a, b = lab.netns(f"wg{name}{tag}a"), lab.netns(f"wg{name}{tag}b")
    lab.veth(a, f"v{name[:2]}{tag}a", f"{VETH_A}/24", b, f"v{name[:2]}{tag}b", f"{VETH_B}/24")
    tunnels: list[Tunnel] = []
    try:
        for i, c in enumerate(cases):
            tunnels.append(bring_up(lab, a, b, c, mtu, i, seed, forward))
        yield a, b, tunnels
    finally:
        for t in tunnels:
            tear_down(lab, a, b, t)


def far_side(lab: Lab, b: Namespace, name: str) -> Namespace:
    """--forward's third namespace (FAR_C) behind b (veth MTU 1500, b forwarding), as the
    internet is behind a parent."""
    tag = f"{os.getpid() % 100000}"
    far = lab.netns(f"wg{name}{tag}c")
    lab.veth(b, f"vf{tag}b", f"{FAR_B}/24", far, f"vf{tag}c", f"{FAR_C}/24")
    b.run("sysctl", "-qw", "net.ipv4.ip_forward=1")  # b's namespace only
    far.ip("route", "add", "10.201.0.0/16", "via", FAR_B)
    return far


def _wait_listening(ns: Namespace, addr: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run("ss", "-Hltn", "src", f"{addr}:{port}", check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise LabError(f"iperf3 server did not listen on {addr}:{port}")


# -- output ---------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _ratio(ours: float | None, base: float | None) -> float | None:
    return ours / base if ours is not None and base else None


def _rtt_ratio(r: Result, base: Result | None) -> str:
    if base is None or r is base or base.error:
        return "-"
    return _f(_ratio(r.median("ping_ms"), base.median("ping_ms")), ".2f")


def _pair_ratio(r: Result, base: Result | None) -> str:
    if base is None or r is base or base.error:
        return "-"
    up = _ratio(r.median("mbps_a_to_b"), base.median("mbps_a_to_b"))
    down = _ratio(r.median("mbps_b_to_a"), base.median("mbps_b_to_a"))
    return f"{_f(up, '.2f')}/{_f(down, '.2f')}"


def print_table(results: list[Result], seconds: float, rounds: int, congestion: str,
                split: str = "", forward: bool = False) -> None:
    print(f"\nMedians of {rounds} rounds: iperf3 one TCP stream {seconds:g} s each way "
          f"(congestion control {congestion}); ping {PING_SLICES}x{PING_COUNT} a round at "
          f"-i {PING_INTERVAL:g}, the cases in turn: median (p50) and mean of every reply; "
          "veth MTU 1500; RSS after the last round.\n"
          + (f"Each side on its own CPUs ({split}).\n" if split else "")
          + ("iperf3 between a and a third namespace c behind b (veth MTU 1500), b "
             "forwarding: the parent's NAT case; ping a to b.\n" if forward else "") +
          "x seed / x wg-go: this row's a->b/b->a over the seed's (tcp) or wireguard-go's "
          "(udp) at the same MTU; rtt x seed: its ping p50 over the seed's. Shared, noisy "
          "machine: read the ratios.\n")
    head = (f"{'tunnel':<22}{'MTU':>6}{'a->b Mbit/s':>12}{'b->a Mbit/s':>12}{'p50 ms':>8}"
            f"{'mean ms':>8}{'RSS MiB a/b':>13}{'x seed':>12}{'x wg-go':>12}"
            f"{'rtt x seed':>11}")
    print(head)
    print("-" * len(head))
    by = {(r.key, r.mtu): r for r in results}
    for r in results:
        if r.error or not r.mbps_a_to_b:
            print(f"{r.label:<22}{r.mtu:>6}  FAILED: {r.error or 'every round failed'}")
            continue
        rss = f"{_mib(r.rss_kib_a)}/{_mib(r.rss_kib_b)}"
        print(f"{r.label:<22}{r.mtu:>6}{_f(r.median('mbps_a_to_b'), '.0f'):>12}"
              f"{_f(r.median('mbps_b_to_a'), '.0f'):>12}{_f(r.median('ping_ms'), '.3f'):>8}"
              f"{_f(r.ping_mean(), '.3f'):>8}"
              f"{rss:>13}{_pair_ratio(r, by.get((SEED, r.mtu))):>12}"
              f"{_pair_ratio(r, by.get((WGGO, r.mtu))):>12}"
              f"{_rtt_ratio(r, by.get((SEED, r.mtu))):>11}")
    for r in results:
        lost = [f"{r.pings_lost} pings got no reply"] if r.pings_lost else []
        for note in [*lost, *r.notes]:
            print(f"  note ({r.label}, MTU {r.mtu}): {note}")


def _cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def _default_congestion() -> str:
    """The congestion control a new TCP socket gets here (new namespaces copy the host's)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 time per direction")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per case and MTU (median)")
    ap.add_argument("--mtu", type=int, action="append", help=f"tunnel MTU (default {MTUS})")
    ap.add_argument("--case", action="append", choices=[c.key for c in CASES],
                    help="only these cases (default all)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    ap.add_argument("--forward", action="store_true",
                    help="iperf3 to a third namespace behind b (veth MTU 1500), which b "
                         "forwards to through each tunnel, as a parent forwards its "
                         "enclave's traffic: the far end's MSS (1460) is below the tunnel's")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run our cases with the wgvsock package from this checkout "
                         "(PYTHONPATH) and its venv's interpreter, interleaved with the rest: "
                         "before/after in one run")
    ap.add_argument("--profile", metavar="DIR",
                    help="record each of our daemons with py-spy (pip install -e '.[bench]') "
                         "during the last round's iperf3 runs; raw stacks go to DIR, and "
                         "bench/spy_top.py sums them")
    ap.add_argument("--congestion", metavar="ALG",
                    help="the tunnelled iperf3 streams' TCP congestion control (iperf3 -C, "
                         "both ends); default: the machine's, which the table names. The seed-"
                         "fed row moves with it (bench/README.md, twenty-fourth round)")
    ap.add_argument("--split-cores", action="store_true",
                    help="confine side a (its daemons and iperf3 end) to the first half of "
                         "the CPUs and side b to the second, as parent and enclave have "
                         "CPUs of their own; default: everything shares every CPU")
    args = ap.parse_args()
    if reason := preflight("network namespaces, TUN", TOOLS):
        print(f"tunnel_bench: {reason}", file=sys.stderr)
        return 2
    cases = [c for c in CASES if c.key in args.case] if args.case else \
        [c for c in CASES if not c.calibration]
    if args.baseline:
        cases += [c for c in baseline_cases(cases, args.baseline) if c.network != "unix"]
    mtus = args.mtu or list(MTUS)
    profile = Path(args.profile) if args.profile else None
    if profile is not None:
        if not Path(sys.executable).with_name("py-spy").exists():
            print("tunnel_bench: --profile needs py-spy: pip install -e '.[bench]'",
                  file=sys.stderr)
            return 2
        profile.mkdir(parents=True, exist_ok=True)

    results: list[Result] = []
    iperf_args: tuple[str, ...] = ("-C", args.congestion) if args.congestion else ()
    congestion = args.congestion or _default_congestion()
    split = ""
    if args.split_cores:
        try:
            cpus_a, cpus_b = split_cores()
        except LabError as e:
            print(f"tunnel_bench: {e}", file=sys.stderr)
            return 2
        split = f"a: CPU {_cpus(cpus_a)}, b: CPU {_cpus(cpus_b)}"
        # iperf3 takes one CPU a side: -A client,server.
        iperf_args += ("-A", f"{min(cpus_a)},{min(cpus_b)}")

    def bench(lab: Lab) -> int:
        nonlocal cases
        seed, why = seed_binary(lab.tmp)
        if seed is None:
            print(f"tunnel_bench: {why}; the seed's rows are left out", file=sys.stderr)
            cases = [c for c in cases if "seed" not in (c.impl_a, c.impl_b)]
        tag = f"{os.getpid() % 100000}"
        a, b = lab.netns(f"wgbench{tag}a"), lab.netns(f"wgbench{tag}b")
        lab.veth(a, f"vb{tag}a", f"{VETH_A}/24", b, f"vb{tag}b", f"{VETH_B}/24")
        far = None
        if args.forward:
            far = lab.netns(f"wgbench{tag}c")
            lab.veth(b, f"vf{tag}b", f"{FAR_B}/24", far, f"vf{tag}c", f"{FAR_C}/24")
            b.run("sysctl", "-qw", "net.ipv4.ip_forward=1")  # b's namespace only
            far.ip("route", "add", "10.201.0.0/16", "via", FAR_B)
        # Per MTU, every case is up at once and the rounds go round the cases, so that
        # each case sees the same mix of load from whatever else shares the machine.
        for mtu in mtus:
            print(f"MTU {mtu}: starting {len(cases)} tunnels ...", flush=True)
            tunnels = [bring_up(lab, a, b, c, mtu, i, seed, args.forward)
                       for i, c in enumerate(cases)]
            try:
                if args.split_cores:
                    for t in tunnels:
                        pin_sides(t, cpus_a, cpus_b)
                for n in range(args.rounds):
                    print(f"  MTU {mtu} round {n + 1}/{args.rounds}: ping", flush=True)
                    ping_round(a, tunnels, n)
                    for i, t in enumerate(tunnels):
                        print(f"  MTU {mtu} round {n + 1}/{args.rounds}: {t.case.label}",
                              flush=True)
                        last = n == args.rounds - 1
                        measure(a, b, t, i, args.seconds, profile if last else None,
                                iperf_args, far)
            finally:
                for t in tunnels:
                    tear_down(lab, a, b, t)
                    results.append(t.result)
        return 0

    if code := run_in_lab("tunnel_bench", "wgvsock-bench-", bench):
        return code
    print_table(results, args.seconds, args.rounds, congestion, split, args.forward)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": args.seconds, "rounds": args.rounds, "mtus": mtus,
                       "congestion": congestion, "split_cores": split or None,
                       "forward": args.forward,
                       "ping_count": PING_COUNT, "ping_slices": PING_SLICES,
                       "ping_interval": PING_INTERVAL,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 1 if any(r.error or not r.mbps_a_to_b for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
