"""An exception whose message cannot be made, for the places that put a caught exception into
words (a refusal, a stop reason, a report): `str()` of it raises ValueError."""

from __future__ import annotations


class Unsayable(Exception):
    def __str__(self) -> str:
        raise ValueError("no message")
