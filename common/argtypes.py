"""argparse types for numbers a user can get wrong: the mistake ends in argparse's own ``error:`` line, exit 2.

``type=float`` accepts ``nan`` and ``inf``, and ``type=int`` accepts ``-3`` for a count: the
value then travels into a sampler or a loop and fails far away, in a traceback. These types
refuse it at the flag, naming it (argparse prefixes ``argument --flag:``).
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (samples, steps, batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


__all__ = ["finite_float", "non_negative_float", "positive_int"]
