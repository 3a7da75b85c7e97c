"""Files in and out: outputs written whole or not at all, inputs read only from regular files of bounded size.

``write_atomically(path, write, what, error, fix)``: ``write(tmp)`` fills a temporary file beside the target,
which is then renamed over it, so that a crash or a full disk never leaves a half-written file. The
temporary file is new and uniquely named (``tempfile.mkstemp``: a file already there under some name,
or a link planted there, is never written through or removed) and gets the usual permissions. A
symbolic link at the target is written through (its target gets the new content; the link stays), and
an existing path that is not a regular file (a folder, a device such as /dev/null, a FIFO) is refused,
since the rename would replace it.

``check_input(path, what, error, max_bytes)`` (``input_problem``: the same as text): before an input file (spec, plan, trace, configuration,
table) is read, a path that is not a regular file is refused (a FIFO would block the reader forever, a
device such as /dev/zero never ends), as is one larger than the reader's bound, and an operating system
error (a name longer than the file system allows, a folder that cannot be searched) becomes ``error``
naming the path; a missing file is left to the reader, whose message says what was expected there.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import MoegraphError

__all__ = ["DuplicateKey", "check_input", "input_problem", "regular_target", "umask", "unique_json_object",
           "write_atomically"]


def regular_target(path: str | Path, what: str, error: type[MoegraphError] = MoegraphError) -> Path:
    """Where writing ``path`` lands (symbolic links followed); ``error`` if that exists and is not a regular
    file, since the rename of ``write_atomically`` would replace it."""
    target = Path(os.path.realpath(path))
    try:
        st = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # nothing there (a parent that is a file: said by the writer)
        return target
    except OSError as exc:  # a name too long, a folder that cannot be searched, a link loop
        raise error(f"{path}: cannot be written ({exc.strerror or exc}); give another path for the {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: exists and is not a regular file (a folder, a device such as /dev/null, a pipe or a "
                    f"socket); give a file path for the {what}")
    return target


def input_problem(path: str | Path, what: str, max_bytes: int | None = None) -> str | None:
    """Why ``path`` cannot be read as the ``what`` (module docstring), or None: it is a regular file of at most
    ``max_bytes``, a folder (for the reader to take or refuse), or missing (for the reader to say so)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # a name too long, a folder that cannot be searched, a link loop
        return f"cannot be read as the {what} ({exc.strerror or exc}); check the path"
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file (a pipe, a socket or a device such as /dev/zero); give the {what} as a file"
    if max_bytes is not None and st.st_size > max_bytes:
        return (f"{st.st_size:,} bytes is larger than any {what} this reads ({max_bytes:,} bytes at most); is this "
                "the right file?")
    return None


def check_input(path: str | Path, what: str, error: type[MoegraphError] = MoegraphError,
                max_bytes: int | None = None) -> None:
    """``error`` naming ``path`` when ``input_problem`` finds one."""
    problem = input_problem(path, what, max_bytes)
    if problem is not None:
        raise error(f"{path}: {problem}")


class DuplicateKey(ValueError):
    """A key given twice in one mapping of an input file (the parser would silently keep the last)."""


def unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` that refuses a key given twice in one object (``DuplicateKey``)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(f"key {k!r} appears twice in one object; give it once")
        out[k] = v
    return out


def umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored, the only portable way)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, write: Callable[[Path], None], what: str,
                     error: type[MoegraphError] = MoegraphError, fix: str | None = None) -> Path:
    """Write ``path`` through ``write(tmp)`` (module docstring); returns ``path``. On any failure the temporary
    file is removed and ``error`` names ``path``, the ``what`` and the fix (``fix``, else: another path)."""
    p = Path(path)
    target = regular_target(p, what, error)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a new file of a unique name beside the target; the suffix kept: numpy appends .npz otherwise
        # (the name's head only: a target name near the file system's limit stays writable)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem[:40]}.", suffix=f".tmp{target.suffix[:16]}")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 is not what the user's other files get
        tmp.replace(target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise error(f"{p}: could not write the {what} ({exc.strerror or exc}); nothing was written: " + (
                fix or "check that the folder is writable and has free space, or choose another path")) from None
        raise
    return p
