"""Sums py-spy raw stacks (`tunnel_bench.py --profile DIR`) into self time per function,
per thread: where each of the daemon's threads spent its samples.

    .venv/bin/python bench/spy_top.py FILE... [--top N]

Blocking system calls are sampled too (py-spy -i): a thread mostly in `poll` or `recv_into`
is waiting, not working.
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({m['file'].rsplit('/', 1)[-1]})"


def summarize(path: str, top: int) -> None:
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            thread = frames[0]
            threads[thread][_short(frames[-1])] += int(count)
    print(f"== {path}")
    for thread, counts in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counts.values())
        print(f"  {thread}: {total} samples")
        for func, n in counts.most_common(top):
            print(f"    {100 * n / total:5.1f}%  {func}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    for path in args.files:
        summarize(path, args.top)


if __name__ == "__main__":
    main()
