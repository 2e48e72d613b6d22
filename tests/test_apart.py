"""tests/apart.py: tests marked ``apart`` run in pytest processes of their own at the same time as
the others, and their outcomes come back as their own; an interrupted session interrupts them too,
and their teardowns still run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each side waits for a file the other writes: run one after the other, they would both time out.
MEETING = '''
import time
from pathlib import Path

import pytest

def wait_for(path, seconds=60):
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)

@pytest.fixture
def marks():
    return Path(__file__).parent

@pytest.mark.apart
def test_apart_meets_here(marks):
    (marks / "apart-started").touch()
    wait_for(marks / "here-started")

def test_here_meets_apart(marks):
    (marks / "here-started").touch()
    wait_for(marks / "apart-started")

@pytest.mark.apart
def test_apart_fails():
    print("said beside")
    assert 1 == 2, "as it should"

@pytest.mark.apart
def test_apart_skips():
    pytest.skip("for a reason")
'''

INTERRUPTED = '''
import time
from pathlib import Path

import pytest

@pytest.fixture
def cleaned():
    yield
    (Path(__file__).parent / "torn-down").touch()

@pytest.mark.apart
def test_long(cleaned):
    (Path(__file__).parent / "apart-started").touch()
    time.sleep(120)

def test_fails_once_apart_runs():
    end = time.monotonic() + 60
    while not (Path(__file__).parent / "apart-started").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert False, "stops the session (-x)"
'''


def _pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_it.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.apart", "-p", "no:cacheprovider",
         "-o", "markers=apart: beside", "-q", *args, str(tmp_path / "test_it.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)


def test_apart_tests_run_at_the_same_time_and_report_as_their_own(tmp_path: Path) -> None:
    res = _pytest(tmp_path, MEETING, "-rs")
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert "1 failed, 2 passed, 1 skipped" in out, out
    assert "test_apart_fails [in the pytest process beside this one]" in out, out
    assert "AssertionError: as it should" in out and "said beside" in out, out
    assert "in the pytest process beside this one: Skipped: for a reason" in out, out
    assert "3 tests, each in a pytest process of its own" in out, out


def test_an_interrupted_session_interrupts_the_run_beside(tmp_path: Path) -> None:
    started = time.monotonic()
    res = _pytest(tmp_path, INTERRUPTED, "-x")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stops the session (-x)" in res.stdout
    assert time.monotonic() - started < 100, "the run beside was waited for"
    assert (tmp_path / "torn-down").exists(), "its teardown did not run"
    left = subprocess.run(["pgrep", "-f", f"report-json=.*{tmp_path}/test_it.py"],
                          capture_output=True, check=False)
    assert left.returncode == 1, left.stdout
