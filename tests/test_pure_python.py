"""The per-packet modules as pure Python, the form they take where mypyc does not compile them
(WGVSOCK_PURE=1, and every wheel `make wheelhouse` builds for another architecture).

The rest of the suite runs whatever `make compile` built, which is the compiled form. Here the
core, transport and TUN tests run once more on a copy of the sources without any extension.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/core", "tests/conn", "tests/test_tun.py", "tests/test_segmentation.py"]


@pytest.mark.slow
def test_the_per_packet_tests_pass_without_compiled_modules(tmp_path: Path) -> None:
    tree = tmp_path / "pure"
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(ROOT / "wgvsock", tree / "wgvsock", ignore=skip)
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", tree / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # The copy first, ahead of the editable install that points at the compiled tree.
    env["PYTHONPATH"] = str(tree)
    # ../shared beside the copy, as beside the checkout (the known-answer vectors).
    env["WGVSOCK_SHARED"] = str(SHARED)
    (tmp_path / "shared").symlink_to(SHARED)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUITES],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    # And the modules it ran were the copies, not the compiled ones beside the sources.
    probe = subprocess.run(
        [sys.executable, "-c", "import wgvsock.core.engine as m; print(m.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    assert probe.stdout.strip() == str(tree / "wgvsock/core/engine.py")
