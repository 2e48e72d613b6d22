"""CPU per megabyte of the tunnel daemons at a fixed rate, cases side by side.

Run as root: .venv/bin/python bench/cpu_bench.py [--case KEY ...] [--baseline DIR] [--mtu M]
             [--rate R] [--cycles N] [--seconds S] [--forward]

The cases (tunnel_bench.py's keys; default ours-tcp and seed-tcp) are all up at once on one veth.
Each cycle runs iperf3 with one TCP stream at a fixed rate (-b R) through every case in turn,
a->b and b->a (the order flips every cycle). Around each run the daemons' CPU time is read from
/proc/PID/task/*/schedstat and the machine's from /proc/stat. The table gives medians over the
cycles: the rate reached, both daemons' CPU microseconds per megabyte moved (and each one's, a
and b: which end costs more), the busiest daemon thread's share of a core, the machine's idle
share, how often each daemon's threads blocked per MB (voluntary context switches: each one a
wake-up, which a stream that arrives in many small bursts multiplies), how long each daemon's
threads were runnable but waiting for a CPU (summed over its threads, as a share of the run:
near 100 % less the busiest share means that thread is the stage everything waits for), and
CPU per MB over the last case's.

Why a separate tool: tunnel_bench.py measures throughput at the limit, where on two shared cores
a 5 % change is lost in noise and the figure mixes what our code costs with how its threads and
the kernel's wake-ups line up. At a rate every case reaches, CPU per byte is what a change to
the per-packet path moves, and the busiest thread's share tells whether one thread is the limit.
`--baseline DIR` adds our cases once more with the wgvsock package and the venv's interpreter of
another checkout.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from dataclasses import dataclass, field

import tunnel_bench as tb

from wgvsock.ui.nslab import Lab, LabError, Namespace, preflight, run_in_lab


def _tasks(pid: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Per thread of `pid`, nanoseconds on a CPU and runnable but waiting for one so far;
    and how often its threads have blocked so far (voluntary context switches: each is a
    wake-up to pay for when work comes in bursts); one walk of /proc/PID/task."""
    cpu: dict[str, tuple[int, int]] = {}
    sleeps = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/schedstat") as f:
                on_cpu, waiting = (int(x) for x in f.read().split()[:2])
            with open(f"{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        sleeps += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended in between
        cpu[task.rsplit("/", 1)[1]] = on_cpu, waiting
    return cpu, sleeps


def _machine() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


@dataclass
class Row:
    label: str
    mbps: list[float] = field(default_factory=list)
    us_per_mb: list[float] = field(default_factory=list)
    us_a: list[float] = field(default_factory=list)
    us_b: list[float] = field(default_factory=list)
    busiest: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)
    sleeps_a: list[float] = field(default_factory=list)
    sleeps_b: list[float] = field(default_factory=list)
    queued_a: list[float] = field(default_factory=list)
    queued_b: list[float] = field(default_factory=list)


def _pair(a: list[float], b: list[float]) -> str:
    """Medians of the a and b sides, or "-" when a side has no figure (a relay's)."""
    if not a or not b:
        return "-"
    return f"{statistics.median(a):.0f} / {statistics.median(b):.0f}"


def run_once(a: Namespace, b: Namespace, t: tb.Tunnel, port: int, rate: str,
             seconds: float, reverse: bool, row: Row, far: Namespace | None = None) -> None:
    pids = [p for p in t.pids.values() if p is not None]
    server, addr = (b, t.tun_b) if far is None else (far, tb.FAR_C)
    if far is not None:
        a.ip("route", "replace", tb.FAR_NET, "dev", t.if_a)
    before = {p: _tasks(p) for p in pids}
    m0 = _machine()
    data = tb.iperf_json(a, server, addr, port, seconds, reverse, "-b", rate)
    m1 = _machine()
    after = {p: _tasks(p) for p in pids}
    moved = data["end"]["sum_received"]["bytes"]
    wall = data["end"]["sum_received"]["seconds"]
    if moved <= 0 or wall <= 0:
        raise LabError(f"{t.case.label}: iperf3 moved nothing through the tunnel")
    used = {(p, tid): ns - before[p][0].get(tid, (0, 0))[0]
            for p in pids for tid, (ns, _) in after[p][0].items()}
    queued = {p: sum(w - before[p][0].get(tid, (0, 0))[1]
                     for tid, (_, w) in after[p][0].items()) for p in pids}
    ticks = [y - x for x, y in zip(m0, m1, strict=True)]
    row.mbps.append(moved * 8 / wall / 1e6)
    row.us_per_mb.append(sum(used.values()) / 1e3 / (moved / 1e6))
    for side, sleeps, waits, ifname in ((row.us_a, row.sleeps_a, row.queued_a, t.if_a),
                                        (row.us_b, row.sleeps_b, row.queued_b, t.if_b)):
        side.append(sum(ns for (p, _), ns in used.items() if p == t.pids[ifname])
                    / 1e3 / (moved / 1e6))
        if (pid := t.pids[ifname]) is not None:
            sleeps.append((after[pid][1] - before[pid][1]) / (moved / 1e6))
            waits.append(100 * queued[pid] / 1e9 / wall)
    row.busiest.append(100 * max(used.values(), default=0) / 1e9 / wall)
    row.idle.append(100 * (ticks[3] + ticks[4]) / sum(ticks))  # idle + iowait


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tb.add_compare_options(ap, mtu=65000, cycles=4)
    ap.add_argument("--rate", default="3G",
                    help="iperf3 -b: a rate every case reaches (default 3G)")
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 time per run")
    ap.add_argument("--forward", action="store_true",
                    help="iperf3 between a and a third namespace behind b, which forwards "
                         "(tunnel_bench.py --forward's case)")
    args = ap.parse_args()
    if reason := preflight("network namespaces, TUN", tb.TOOLS):
        print(f"cpu_bench: {reason}", file=sys.stderr)
        return 2
    cases = tb.compared_cases(args)
    rows = {(c.label, d): Row(c.label) for c in cases for d in ("a->b", "b->a")}

    def bench(lab: Lab) -> int:
        with tb.tunnels_up(lab, cases, args.mtu, "cpu", args.forward) as (a, b, tunnels):
            if failed := [f"{t.case.label}: {t.result.error}" for t in tunnels if t.result.error]:
                raise LabError("; ".join(failed))
            far = tb.far_side(lab, b, "cpu") if args.forward else None
            order = list(enumerate(tunnels))
            for cycle in range(args.cycles):
                for i, t in order if cycle % 2 == 0 else order[::-1]:
                    port = tb.IPERF_PORT + 2 * i
                    for reverse, d in ((False, "a->b"), (True, "b->a")):
                        run_once(a, b, t, port + reverse, args.rate, args.seconds, reverse,
                                 rows[t.case.label, d], far)
        return 0

    if code := run_in_lab("cpu_bench", "wgvsock-cpu-", bench):
        return code
    print(f"MTU {args.mtu}: {args.cycles} cycles of iperf3 -b {args.rate} for {args.seconds:g} s "
          f"each way, cases in turn; medians"
          + ("; a to a third namespace behind b, which forwards" if args.forward else ""))
    print(f"{'tunnel':<30}{'dir':>5}{'Mbit/s':>8}{'CPU us/MB':>11}{'a / b':>14}{'busiest %':>11}"
          f"{'idle %':>8}{'sleeps/MB a / b':>17}{'queued % a / b':>16}{'x ' + cases[-1].label:>18}")
    for (label, d), row in rows.items():
        ref = rows[cases[-1].label, d].us_per_mb
        us = statistics.median(row.us_per_mb)
        print(f"{label:<30}{d:>5}{statistics.median(row.mbps):>8.0f}{us:>11.0f}"
              f"{_pair(row.us_a, row.us_b):>14}{statistics.median(row.busiest):>11.0f}"
              f"{statistics.median(row.idle):>8.0f}{_pair(row.sleeps_a, row.sleeps_b):>17}"
              f"{_pair(row.queued_a, row.queued_b):>16}{us / statistics.median(ref):>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
