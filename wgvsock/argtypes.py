"""argparse types shared by the command lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def seconds(maximum: float, what: str) -> Callable[[str], float]:
    """A number of seconds above 0 and at most `maximum` (`what` names it in the error):
    NaN, infinity and absurd values would otherwise mean waiting forever."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 0 < value <= maximum:  # (NaN fails both)
            most = f"{maximum:.0f}" if float(maximum).is_integer() else f"{maximum:g}"
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds above 0 and at most {most} ({what}): "
                f"{text!r}")
        return value

    return parse
