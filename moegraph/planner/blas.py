"""Run a block with numpy's OpenBLAS on one thread, without a new dependency.

    with one_blas_thread():
        ...  # many small matrix products

The planner's searches multiply many small matrices, where OpenBLAS threads cost more in
synchronisation than they gain. ``threadpoolctl`` does this properly but is not a dependency of moegraph; this helper finds
the OpenBLAS library bundled with numpy wheels (``numpy.libs/*openblas*``) and calls its
``*_set_num_threads`` through ctypes. It is best effort: where no such library or symbol is found
(another BLAS, a distribution build of numpy) it does nothing, which changes speed, never results.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from collections.abc import Iterator

import numpy as np

__all__ = ["one_blas_thread"]

#: symbol name parts of the thread setter/getter in the OpenBLAS builds numpy wheels bundle
_SYMBOLS = (("scipy_openblas", "64_"), ("openblas", ""), ("scipy_openblas", ""))


@functools.cache
def _thread_functions() -> tuple[object, object] | None:
    """(setter, getter) of the bundled OpenBLAS thread count, or None where there is none to find.

    Looked up once per process (a glob and a library load; a forked child inherits the result, the
    library being the same mapping there), so entering ``one_blas_thread`` per layer costs two calls."""
    pattern = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")
    try:
        for path in glob.glob(pattern):
            lib = ctypes.CDLL(path)
            for prefix, suffix in _SYMBOLS:
                if hasattr(lib, f"{prefix}_set_num_threads{suffix}"):
                    return (getattr(lib, f"{prefix}_set_num_threads{suffix}"),
                            getattr(lib, f"{prefix}_get_num_threads{suffix}"))
    except OSError:
        return None
    return None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with OpenBLAS on one thread, restoring the previous count after (no-op if not found)."""
    found = _thread_functions()
    if found is None:
        yield
        return
    setter, getter = found
    before = int(getter())
    setter(1)
    try:
        yield
    finally:
        setter(before)
