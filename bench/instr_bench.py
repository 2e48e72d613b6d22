"""Instructions per packet through our daemon's data path, counted by callgrind.

Run as root: .venv/bin/python bench/instr_bench.py [--peer seed|ours|ours-nooffload]
             [--rate 4M] [--seconds 4] [--mtu 1420] [--reverse] [--baseline DIR] [--runs 2]

Throughput and CPU time on a shared 2-core machine scatter by 5-10 % from run to run, more
than most single changes to the per-packet path gain. An instruction count does not depend on
what else the machine is doing: this counts, with valgrind's callgrind, the instructions our
daemon executes per packet, which repeats within 1-4 % (batching varies a little).

Our daemon runs on side a of two namespaces joined by a veth, in the foreground under
callgrind; the peer (the Go seed over TCP, or our daemon with or without offload) runs on side
b as usual. After a ping has brought the tunnel up, the counters are zeroed and iperf3 sends
one TCP stream at a fixed rate that the daemon keeps up with under valgrind (a->b, or b->a
with --reverse); then they are dumped. Two figures come out, each inclusive of everything the
code calls (the AEAD included, the kernel's side of system calls not):
- per packet sent: Device._tun_pass (read from the TUN, seal, frame, send) over the packets
  the TUN handed to the daemon;
- per packet received: StreamBind._deliver (open, write to the TUN) over the packets the
  daemon wrote to its TUN.
A TCP stream sends data one way and ACKs the other, so a->b measures data sent and ACKs
received. The counts are of the compiled build (`make compile`): pure Python has no such
functions to count in. `--baseline DIR` runs the same with the wgvsock package of another
checkout (compiled there) and its venv's interpreter, for before/after. The figures depend a
little on batching (how many packets one pass finds queued), so compare runs at the same rate.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import tunnel_bench as tb

from wgvsock.ui.nslab import (
    RUN_DIR,
    Keys,
    Lab,
    LabError,
    Namespace,
    preflight,
    run_in_lab,
    seed_binary,
)

# Where the counting starts: everything these call is counted, nothing else.
SEND = "CPyDef_device___Device____tun_pass"
RECEIVE = "CPyDef_stream___StreamBind____deliver"
# Packets are counted as the engine's calls: one per message sealed or opened (a merged TUN
# write counts once in the interface's counters, however many packets it carried).
SEAL = "CPyDef_engine___Engine___encapsulate"
OPEN = "CPyDef_engine___Engine___decapsulate"
TOOLS = ("ip", "iperf3", "ping", "valgrind", "callgrind_control", "callgrind_annotate")


def _tun_packets(ns: Namespace, ifname: str) -> tuple[int, int]:
    stats = f"/sys/class/net/{ifname}/statistics"
    out = ns.run("cat", f"{stats}/tx_packets", f"{stats}/rx_packets").stdout.split()
    return int(out[0]), int(out[1])


def _counts(dump: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Each counted function's instructions (its callees included), and how often each of
    the engine's entry points was called (summed over their callers)."""
    text = subprocess.run(["callgrind_annotate", "--tree=caller", "--inclusive=yes",
                           "--threshold=100", str(dump)],
                          check=True, capture_output=True, text=True).stdout
    cost: dict[str, int] = {}
    calls: dict[str, int] = {}
    callers: list[int] = []
    for line in text.splitlines():
        if " < " in line and (m := re.search(r"\(([\d,]+)x\)", line)):
            callers.append(int(m.group(1).replace(",", "")))
            continue
        if " * " in line:
            for name in (SEND, RECEIVE):
                if f":{name} " in line:
                    cost[name] = int(line.split()[0].replace(",", ""))
            for name in (SEAL, OPEN):
                if f":{name} " in line:
                    calls[name] = sum(callers)
        callers = []
    return cost, calls


def measure(lab: Lab, args: argparse.Namespace, seed: Path | None, base: str | None,
            n: int) -> dict[str, float]:
    tag = f"{os.getpid() % 10000}{n}"
    a, b = lab.netns(f"wgib{tag}a"), lab.netns(f"wgib{tag}b")
    lab.veth(a, f"vib{tag}a", f"{tb.VETH_A}/24", b, f"vib{tag}b", f"{tb.VETH_B}/24")
    if_a, if_b = f"wgib{tag}a", f"wgib{tag}b"
    out = lab.tmp / f"callgrind-{tag}.out"
    env = dict(os.environ, WGVSOCK_UNIX_DIR=str(lab.unix_dir), LOG_LEVEL="error",
               PYTHONHASHSEED="0")
    python = sys.executable
    if base:
        env["PYTHONPATH"] = base
        python = tb.baseline_python(base)
    lab.ifnames.append(if_a)
    daemon = a.popen("valgrind", "--tool=callgrind", "--collect-atstart=no",
                     f"--toggle-collect={SEND}", f"--toggle-collect={RECEIVE}",
                     f"--callgrind-out-file={out}", python, "-m", "wgvsock.daemon",
                     "-f", "-n", "tcp", if_a, env=env, cwd=base)
    peer_pid: int | None = None
    try:
        sock = Path(f"{RUN_DIR}/{if_a}.sock")
        deadline = time.monotonic() + 120
        while not sock.exists():  # a Python start under valgrind takes a while
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise LabError("our daemon did not start under valgrind")
            time.sleep(0.2)
        if args.peer == "seed":
            assert seed is not None
            peer_pid = lab.start_seed(b, if_b, seed)
        else:
            extra = tb.OFFLOAD_OFF if args.peer == "ours-nooffload" else {}
            peer_pid = lab.start_ours(b, if_b, "tcp", **extra)
        ka, kb = Keys(), Keys()
        # Under valgrind the daemon answers its first request slowly (a busy machine once
        # took more than the usual 2 s).
        lab.configure(if_a, ka, kb, "10.202.0.2/32", listen_port=51100,
                      endpoint=f"{tb.VETH_B}:51101", timeout=60)
        lab.configure(if_b, kb, ka, "10.202.0.1/32", listen_port=51101)
        lab.address(a, if_a, "10.202.0.1/24", args.mtu)
        lab.address(b, if_b, "10.202.0.2/24", args.mtu)
        tb.wait_ping(a, "10.202.0.2", timeout=60)
        # The handshake and the daemon's start are not what is measured.
        subprocess.run(["callgrind_control", "--zero", str(daemon.pid)], check=True,
                       capture_output=True)
        tx0, rx0 = _tun_packets(a, if_a)
        data = tb.iperf_json(a, b, "10.202.0.2", tb.IPERF_PORT, args.seconds, args.reverse,
                             "-b", args.rate)
        tx1, rx1 = _tun_packets(a, if_a)
        subprocess.run(["callgrind_control", "--dump", str(daemon.pid)], check=True,
                       capture_output=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        if peer_pid is not None:
            lab.stop_interface(b, if_b, peer_pid)
    # The explicit dump is the first part file; the one written at exit is left alone.
    [dump] = [p for p in lab.tmp.glob(f"{out.name}.*") if p.suffix == ".1"]
    cost, calls = _counts(dump)
    sent, received = calls.get(SEAL, 0), calls.get(OPEN, 0)
    return {
        "mbps": data["end"]["sum_received"]["bits_per_second"] / 1e6,
        "sent": sent, "received": received, "tun_reads": tx1 - tx0, "tun_writes": rx1 - rx0,
        "per_sent": cost.get(SEND, 0) / max(sent, 1),
        "per_received": cost.get(RECEIVE, 0) / max(received, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=("seed", "ours", "ours-nooffload"), default="seed")
    ap.add_argument("--rate", default="4M",
                    help="iperf3 -b (default 4M, which our daemon keeps up with under valgrind)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--mtu", type=int, default=1420)
    ap.add_argument("--reverse", action="store_true", help="b->a: data received, ACKs sent")
    ap.add_argument("--runs", type=int, default=2, help="runs of each build (default 2)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run with the wgvsock package of this checkout (compiled)")
    args = ap.parse_args()
    if reason := preflight("network namespaces, TUN", TOOLS):
        print(f"instr_bench: {reason}", file=sys.stderr)
        return 2
    builds: list[tuple[str, str | None]] = [("ours", None)]
    if args.baseline:
        builds.insert(0, ("ours (before)", str(Path(args.baseline).resolve())))

    def body(lab: Lab) -> int:
        seed, why = seed_binary(lab.tmp)
        if args.peer == "seed" and seed is None:
            raise LabError(why)
        direction = "b->a" if args.reverse else "a->b"
        print(f"{args.peer} peer, MTU {args.mtu}, iperf3 -b {args.rate} {direction} for "
              f"{args.seconds:g} s; instructions per packet (callgrind)")
        print(f"{'build':<16}{'run':>4}{'Mbit/s':>8}{'sent':>7}{'received':>9}"
              f"{'TUN r/w':>12}{'per sent':>10}{'per received':>14}")
        n = 0
        for _ in range(args.runs):
            for label, base in builds:
                r = measure(lab, args, seed, base, n)
                n += 1
                rw = f"{r['tun_reads']}/{r['tun_writes']}"
                print(f"{label:<16}{n:>4}{r['mbps']:>8.1f}{r['sent']:>7}{r['received']:>9}"
                      f"{rw:>12}{r['per_sent']:>10.0f}{r['per_received']:>14.0f}", flush=True)
        return 0

    return run_in_lab("instr_bench", "wgib", body)


if __name__ == "__main__":
    sys.exit(main())
