"""The fuzzing loop: one shard of one target, with a crash file per crash and a hang watchdog.

A target is a class (see `Target`) that builds its fixture from a seeded `random.Random`,
makes inputs as bytes, and feeds one to the code under test. Raising one of `allowed` is the
documented way to refuse an input; any other exception, a failed oracle (AssertionError) or an
input that runs past the time limit counts against the code under test.

A shard is deterministic: its random stream comes from (seed, target, shard) alone.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

MAX_CRASHES_PER_SHARD = 10


class Hang(BaseException):
    """Raised by the watchdog in the fuzzing thread when one input runs too long."""


class Target:
    """Base of every fuzz target; subclasses fill in the class attributes and three methods."""

    name: ClassVar[str]
    count: ClassVar[int]  # inputs in a full `make fuzz`
    shard_size: ClassVar[int] = 5_000
    allowed: ClassVar[tuple[type[BaseException], ...]] = ()
    rebuild_every: ClassVar[int] = 0  # build a fresh fixture every N inputs (0: never)

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        self.workdir = workdir

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        """(kind, input): the kind labels the generator, for the counts."""
        raise NotImplementedError

    def run(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class Finding:
    kind: str  # "crash" or "hang"
    input_kind: str
    index: int
    summary: str
    path: str


@dataclass
class ShardResult:
    target: str
    shard: int
    seed: int
    inputs: int = 0
    rejected: int = 0  # inputs refused with a documented error type
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time, threads included: fair on a busy machine
    kinds: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    slowest: float = 0.0
    slowest_kind: str = ""
    slowest_data: bytes = b""


class _Watchdog:
    """SIGALRM every `limit` seconds; the second tick seeing the same input raises Hang, so a
    hang is reported after between `limit` and 2x`limit` of running."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.ticket = 0
        self.seen = -1
        self.armed = False

    def _tick(self, _signum: int, _frame: object) -> None:
        if self.armed and self.ticket == self.seen:
            self.seen = -1
            raise Hang(f"input still running after {self.limit:g} s")
        self.seen = self.ticket

    def __enter__(self) -> _Watchdog:
        self._old = signal.signal(signal.SIGALRM, self._tick)
        signal.setitimer(signal.ITIMER_REAL, self.limit, self.limit)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self._old)


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    """Keeps a module's warnings about every bad input off the terminal during a shard."""
    log = logging.getLogger(name)
    old = log.propagate, log.level
    log.propagate, log.level = False, logging.CRITICAL
    try:
        yield
    finally:
        log.propagate, log.level = old


def shard_rng(seed: int, target: str, shard: int) -> random.Random:
    # A str seed goes through SHA-512, so neighbouring shards share nothing.
    return random.Random(f"{seed}:{target}:{shard}")


def finding_path(out_dir: Path, target: str, seed: int, shard: int, index: int, kind: str) -> Path:
    return out_dir / f"{target}-s{seed}-{shard}-{index}.{kind}"


def _record(out_dir: Path, result: ShardResult, kind: str, input_kind: str, index: int,
            data: bytes, exc: BaseException) -> None:
    path = finding_path(out_dir, result.target, result.seed, result.shard, index, kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    tb = "".join(traceback.format_exception(exc))
    path.with_suffix(path.suffix + ".txt").write_text(
        f"target {result.target}, seed {result.seed}, shard {result.shard}, input {index} "
        f"({input_kind})\nreplay: .venv/bin/python -m fuzz --replay {path}\n\n{tb}"
    )
    summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    result.findings.append(Finding(kind, input_kind, index, summary, str(path)))


def run_shard(cls: type[Target], seed: int, shard: int, count: int, *, time_limit: float,
              out_dir: Path, workdir: Path) -> ShardResult:
    """Feed `count` inputs from shard `shard` of `cls` and return what happened."""
    rng = shard_rng(seed, cls.name, shard)
    result = ShardResult(cls.name, shard, seed)
    allowed = cls.allowed
    fixture = cls(rng, workdir)
    watchdog = _Watchdog(time_limit)
    clock = time.perf_counter
    start = clock()
    cpu_start = time.process_time()
    try:
        with watchdog:
            for index in range(count):
                if cls.rebuild_every and index and index % cls.rebuild_every == 0:
                    fixture.close()
                    fixture = cls(rng, workdir)
                kind, data = fixture.generate(rng)
                result.kinds[kind] += 1
                watchdog.ticket = index
                t0 = clock()
                failure: tuple[str, BaseException] | None = None
                watchdog.armed = True
                try:
                    fixture.run(data)
                except allowed:
                    result.rejected += 1
                except Hang as e:
                    failure = ("hang", e)
                except Exception as e:
                    failure = ("crash", e)
                finally:
                    watchdog.armed = False
                dt = clock() - t0
                if failure is None and dt > time_limit:
                    # Slow inside C code, where the watchdog's signal had to wait.
                    failure = ("hang", Hang(f"input took {dt:.2f} s"))
                if dt > result.slowest:
                    result.slowest, result.slowest_kind, result.slowest_data = dt, kind, data
                if failure is not None:
                    _record(out_dir, result, failure[0], kind, index, data, failure[1])
                    # Whatever state the failure left behind must not taint the next inputs.
                    fixture.close()
                    fixture = cls(rng, workdir)
                    if len(result.findings) >= MAX_CRASHES_PER_SHARD:
                        result.inputs = index + 1
                        break
                result.inputs = index + 1
    finally:
        fixture.close()
        result.seconds = clock() - start
        result.cpu_seconds = time.process_time() - cpu_start
    return result
