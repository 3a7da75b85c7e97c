"""Independent per-layer work in forked processes, one per usable core: the same results, sooner.

    workers = fork_workers(tasks, work, threshold)   # 1 where forking is missing or the work too small
    results = map_forked(fn, tasks, workers, done)   # [fn(t) for t in tasks], in order
    cpu_seconds()                                     # this process's CPU time and its children's

Both the planner (``driver.plan``: a layer's search takes about a second on DeepSeek-V2-Lite traffic)
and the re-plan without a budget (``replan``: its layers do not interact) solve every MoE layer on
its own, so their layers can run at once. Why fork and not spawn: a forked child inherits the
layers' inputs (traces, states) as they are in memory, so nothing is pickled on the way in (only
each layer's small result comes back) and nothing is imported again; a start costs milliseconds.
The function runs in the children as it would here, so every result is the one a single process
computes, bit for bit, and so is the plan built from them (the caller combines them in task order).

Where the pool cannot run (no memory for a child, a child killed), the tasks it did not finish are
computed here instead: the same result, later. An error raised by ``fn`` itself is raised here, as
the sequential loop would raise it (the tasks not started are cancelled). A task that itself calls
``map_forked`` (a plan inside a forked re-plan) runs its tasks in its own process, and so does a
daemonic process (a ``multiprocessing.Pool`` worker planning one of a user's sweeps), which Python
does not let start children.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["cpu_seconds", "fork_workers", "map_forked", "usable_cores"]

T = TypeVar("T")
R = TypeVar("R")

#: what the forked children call (set before the pool starts, inherited by fork; never pickled)
_FN: Callable[[Any], Any] | None = None
#: True in a forked child: a nested ``map_forked`` runs sequentially there
_IN_CHILD = False


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished children: what a plan cost, its
    forked layers included (a child's time is counted once the pool has ended it, as ``map_forked`` does
    before it returns). The benchmarks report it beside the wall clock."""
    try:
        import resource  # Unix only
    except ImportError:
        return time.process_time()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says, else the count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fork_workers(tasks: int, work: float, threshold: float) -> int:
    """How many processes should run ``tasks`` independent tasks of ``work`` units in all: one per usable
    core (at most one per task) on Linux, where forking is safe, and when ``work >= threshold`` (enough to
    pay for starting them), else 1. (macOS has fork, but its system libraries are not safe to use in a
    forked child, which is why Python spawns there by default; a spawned child would import everything again.)"""
    import multiprocessing

    if (tasks < 2 or work < threshold or not sys.platform.startswith("linux")
            or "fork" not in multiprocessing.get_all_start_methods() or not _may_start_processes()):
        return 1
    return max(1, min(usable_cores(), tasks))


def _may_start_processes() -> bool:
    """False in a forked child of ours (its tasks are its own) and in a daemonic process (a worker of a
    ``multiprocessing.Pool``, which may not start children: Python refuses with an AssertionError)."""
    import multiprocessing

    return not _IN_CHILD and not multiprocessing.current_process().daemon


def _child_init() -> None:
    global _IN_CHILD
    _IN_CHILD = True


def _call(task: Any) -> Any:
    assert _FN is not None, "map_forked's function is set before its pool forks"
    return _FN(task)


def map_forked(fn: Callable[[T], R], tasks: Sequence[T], workers: int,
               done: Callable[[int], None] | None = None) -> list[R]:
    """``[fn(t) for t in tasks]``, computed by ``workers`` forked processes (here alone when ``workers`` is 1, in a
    forked child of ours and in a daemonic process).

    Tasks are handed out one at a time in the given order (put the slowest first), so a process that
    finishes early takes the next. ``done(n)`` is called here after each task finishes, with the number
    finished so far. ``fn`` need not be picklable (a closure is fine): the children inherit it.
    """
    global _FN
    out: list[Any] = [None] * len(tasks)
    finished = [False] * len(tasks)
    count = 0

    def record(k: int, value: Any) -> None:
        nonlocal count
        out[k], finished[k] = value, True
        count += 1
        if done is not None:
            done(count)

    if workers > 1 and len(tasks) > 1 and _may_start_processes():
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        if _FN is not None:
            raise RuntimeError("map_forked is not re-entrant from a thread while another call runs")
        _FN = fn
        pool = None
        try:
            pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork"),
                                       initializer=_child_init)
            pending = {pool.submit(_call, t): k for k, t in enumerate(tasks)}
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(ready, key=pending.__getitem__):  # in task order among those ready
                    record(pending.pop(fut), fut.result())
        except (BrokenProcessPool, OSError):
            pass  # the tasks not finished run below, in this process
        finally:
            _FN = None
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    for k, t in enumerate(tasks):
        if not finished[k]:
            record(k, fn(t))
    return out
