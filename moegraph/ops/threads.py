"""Worker threads of the expert op: run independent pieces of one call side by side, each piece on
one intra-op thread (``run_split``).

With P intra-op threads, every GEMM of the per-expert path is split P ways, and for the few hundred
rows an expert gets in a large batch each share is small enough that the split's start-up, join and
edge blocks cost a good part of the GEMM. Giving each of P workers whole experts instead (their
GEMMs on one thread each) keeps every GEMM at its one-thread speed. The GEMM and elementwise
kernels release the GIL, so the workers' kernels overlap; only their short Python steps take turns.

One pool per process and worker count: a pool made before a fork has no threads in the child, so the
child makes its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["run_split"]

P = TypeVar("P")
R = TypeVar("R")

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def _one_thread() -> None:
    torch.get_num_threads()  # this thread's lazy intra-op setup first: it would undo the line below
    torch.set_num_threads(1)


def _make_pool(workers: int) -> ThreadPoolExecutor:
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="moegraph-experts", initializer=_one_thread)
    # Start every worker now (each blocks on the barrier, so none is idle and each submit starts one),
    # then restore the process-wide thread count that their set_num_threads(1) changed: it is what
    # threads started later (and their lazy setup) read; the calling thread's own count never moved.
    started = threading.Barrier(workers + 1)
    futures = [pool.submit(started.wait) for _ in range(workers)]
    started.wait()
    for f in futures:
        f.result()
    torch.set_num_threads(threads)
    return pool


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)
    with _LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = _make_pool(workers)
    return pool


def run_split(fn: Callable[[P], R], parts: Sequence[P]) -> list[R]:
    """``[fn(p) for p in parts]``, each call on its own worker thread with one intra-op thread, under
    the caller's inference mode and without autograd; results in the order of ``parts``. One part
    runs on the calling thread as it is."""
    if len(parts) <= 1:
        return [fn(p) for p in parts]
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers enter it themselves

    def call(part):
        with torch.inference_mode(inference), torch.no_grad():
            return fn(part)

    return list(_pool(len(parts)).map(call, parts))
