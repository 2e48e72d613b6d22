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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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
    # the extension and so make the enclave image differ from build to build. multi_file: one
    # C file per module (and mypyc's runtime in files of its own), which _ParallelBuildExt
    # compiles at once: 48 s instead of 77 on 2 cores, with no difference in the benchmarks
    # (bench/README.md, thirteenth round).
    include_dirs = ["/usr/include", "/usr/local/include",
                    *filter(None, os.environ.get("CPATH", "").split(":")),
                    *filter(None, os.environ.get("C_INCLUDE_PATH", "").split(":"))]
    if not any(Path(d, "openssl", "evp.h").exists() for d in include_dirs):
        sys.exit("wgvsock: no OpenSSL headers to compile wgvsock/core/_transport_aead.c. "
                 "Install them (Debian: apt install libssl-dev), or build pure Python with "
                 "WGVSOCK_PURE=1 (slower: bench/README.md).")
    # -g0 for the same reason as debug_level 0 below: Python's CFLAGS carry -g, and with it
    # the build directory (a new temporary one for every wheelhouse) in the extension, so that
    # every `make image` gave another image and another PCR0.
    # The transport messages' AEAD (transport_aead.py says why it is C), on the system's
    # OpenSSL 3.
    aead = Extension("wgvsock.core._transport_aead", ["wgvsock/core/_transport_aead.c"],
                     depends=["wgvsock/core/_transport_aead_api.h"], libraries=["crypto"],
                     extra_compile_args=["-O2", "-g0"])
    # TCP segmentation and checksums for TUN reads with offload (_segment.c says why it is C).
    # -O3: GCC vectorises the checksum's loop only there (3x faster than at -O2).
    segment = Extension("wgvsock.device._segment", ["wgvsock/device/_segment.c"],
                        extra_compile_args=["-O3", "-g0"])
    # The tunnel's steady state in one C call each way (_lane.c says why). It takes the keys'
    # OpenSSL contexts from _transport_aead through a capsule (_transport_aead_api.h).
    lane = Extension("wgvsock.device._lane", ["wgvsock/device/_lane.c"],
                     depends=["wgvsock/core/_transport_aead_api.h"], libraries=["crypto"],
                     extra_compile_args=["-O2", "-g0"])
    return [aead, segment, lane, *mypycify(compiled_modules(), opt_level="3", debug_level="0",
                            group_name="wgvsock_native", multi_file=True)]


class _ParallelBuildExt(build_ext):
    """build_ext whose compiler turns an extension's C files into objects in parallel
    (setuptools compiles them one by one; its `parallel` option spreads whole extensions only,
    and here one extension holds nearly all the C)."""

    def build_extensions(self) -> None:
        compiler = self.compiler
        serial = compiler.compile

        def compile_parallel(sources: list[str], *args, **kwargs) -> list[str]:
            if len(sources) < 2:
                return serial(sources, *args, **kwargs)
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                parts = pool.map(lambda source: serial([source], *args, **kwargs), sources)
                return [obj for objs in parts for obj in objs]

        compiler.compile = compile_parallel
        super().build_extensions()


setup(ext_modules=ext_modules(), cmdclass={"build_ext": _ParallelBuildExt})
