"""wgvsock.mountinfo against real mounts, in a mount namespace of the test's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]


def test_a_file_bound_over_another_is_a_mount_point_by_its_escaped_name(tmp_path: Path) -> None:
    """The kernel writes a space in a mount point as \\040 (and a backslash as \\134): read
    as they stand, a resolv.conf bound at such a path would not be seen as a mount."""
    d = tmp_path / "with space\\and backslash"
    d.mkdir()
    target, source = d / "resolv.conf", tmp_path / "source"
    target.write_text("host's\n")
    source.write_text("its own\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    probe = ("import sys; from wgvsock.mountinfo import is_mount_point as m; "
             "print(m(sys.argv[1]), m(sys.argv[2]), m(sys.argv[3]))")
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" "$1" && shift && exec "$@"', str(source), str(target),
         sys.executable, "-c", probe, str(target), str(link), str(source)],
        capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    # The bound file, and a link to it (a mount follows links); not the file bound there.
    assert res.stdout.split() == ["True", "True", "False"]
