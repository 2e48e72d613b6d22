"""`make fuzz`: every target at full count across processes; prints counts, rates, findings.

    .venv/bin/python -m fuzz [--seed N] [--targets core,profile] [--scale 0.1] [--jobs 2]
    .venv/bin/python -m fuzz --replay build/fuzz/core-s1-3-1234.crash

Exit status 1 if anything crashed or hung. A crash or hang writes the input to OUT (default
build/fuzz) with a .txt beside it holding the traceback; --replay re-runs that input's shard up
to it, which reproduces the state the input met, and prints the failure again.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .harness import ShardResult, run_shard
from .targets import all_targets

DEFAULT_SEED = 1
DEFAULT_OUT = Path("build/fuzz")
SHARD_TIMEOUT = 900.0  # a shard that runs this long is stuck inside C code: a hang
_FINDING = re.compile(r"(?P<target>.+)-s(?P<seed>\d+)-(?P<shard>\d+)-(?P<index>\d+)\.(crash|hang)$")


def _work(spec: tuple[str, int, int, int, float, str]) -> ShardResult:
    name, seed, shard, count, limit, out = spec
    workdir = Path(tempfile.mkdtemp(prefix=f"wgvsock-fuzz-{name}-"))
    try:
        return run_shard(all_targets()[name], seed, shard, count, time_limit=limit,
                         out_dir=Path(out), workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def plan(names: list[str], seed: int, scale: float, limit: float,
         out: Path) -> list[tuple[str, int, int, int, float, str]]:
    specs = []
    targets = all_targets()
    for name in names:
        cls = targets[name]
        total = max(1, round(cls.count * scale))
        shards = math.ceil(total / cls.shard_size)
        for k in range(shards):
            n = total // shards + (k < total % shards)
            specs.append((name, seed, k, n, limit, str(out)))
    return specs


def _row(*cells: object) -> str:
    widths = (16, 11, 9, 8, 6, 8, 10)
    text = [f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths,
                                                                                   strict=False))]
    return " ".join(text + [str(c) for c in cells[len(widths):]])


def report(names: list[str], results: list[ShardResult], out: Path, wall: float) -> int:
    print(_row("target", "inputs", "refused", "crashes", "hangs", "cpu s", "per cpu s",
               "slowest input (wall clock)"))
    findings = []
    total = 0
    for name in names:
        mine = [r for r in results if r.target == name]
        inputs = sum(r.inputs for r in mine)
        total += inputs
        cpu = sum(r.cpu_seconds for r in mine)
        crashes = sum(f.kind == "crash" for r in mine for f in r.findings)
        hangs = sum(f.kind == "hang" for r in mine for f in r.findings)
        findings += [f for r in mine for f in r.findings]
        slow = max(mine, key=lambda r: r.slowest, default=None)
        slowest = ""
        if slow is not None:
            path = out / f"{name}-s{slow.seed}.slowest"
            out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(slow.slowest_data)
            slowest = f"{slow.slowest * 1000:.1f} ms ({slow.slowest_kind}) {path}"
        rate = f"{inputs / cpu:,.0f}" if cpu else "-"
        print(_row(name, f"{inputs:,}", f"{sum(r.rejected for r in mine):,}", crashes, hangs,
                   f"{cpu:.1f}", rate, slowest))
        kinds: dict[str, int] = {}
        for r in mine:
            for k, v in r.kinds.items():
                kinds[k] = kinds.get(k, 0) + v
        print("    " + ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items())))
    print(f"wall time {wall:.1f} s, {total:,} inputs, {total / wall:,.0f} inputs/s overall "
          f"(load average {os.getloadavg()[0]:.1f})")
    if not findings:
        print("crashes: 0, hangs: 0")
        return 0
    for f in findings:
        print(f"{f.kind.upper()} ({f.input_kind}, input {f.index}): {f.summary}\n    {f.path}")
    return 1


def replay(path: Path, limit: float) -> int:
    m = _FINDING.search(path.name)
    if not m:
        print(f"{path}: not a crash or hang file (TARGET-sSEED-SHARD-INDEX.crash)",
              file=sys.stderr)
        return 2
    name, seed, shard, index = m["target"], int(m["seed"]), int(m["shard"]), int(m["index"])
    out = Path(tempfile.mkdtemp(prefix="wgvsock-fuzz-replay-"))
    try:
        result = _work((name, seed, shard, index + 1, limit, str(out)))
        for f in result.findings:
            if f.index == index:
                print(Path(f.path).with_suffix(Path(f.path).suffix + ".txt").read_text())
                return 1
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{name} input {index} of shard {shard} (seed {seed}) no longer fails")
    return 0


def main(argv: list[str] | None = None) -> int:
    names = list(all_targets())
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--seed", default=os.environ.get("FUZZ_SEED", str(DEFAULT_SEED)),
                   help="an integer, or 'random' (default FUZZ_SEED or 1)")
    p.add_argument("--targets", default=",".join(names), help=f"comma list of: {', '.join(names)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every target's count")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    # Far above the slowest input seen (~0.1 s alone, ~1.5 s on a loaded machine), so that only
    # a real hang trips it.
    p.add_argument("--time-limit", type=float, default=5.0, help="seconds per input")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--replay", type=Path, help="re-run a .crash or .hang file")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.time_limit)
    seed = int.from_bytes(os.urandom(4), "big") if args.seed == "random" else int(args.seed)
    chosen = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"unknown target {unknown[0]!r}; choose from {', '.join(names)}")
    specs = plan(chosen, seed, args.scale, args.time_limit, args.out)
    print(f"wgvsock fuzz: seed {seed} (rerun with --seed {seed}), {args.jobs} processes, "
          f"{len(specs)} shards, time limit {args.time_limit:g} s per input, output {args.out}",
          flush=True)
    start = time.monotonic()
    results: list[ShardResult] = []
    # A fresh process per shard: no thread or socket of one shard outlives it.
    with multiprocessing.Pool(args.jobs, maxtasksperchild=1) as pool:
        pending = pool.imap_unordered(_work, specs)
        for _ in specs:
            try:
                r = pending.next(timeout=SHARD_TIMEOUT)
            except multiprocessing.TimeoutError:
                done = {(r.target, r.shard) for r in results}
                stuck = [f"{n} shard {k}" for n, _, k, *_ in specs if (n, k) not in done]
                print(f"HANG: no shard finished for {SHARD_TIMEOUT:.0f} s; still running: "
                      f"{', '.join(stuck)}", flush=True)
                pool.terminate()
                return 1
            results.append(r)
            print(f"  {r.target} shard {r.shard}: {r.inputs:,} inputs in {r.seconds:.1f} s"
                  + (f", {len(r.findings)} FINDINGS" if r.findings else ""), flush=True)
    return report(chosen, results, args.out, time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
