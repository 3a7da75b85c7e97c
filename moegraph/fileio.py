"""Output files written whole or not at all (plans, placement exports, traces).

``write_atomically(path, write, what, error)``: ``write(tmp)`` fills a temporary file beside the target,
which is then renamed over it, so that a crash or a full disk never leaves a half-written file. A
symbolic link is written through (its target gets the new content; the link stays), and an existing
path that is not a regular file (a folder, a device such as /dev/null, a FIFO) is refused, since the
rename would replace it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from .errors import MoegraphError

__all__ = ["regular_target", "write_atomically"]


def regular_target(path: str | Path, what: str, error: type[MoegraphError] = MoegraphError) -> Path:
    """Where writing ``path`` lands (symbolic links followed); ``error`` if that exists and is not a regular
    file, since the rename of ``write_atomically`` would replace it."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise error(f"{path}: exists and is not a regular file (a folder, a device such as /dev/null, a pipe or a "
                    f"socket); give a file path for the {what}")
    return target


def write_atomically(path: str | Path, write: Callable[[Path], None], what: str,
                     error: type[MoegraphError] = MoegraphError) -> Path:
    """Write ``path`` through ``write(tmp)`` (module docstring); returns ``path``. On any failure the temporary
    file is removed and ``error`` names ``path``, the ``what`` and the fix."""
    p = Path(path)
    target = regular_target(p, what, error)
    tmp = target.with_name(f"{target.name}.tmp{target.suffix}")  # the suffix kept: numpy appends .npz otherwise
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.replace(target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"{p}: could not write the {what} ({exc.strerror or exc}); nothing was written: check that the "
                        "folder is writable and has free space, or choose another path") from None
        raise
    return p
