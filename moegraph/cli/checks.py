"""Checks of command-line values that typer's types do not make: finite floats, output paths."""

from __future__ import annotations

import math
from pathlib import Path

import typer


def finite(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False):
    """A typer callback: the float must be finite and within [lo, hi] (``open_lo``: strictly above lo)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if lo is not None and (value <= lo if open_lo else value < lo):
            raise typer.BadParameter(f"{value:g} must be {'above' if open_lo else 'at least'} {lo:g}")
        if hi is not None and value > hi:
            raise typer.BadParameter(f"{value:g} must be at most {hi:g}")
        return value

    return check


def output_file(path: Path, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse an output path that is a folder or has an extension the writer cannot produce, before any work."""
    from ..errors import MoegraphError

    if path.is_dir():
        raise MoegraphError(f"{path}: is a folder; give the {what} file to write, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise MoegraphError(f"{path}: cannot write a {what} with extension {path.suffix or '(none)'!r}; use one of "
                            f"{', '.join(suffixes)}")
    if not path.parent.exists():
        raise MoegraphError(f"{path}: folder {path.parent} does not exist; create it or choose another path")
    return path
