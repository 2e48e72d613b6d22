"""Builds wgvsock with its per-packet modules compiled to C by mypyc.

The modules listed under [tool.wgvsock] `compiled` in pyproject.toml (the protocol core, the
transports and the device: everything a packet passes through) become C extensions beside
their sources; the rest stays Python. The same sources run unchanged as pure Python:
`WGVSOCK_PURE=1` builds that way (no C compiler needed; slower, see bench/README.md, ninth
round). Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tomllib
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    meta = tomllib.loads((HERE / "pyproject.toml").read_text())
    return meta["tool"]["wgvsock"]["compiled"]


def ext_modules() -> list:
    if os.environ.get("WGVSOCK_PURE", "") not in ("", "0"):
        return []
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None:
        sys.exit(f"wgvsock: no C compiler ({cc}) to compile the per-packet modules with mypyc. "
                 "Install one (Debian: apt install gcc python3-dev), or build pure Python "
                 "with WGVSOCK_PURE=1 (slower: bench/README.md).")
    if platform.python_implementation() != "CPython":
        sys.exit("wgvsock: mypyc compiles for CPython only; build with WGVSOCK_PURE=1")
    from mypyc.build import mypycify

    # debug_level 0: no debug information, which would carry the build directory's path into
    # the extension and so make the enclave image differ from build to build.
    return mypycify(compiled_modules(), opt_level="3", debug_level="0",
                    group_name="wgvsock_native")


setup(ext_modules=ext_modules())
