"""Checks of command-line values that typer's types do not make: finite floats, output paths."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def _percent(text: str) -> float | None:
    """``P%`` with P a number from 0 to 100, as the fraction P / 100; None for anything else."""
    if not text.endswith("%"):
        return None
    try:
        share = float(text[:-1])
    except ValueError:
        return None
    return share / 100.0 if math.isfinite(share) and 0.0 <= share <= 100.0 else None


def slot_budget(value: str | None) -> str | None:
    """A typer callback for ``--max-moves``: a number of slots (``N >= 0``) or a share of them (``P%``, 0-100);
    ``resolve_slot_budget`` turns it into slots once the plan is known."""
    if value is None:
        return None
    text = value.strip()
    if _percent(text) is not None:
        return text
    try:
        if int(text) >= 0:
            return text
    except ValueError:
        pass
    raise typer.BadParameter(f"must be a number of slots (N >= 0) or a share of them (P%, 0 to 100), got {value!r}")


def move_share(value: str | None) -> str | None:
    """A typer callback for ``--move-target``: a share of the slots (``P%``, 0-100) or ``off`` (no target)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text == "off" or _percent(text) is not None:
        return text
    raise typer.BadParameter(f"must be a share of the slots (P%, 0 to 100, e.g. 15%) or off (no target), got {value!r}")


def resolve_move_share(value: str) -> float | None:
    """A given ``--move-target`` as ``replan``'s ``move_target``: a fraction of the slots, None for ``off``."""
    return None if value == "off" else _percent(value)


def resolve_slot_budget(value: str | None, slots: int) -> int | None:
    """``--max-moves`` in slots, out of ``slots`` (all layers): a share is rounded down."""
    if value is None:
        return None
    share = _percent(value)
    return int(value) if share is None else math.floor(share * slots)


def output_file(path: Path, what: str, suffixes: tuple[str, ...] = (), inputs: Iterable[Any] = (),
                example: str = "", outputs: Iterable[tuple[Path | None, str]] = ()) -> Path:
    """Refuse, before any work, an output path the writer cannot use: a folder, a device or pipe (a rename
    would replace it), an extension it cannot produce, a folder that is missing or not writable, one of
    the command's ``inputs`` (paths; other items such as bundled names are skipped), or the path of another
    of its ``outputs`` ((path or None, what) pairs; the same file, whether or not it exists yet: the second
    write would silently replace the first). A symbolic link is checked (and later written) through to its
    target. ``example``: the extension a folder's hint suggests (default: the first of ``suffixes``)."""
    from ..errors import MoegraphError
    from ..fileio import regular_target

    try:
        folder = Path(os.path.realpath(path)).is_dir()
    except OSError as exc:  # a name longer than the file system allows, say
        raise MoegraphError(f"{path}: cannot be written ({exc.strerror or exc}); give another path for the {what}") from None
    if folder:
        raise MoegraphError(f"{path}: is a folder; give the {what} file to write, e.g. {path / ('out' + (example or (suffixes or ('',))[0]))}")
    real = regular_target(path, what)
    if suffixes and path.suffix.lower() not in suffixes:
        raise MoegraphError(f"{path}: cannot write a {what} with extension {path.suffix or '(none)'!r}; use one of "
                            f"{', '.join(suffixes)}")
    if not real.parent.exists():
        raise MoegraphError(f"{path}: folder {real.parent} does not exist; create it or choose another path")
    if not real.parent.is_dir():
        raise MoegraphError(f"{path}: {real.parent} is not a folder; choose another path")
    try:  # the one sure test of writability (permissions, read-only file systems, /proc): create a file there
        fd, probe = tempfile.mkstemp(prefix=f".{real.stem[:40]}.", suffix=".probe", dir=real.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MoegraphError(f"{path}: cannot write in folder {real.parent} ({exc.strerror or exc}); choose another "
                            "path") from None
    for other, other_what in outputs:
        if other is not None and (Path(os.path.realpath(other)) == real or (
                real.exists() and Path(other).exists() and os.path.samefile(real, other))):
            raise MoegraphError(f"{path}: is also where the {other_what} goes ({other}); the {what} would overwrite "
                                f"it: give the {what} and the {other_what} different paths")
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and real.exists() and Path(item).exists() and os.path.samefile(real, item):
            raise MoegraphError(f"{path}: is also an input of this command ({item}); writing the {what} would overwrite "
                                "it: choose another output path")
    return path
