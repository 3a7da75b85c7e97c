"""Memory estimates checked before allocating: refuse a request with the figure and the fix.

A spec, trace or plan file is small but can describe something huge (full DeepSeek-V3 experts, a
million experts in trace metadata); allocating it first would end in the allocator's traceback, or in
the OS killing the process. Each stage estimates what it is about to allocate and calls
``check_memory``, which compares it with the memory available now (``available_memory``: on Linux the least
of ``MemAvailable`` and what the process's address-space and cgroup limits leave).
"""

from __future__ import annotations

import contextlib
import os

from .errors import ResourceError

__all__ = ["MAX_LOCAL_PROCESSES", "PROCESS_BYTES", "address_space_room", "available_memory", "check_memory", "gib"]

#: the most processes ``moegraph run`` starts on one machine (``--nproc``, or a plan's GPU count without it)
MAX_LOCAL_PROCESSES = 1024
#: what one started Python process holds before its own work: the interpreter with torch and moegraph imported
#: (about 235 MiB resident, measured), a lower bound of each local rank's memory
PROCESS_BYTES = 256 * 2**20


def available_memory(address_space: bool = True) -> int | None:
    """Bytes of memory this process may still allocate now (None when the OS does not say): the least of the
    system's ``MemAvailable``, the room left under its cgroup's ``memory.max`` (a container's limit, which
    ``MemAvailable`` does not see) and, with ``address_space``, under this process's address-space limit
    (``ulimit -v``: per process, so not what several processes share)."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for room in (address_space_room() if address_space else None, _cgroup_room()):
        if room is not None:
            found.append(room)
    return min(found) if found else None


def address_space_room() -> int | None:
    """Bytes left under RLIMIT_AS (the soft limit) beyond the process's current virtual size; None: unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", encoding="ascii") as fh:
            size = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(int(soft) - size, 0)
    except (ImportError, OSError, ValueError, IndexError):
        return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 ``memory.max`` (None: no limit, or not cgroup v2): the limit less
    what the cgroup uses, its reclaimable page cache (``inactive_file``) not counted as used."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            rel = next((line.split(":", 2)[2].strip() for line in fh if line.startswith("0::")), None)
        if rel is None:
            return None
        folder = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(folder, "memory.max"), encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, "memory.current"), encoding="ascii") as fh:
            used = int(fh.read().strip())
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(os.path.join(folder, "memory.stat"), encoding="ascii") as fh:
            used -= next((int(line.split()[1]) for line in fh if line.startswith("inactive_file ")), 0)
        return max(int(limit) - max(used, 0), 0)
    except (OSError, ValueError, IndexError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_memory(need_bytes: float, what: str, fix: str, limit_bytes: float | None = None) -> None:
    """Raise ResourceError if ``what`` (needing about ``need_bytes``) exceeds the available memory
    (``available_memory()``, or ``limit_bytes`` when given)."""
    have = limit_bytes if limit_bytes is not None else available_memory()
    if have is not None and need_bytes > have:
        where = "the limit" if limit_bytes is not None else "the memory available"
        raise ResourceError(f"{what} needs about {gib(need_bytes)}, more than {where} ({gib(have)}); {fix}")
