"""The build backend: setuptools, asking for mypy only when setup.py will compile with it.

A pure build (WGVSOCK_PURE=1: no C compiler, or a wheel for another architecture, as
`make wheelhouse` makes for Graviton on an x86 machine) then needs nothing but setuptools.
"""

from __future__ import annotations

import os

from setuptools.build_meta import *  # noqa: F403  (the rest of the backend, unchanged)

# mypyc comes with mypy; the version that setup.py's mypycify() and the type rules it checks
# were written against.
MYPYC = "mypy>=1.18"


def _compiler() -> list[str]:
    # Not build_meta's own hook, which runs setup.py to find its setup_requires (it has none),
    # and setup.py cannot run before mypy is there.
    pure = os.environ.get("WGVSOCK_PURE", "") not in ("", "0")
    return [] if pure else [MYPYC]


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    return _compiler()


def get_requires_for_build_editable(config_settings: dict | None = None) -> list[str]:
    return _compiler()
