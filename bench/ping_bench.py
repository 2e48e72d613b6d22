"""Round-trip time through tunnels side by side, with many more pings than tunnel_bench.py.

Run as root: .venv/bin/python bench/ping_bench.py [--case KEY ...] [--baseline DIR] [--mtu M]
             [--cycles N] [--count C] [--interval S]

The cases (tunnel_bench.py's keys; default ours-tcp and seed-tcp) are all up at once on one veth.
Each cycle pings through every case in turn (C pings at -i S; the order flips every cycle), so
they share whatever load the machine has; the table gives each case's median and 90th percentile
over all pings and its median over the last case's. `--baseline DIR` adds our cases once more
with the wgvsock package and the venv's interpreter of another checkout: before/after in one run.

Why a separate tool: a ping's time here depends on how long the daemons sat idle before it (each
pass through Python runs slower the colder the CPU's caches are: bench/README.md), and on what
else the two cores do; tunnel_bench.py's 200 pings per round and case cannot tell a 10 % change
from noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import tunnel_bench as tb

from wgvsock.ui.nslab import Lab, preflight, run_in_lab


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tb.add_compare_options(ap, mtu=1420, cycles=10)
    ap.add_argument("--count", type=int, default=100, help="pings per case and cycle")
    ap.add_argument("--interval", type=float, default=0.01, help="ping -i (seconds)")
    args = ap.parse_args()
    if reason := preflight("network namespaces, TUN", tb.TOOLS):
        print(f"ping_bench: {reason}", file=sys.stderr)
        return 2
    cases = tb.compared_cases(args)
    times: dict[str, list[float]] = {c.label: [] for c in cases}

    def bench(lab: Lab) -> int:
        with tb.tunnels_up(lab, cases, args.mtu, "ping") as (a, _, tunnels):
            for cycle in range(args.cycles):
                for t in tunnels if cycle % 2 == 0 else tunnels[::-1]:
                    res = a.run("ping", "-c", str(args.count), "-i", str(args.interval),
                                t.tun_b, check=False)
                    times[t.case.label] += tb.ping_times(res.stdout)
        return 0

    if code := run_in_lab("ping_bench", "wgvsock-ping-", bench):
        return code
    print(f"MTU {args.mtu}: {args.cycles} cycles of {args.count} pings at -i {args.interval:g}, "
          f"cases in turn; ms")
    print(f"{'tunnel':<30}{'pings':>7}{'p50':>8}{'p90':>8}{'x ' + cases[-1].label:>18}")
    ref = statistics.median(times[cases[-1].label] or [float("nan")])
    for label, v in times.items():
        if not v:
            print(f"{label:<30}{0:>7}  (no replies)")
            continue
        v.sort()
        p50, p90 = statistics.median(v), v[int(0.9 * (len(v) - 1))]
        print(f"{label:<30}{len(v):>7}{p50:>8.3f}{p90:>8.3f}{p50 / ref:>18.2f}")
    return 0 if all(times.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
