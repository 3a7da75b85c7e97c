"""Memory estimates checked before allocating: refuse a request with the figure and the fix.

A spec, trace or plan file is small but can describe something huge (full DeepSeek-V3 experts, a
million experts in trace metadata); allocating it first would end in the allocator's traceback, or in
the OS killing the process. Each stage estimates what it is about to allocate and calls
``check_memory``, which compares it with the memory available now (``MemAvailable`` on Linux).
"""

from __future__ import annotations

import os

from .errors import ResourceError

__all__ = ["available_memory", "check_memory", "gib"]


def available_memory() -> int | None:
    """Bytes of memory available to allocate now (None when the OS does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_memory(need_bytes: float, what: str, fix: str, limit_bytes: float | None = None) -> None:
    """Raise ResourceError if ``what`` (needing about ``need_bytes``) exceeds the available memory
    (or ``limit_bytes`` when given)."""
    have = limit_bytes if limit_bytes is not None else available_memory()
    if have is not None and need_bytes > have:
        where = "the limit" if limit_bytes is not None else "the memory available"
        raise ResourceError(f"{what} needs about {gib(need_bytes)}, more than {where} ({gib(have)}); {fix}")
