"""argparse types shared by the command line and the benchmark scripts: a clear message for a value out of range."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type, for the CLI and the benchmark scripts: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type, for the CLI and the benchmark scripts: a reduction, strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (0.5 removes half the parameters), "
                                         f"got {text}")
    return value
