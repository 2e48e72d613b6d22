"""The short version of `make fuzz`: every target for a few seconds, and the harness itself.
The bugs the fuzzer found have their regression tests in test_fuzz_regressions.py."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz.harness import Target, run_shard
from fuzz.targets import all_targets

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261130
# Inputs per target in `make test`: a few seconds each on one core.
SHORT = {
    "core": 15_000, "framing": 15_000, "uapi-server": 3_000, "uapi-set": 10_000,
    "uapi-get": 10_000, "control-parent": 2_500, "control-enclave": 8_000, "profile": 400,
    "dns-forwarder": 2_000,
}


def test_every_target_has_a_short_run() -> None:
    assert set(SHORT) == set(all_targets())


@pytest.mark.parametrize("name", list(SHORT))
def test_short_fuzz(name: str, tmp_path: Path) -> None:
    cls = all_targets()[name]
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    result = run_shard(cls, SEED, 0, SHORT[name], time_limit=5.0, out_dir=tmp_path / "out",
                       workdir=work)
    failures = "\n".join(f"{f.kind} {f.summary} ({f.path})" for f in result.findings)
    assert not result.findings, failures
    assert result.inputs == SHORT[name]
    # Every generator of the target got its turn.
    generators = {"core": 10, "framing": 4, "uapi-server": 6, "uapi-set": 4, "uapi-get": 3,
                  "control-parent": 4, "control-enclave": 5, "profile": 5, "dns-forwarder": 5}
    assert len(result.kinds) == generators[name], result.kinds


def test_a_shard_is_deterministic(tmp_path: Path) -> None:
    for name in ("core", "uapi-server", "control-enclave", "profile"):
        cls = all_targets()[name]
        runs = []
        for _ in range(2):
            rng = random.Random(f"{SEED}:{name}:0")
            fixture = cls(rng, tmp_path)
            try:
                runs.append([fixture.generate(rng) for _ in range(50)])
            finally:
                fixture.close()
        assert runs[0] == runs[1], name


# -- the harness ----------------------------------------------------------------------------


class _Buggy(Target):
    name = "buggy"
    count = 10
    allowed = (ValueError,)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        return "n", bytes([rng.randrange(4)])

    def run(self, data: bytes) -> None:
        if data[0] == 0:
            raise ValueError("documented refusal")
        if data[0] == 1:
            raise KeyError("a crash")
        if data[0] == 2:
            while True:  # a hang the watchdog must break
                time.sleep(0.01)


def test_harness_records_crashes_and_hangs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_shard(_Buggy, 7, 3, 12, time_limit=0.1, out_dir=out, workdir=tmp_path)
    assert result.inputs == 12
    kinds = {f.kind for f in result.findings}
    assert kinds == {"crash", "hang"}
    assert result.rejected > 0  # the documented ValueError is not a finding
    for f in result.findings:
        path = Path(f.path)
        assert path.name.startswith("buggy-s7-3-")
        assert path.read_bytes()[0] == (1 if f.kind == "crash" else 2)
        text = path.with_suffix(path.suffix + ".txt").read_text()
        assert ("KeyError" if f.kind == "crash" else "Hang") in text
        assert "--replay" in text
    assert result.slowest >= 0.1


def test_cli_counts_and_replay(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "fuzz", "--targets", "framing,uapi-get", "--scale", "0.02",
         "--seed", "9", "--jobs", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "seed 9" in run.stdout
    assert "crashes: 0, hangs: 0" in run.stdout
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line[:1] != " "}
    assert rows["framing"][1] == "2,000" and rows["uapi-get"][1] == "1,000"
    assert (out / "framing-s9.slowest").exists()

    # A made-up crash file for a shard that does not crash: replay says so.
    fake = out / "framing-s9-0-5.crash"
    fake.write_bytes(b"")
    again = subprocess.run([sys.executable, "-m", "fuzz", "--replay", str(fake)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "no longer fails" in again.stdout


def test_the_core_target_checks_segment_sizes(tmp_path: Path) -> None:
    """Inner packets sealed with a segment-size trailer (CAP_SEGMENT_SIZE) come out of the
    engine as SEGMENTED actions, whose size the oracle compares with the one sealed. Before,
    the generator never made a trailer (a short run reached SEGMENTED only if havoc happened
    to write one) and the oracle took any size in range."""
    cls = all_targets()["core"]
    rng = random.Random(f"{SEED}:core:segments")
    fixture = cls(rng, tmp_path)
    try:
        for _ in range(3000):
            fixture.run(fixture.generate(rng)[1])
        assert fixture.segmented > 0
    finally:
        fixture.close()
