"""Memory the expert op keeps between calls: per-thread scratch buffers (``_Workspace``) and the
oneDNN-packed copies of expert weights used by eval graphs (``packed_experts``); and large buffers
it cannot keep, on huge pages (``empty_huge``).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import weakref
from functools import lru_cache

import torch
from torch import Tensor


def _limit_bytes() -> int:
    from .. import ops  # the setting lives on the package, where callers (and tests) change it

    return ops.WORKSPACE_LIMIT_BYTES


class _Workspace:
    """Scratch buffers reused across calls, up to ``moegraph.ops.WORKSPACE_LIMIT_BYTES``.

    Large fresh allocations are returned to the OS and page-faulted back in on every call, which on
    a CPU costs as much as the GEMMs' own memory traffic; reusing grown buffers avoids that.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, Tensor] = {}

    def kept_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def get(self, name: str, rows: int, cols: int) -> Tensor:
        need = rows * cols
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < need:
            buf = torch.empty(need, dtype=self.dtype, device=self.device)
            others = self.kept_bytes() - (self.buffers[name].numel() * buf.element_size() if name in self.buffers else 0)
            if others + need * buf.element_size() <= _limit_bytes():
                self.buffers[name] = buf
            else:  # too big to keep: this call only (and drop the smaller one it replaces)
                self.buffers.pop(name, None)
        return buf[:need].view(rows, cols)


_WORKSPACES = threading.local()


def _workspace(dtype: torch.dtype, device: torch.device) -> _Workspace:
    table = getattr(_WORKSPACES, "table", None)
    if table is None:
        table = _WORKSPACES.table = {}
    # Buffers made under torch.inference_mode are inference tensors, which cannot be written outside
    # it: keep one workspace per mode.
    key = (dtype, device, torch.is_inference_mode_enabled())
    if key not in table:
        table[key] = _Workspace(dtype, device)
    return table[key]


def clear_workspace() -> None:
    """Free the scratch buffers kept by the expert op in this thread."""
    _WORKSPACES.table = {}


#: Buffers from this size on are advised onto huge pages by ``empty_huge``.
HUGE_PAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14  # <linux/mman.h>


@lru_cache(maxsize=None)
def _madvise():
    """libc's madvise where this is Linux (None elsewhere, or where it cannot be found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape)``, with a large CPU buffer advised onto huge pages before it is touched.

    The expert weight gradients ([E, H, D] and [E, D, F]) are fresh every training step: autograd
    takes them as the parameters' ``.grad`` and frees them when the grads are reset, so a workspace
    cannot keep them. Buffers that large come straight from mmap, and first touching them on 4 KiB
    pages (one fault and one zeroed page at a time) costs as much as the GEMMs that write them; on
    2 MiB pages it is a small part of that. The advice changes only how the memory is paged (Linux
    with transparent huge pages on ``madvise``; a no-op where they are off or on ``always``).
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if t.device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES else None
    if madvise is not None:
        page = mmap.PAGESIZE
        start = -(-t.data_ptr() // page) * page  # whole pages inside the buffer only
        end = (t.data_ptr() + nbytes) // page * page
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice: a refusal leaves ordinary pages
    return t


def prepack_supported(w: Tensor) -> bool:
    """Whether expert weights can be pre-packed for oneDNN: CPU float32, or bfloat16 where oneDNN
    has bfloat16 kernels for this CPU (AVX512-BF16, AMX)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available() or \
            not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if w.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return w.dtype == torch.float32


def _linear(x: Tensor, w: Tensor, packed: Tensor | None) -> Tensor:
    """x @ w.T, through oneDNN when a packed copy of w is given."""
    if packed is None:
        return torch.mm(x, w.t())
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


class _PackedExperts:
    """oneDNN-packed copies of one layer's expert weights, tied to the weights' versions.

    Packing reorders each expert's weight once into oneDNN's blocked layout, so small-row GEMMs stop
    re-packing the full weight on every call (about 1.8x faster at 4-16 rows per expert). The copy
    doubles expert memory, so only eval graphs use it (see fx_passes.UsePrepackedExperts). It is
    rebuilt whenever a weight's data pointer or version counter changes (in-place updates,
    load_state_dict, .to()). A write through ``.data`` changes neither: ``forget_packed`` (which the
    layer's ``invalidate_graphs`` calls) drops the copy.
    """

    def __init__(self, tensors: tuple[Tensor | None, ...]):
        self.key = _pack_key(tensors)
        w_up, w_down, s_up, s_down = tensors
        rows = 16  # a batch-size hint for the blocking; any row count works
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.up = [reorder(w_up[e].contiguous(), rows) for e in range(w_up.shape[0])]
        self.down = [reorder(w_down[e].contiguous(), rows) for e in range(w_down.shape[0])]
        self.shared_up = reorder(s_up.contiguous(), 256) if s_up is not None else None
        self.shared_down = reorder(s_down.contiguous(), 256) if s_down is not None else None


def _pack_key(tensors: tuple[Tensor | None, ...]) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


# id(weight) -> (weakref to the weight, packed copy). Tensors compare elementwise, so they cannot be
# the keys of a WeakKeyDictionary; a finalizer drops the entry when the weight is freed.
_PACKED: dict[int, tuple[weakref.ref, _PackedExperts]] = {}


def forget_packed(weights: list[Tensor]) -> None:
    """Drop the packed copies made of any of ``weights`` (they are made again on next use)."""
    for w in weights:
        hit = _PACKED.get(id(w))
        if hit is not None and hit[0]() is w:
            del _PACKED[id(w)]


def packed_experts(w_up: Tensor, w_down: Tensor, s_up: Tensor | None, s_down: Tensor | None) -> _PackedExperts | None:
    """The (cached) packed weights for these tensors, or None where packing is not supported."""
    if not prepack_supported(w_up) or w_up.requires_grad and torch.is_grad_enabled():
        return None
    tensors = (w_up, w_down, s_up, s_down)
    ref_entry = _PACKED.get(id(w_up))
    entry = ref_entry[1] if ref_entry is not None and ref_entry[0]() is w_up else None
    if entry is None or entry.key != _pack_key(tensors):
        entry = _PackedExperts(tensors)
        if ref_entry is None or ref_entry[0]() is not w_up:
            weakref.finalize(w_up, _PACKED.pop, id(w_up), None)
        _PACKED[id(w_up)] = (weakref.ref(w_up), entry)
    return entry

