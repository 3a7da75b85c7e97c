"""argparse types for the benchmark and example scripts: a bad value is a one-line usage error naming its option.
(The ``moegraph`` command checks its options with typer; this module needs nothing beyond the standard library,
so the scripts run where the CLI's dependencies are not installed, as on a lent GPU machine.)

    ap.add_argument("--tokens", type=positive_int, nargs="+")   # error: argument --tokens: must be ...
"""

from __future__ import annotations

import argparse


def _number(text: str, kind: type, lowest: float, strict: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value != value or value < lowest or (strict and value == lowest):  # nan, or out of range
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, 1, False, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, 0, False, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(text, float, 0.0, True, "a positive number")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value
