"""Expert-compute strategies behind the one expert op, and which one runs.

Every strategy computes exactly what ``ops._expert_mlp_impl`` computes (same arguments, same result
up to floating-point summation order and rounding); they differ in how the GEMMs are laid out. In
float32 that leaves about 1e-7 relative between them; in bfloat16 up to about one bfloat16 rounding
step of the output (``per_expert`` and ``grouped_mm`` agree bit for bit on a CPU; the native kernels
sum in float32 and round once), so a run that must be bit-reproducible pins one
(``pinned``; ``moegraph.compile(..., expert_strategy=NAME)``) instead of letting the tuner's timings
choose:

- ``per_expert``: one GEMM pair per expert that received rows (oneDNN-packed weights in eval
  graphs). Few, large GEMMs win when experts get many rows.
- ``grouped_mm``: one ``torch._grouped_mm`` per projection over the expert-sorted rows. Two calls in
  all, so it wins where per-call overhead dominates (small experts, mid-size batches).
- ``expert_threads``: the per-expert GEMMs with the experts shared out among as many worker threads
  as there are intra-op threads, each GEMM on one thread (``ops.threads``): where experts get a few
  hundred rows, one GEMM split across threads loses a good part of its speed to the split.
- ``padded_bmm``: the touched experts' rows padded to the largest count, one ``torch.bmm`` per
  projection. Wins when loads are even and the padding is small.
- ``decode``: for a handful of tokens: no sort, no gather of rows into a buffer; assignments are
  grouped on the host and each touched expert's weights are read once by a matrix-vector product.
- ``native``: the same for a handful of tokens in one call of a small C kernel (``moegraph.native``),
  fused per touched expert; a candidate where a C compiler built it (forward only, like every
  strategy: the backward is the op's own). ``native_1t``: the same kernel on one thread, for
  machines where a decode call is bound by memory that one core already reads at full speed and a
  second thread only adds its start-up and join.
- ``native_bf16``: bfloat16 experts with a few to a few dozen rows each: the expert-sorted rows
  through one call of a C kernel that reads each expert's weights once for all its rows with
  AVX512-BF16 dot products (no GEMM call per expert); a candidate where that kernel runs.

Which one runs: a layer compiled with ``expert_strategy=NAME`` pins it (``pinned`` is entered
around the layer's forward); otherwise the tuner (``moegraph.tuning``) picks by measurement where
tuning is enabled, and the fixed heuristic of ``ops`` decides where it is not. A call whose backward
will run has forms of its own (``_train_forward``: grouped, one GEMM per expert, or the bfloat16
kernel, keeping what the backward needs), chosen under their own key; its backward has a grouped and
a per-expert form, of which ``gemm_form`` says the one worth running (so neither is timed).

Legend: T tokens, D model dim, F expert hidden dim, H up-projection rows (2F if gated), E experts,
U touched experts, M padded rows per expert, N assignments.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from . import ops
from .ops.args import ExpertArgs, RoutedRows

__all__ = ["STRATEGIES", "candidates", "run", "run_strategy", "train_candidates", "run_train_strategy",
           "pinned", "current_pin", "last_ran", "gemm_form", "DECODE_MAX_TOKENS", "THREADS_MIN_ROWS",
           "PADDED_MAX_WASTE", "NATIVE_BF16_MAX_ROWS"]

#: Largest token count for which the decode strategy is a candidate (its host-side grouping grows
#: with the assignments).
DECODE_MAX_TOKENS = 16

#: Fewest assignments per expert (on average) for which ``expert_threads`` is a candidate: below it
#: the GEMMs are too short for whole experts per thread to beat splitting each one.
THREADS_MIN_ROWS = 32

#: ``padded_bmm`` is no candidate where the experts average at least ``THREADS_MIN_ROWS`` rows (the
#: GEMMs, not the calls, take the time) and padding to the largest expert would multiply them by more
#: than this: it cannot win there, and timing it (fresh padded buffers every call) costs the most.
PADDED_MAX_WASTE = 1.5

#: Most assignments per expert (on average) for which ``native_bf16`` is a candidate: its four-row
#: register blocks lose to oneDNN's GEMMs once experts get many rows.
NATIVE_BF16_MAX_ROWS = 64


def _per_expert(args: ExpertArgs, packed) -> Tensor:
    return ops._expert_mlp_fast(args, packed, grouped=False)


def _grouped(args: ExpertArgs, packed) -> Tensor:
    return ops._expert_mlp_fast(args, None, grouped=True)


def _expert_threads(args: ExpertArgs, packed) -> Tensor:
    # CPU only: a worker thread would run GPU kernels on its own current stream, not the caller's.
    threads = torch.get_num_threads() if args.x_TD.device.type == "cpu" else 1
    return ops._expert_mlp_fast(args, packed, grouped=False, threads=threads)


def _padded_experts(counts: list[int]) -> list[int]:
    """The experts ``padded_bmm`` gives a slot of the padded batch: those with rows, or every expert where
    most have rows (the others' zero rows are never read back, and the weights are multiplied in place
    instead of copying the touched experts' weights on every call)."""
    touched = [e for e, c in enumerate(counts) if c]
    return list(range(len(counts))) if 2 * len(touched) >= len(counts) else touched


def _padded_bmm(args: ExpertArgs, packed) -> Tensor:
    (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated, gate_clamp,
     up_clamp) = args.positional()[:12]
    y_TD = ops.shared_into_output(args, packed)
    E, D = w_up_EHD.shape[0], x_TD.shape[1]
    order_N, exp_sorted, counts = ops._sort_by_expert(exp_N, E)
    n = len(order_N)
    if n == 0:
        return y_TD
    touched = _padded_experts(counts)
    U, M = len(touched), max(counts)
    # Slot u of the padded batch holds expert touched[u]; a row's position is its rank in its expert.
    starts, s = [], 0
    for c in counts:
        starts.append(s)
        s += c
    dev = x_TD.device
    slot_E = torch.zeros(E, dtype=torch.int64)
    slot_E[touched] = torch.arange(U)
    starts_E = torch.tensor(starts, dtype=torch.int64, device=dev)
    slot_N = slot_E.to(dev).index_select(0, exp_sorted)
    pos_N = torch.arange(n, device=dev) - starts_E.index_select(0, exp_sorted)
    flat_N = slot_N * M + pos_N
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
    x_UMD = x_TD.new_zeros(U * M, D)
    x_UMD.index_copy_(0, flat_N, x_TD.index_select(0, tok_sorted))
    x_UMD = x_UMD.view(U, M, D)
    idx_U = None if U == E else torch.tensor(touched, dtype=torch.int64, device=dev)
    w_up = w_up_EHD if idx_U is None else w_up_EHD.index_select(0, idx_U)
    w_down = w_down_EDF if idx_U is None else w_down_EDF.index_select(0, idx_U)
    h = torch.bmm(x_UMD, w_up.transpose(1, 2))  # [U, M, H]
    if b_up_EH is not None:
        h.add_((b_up_EH if idx_U is None else b_up_EH.index_select(0, idx_U)).unsqueeze(1))
    a = ops._activate_(h.view(U * M, -1), activation, gated, gate_clamp, up_clamp)
    a = a.contiguous().view(U, M, -1)
    o = torch.bmm(a, w_down.transpose(1, 2)).view(U * M, D).index_select(0, flat_N)  # [n, D]
    if b_down_ED is not None:
        o.add_(b_down_ED.index_select(0, exp_sorted))
    o.mul_(w_sorted)
    return y_TD.index_add_(0, tok_sorted, o)


def _decode(args: ExpertArgs, packed) -> Tensor:
    (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated, gate_clamp,
     up_clamp) = args.positional()[:12]
    y_TD = ops.shared_into_output(args, packed)
    E = w_up_EHD.shape[0]
    # One host sync for the (few) assignments; group them by expert on the host.
    exp_list, tok_list = exp_N.tolist(), tok_N.tolist()
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(exp_list):
        if 0 <= e < E:
            groups.setdefault(e, []).append(i)
    w_N = weight_N.to(x_TD.dtype).unsqueeze(-1)
    for e, idx in groups.items():
        if len(idx) == 1:  # one row: plain slices, no index tensors
            i, t = idx[0], tok_list[idx[0]]
            rows = x_TD[t : t + 1]
            w_R = w_N[i : i + 1]
            tok_R = None
        else:
            tok_R = torch.tensor([tok_list[i] for i in idx], dtype=torch.int64, device=x_TD.device)
            rows = x_TD.index_select(0, tok_R)
            w_R = w_N.index_select(0, torch.tensor(idx, dtype=torch.int64, device=x_TD.device))
        h = torch.mm(rows, w_up_EHD[e].t())
        if b_up_EH is not None:
            h.add_(b_up_EH[e])
        a = ops._activate_(h, activation, gated, gate_clamp, up_clamp).mul_(w_R)
        o = torch.mm(a, w_down_EDF[e].t())
        if b_down_ED is not None:
            o.addcmul_(w_R, b_down_ED[e].unsqueeze(0))
        if tok_R is None:
            y_TD[t : t + 1].add_(o)
        else:
            y_TD.index_add_(0, tok_R, o)
    return y_TD


def _native(args: ExpertArgs, packed, threads: int | None = None) -> Tensor:
    from . import native  # the C kernel, built on first use

    why = native.supports(args)
    lib = native.kernel(args.act) if why is None else None
    if lib is not None:
        return native.run_supported(args, lib, threads)
    if why is not None:
        native.warn_once(f"the native expert strategy cannot read these inputs ({why}); running 'decode'")
    _ran("decode")
    return _decode(args, packed)  # same result; kernel() already warned when there is no compiler


def _native_one_thread(args: ExpertArgs, packed) -> Tensor:
    return _native(args, packed, threads=1)


def _bf16_kernel_for(args: ExpertArgs, candidate: bool = False):
    """The bfloat16 kernel where it reads ``args`` (and the CPU has AVX512-BF16), else None; with
    ``candidate``, also None past NATIVE_BF16_MAX_ROWS rows per expert (not worth timing there)."""
    from . import native

    if candidate and (args.x_TD.dtype != torch.bfloat16
                      or args.exp_N.numel() > NATIVE_BF16_MAX_ROWS * args.w_up_EHD.shape[0]):
        return None
    return native.bf16_kernel(args.act) if native.bf16_supports(args) is None else None


def _native_bf16(args: ExpertArgs, packed) -> Tensor:
    from . import native  # the C kernel, built on first use

    lib = _bf16_kernel_for(args)
    if lib is None:  # not bfloat16 / no AVX512-BF16 here: the same result by per-expert GEMMs
        _ran("per_expert")
        return _per_expert(args, packed)
    y_TD = ops.shared_into_output(args, packed)
    order_N, _, counts = ops._sort_by_expert(args.exp_N, args.w_up_EHD.shape[0])
    if len(order_N) == 0:
        return y_TD
    tok_sorted = args.tok_N.index_select(0, order_N)
    o_ND = native.run_bf16_rows(lib, args, args.x_TD.index_select(0, tok_sorted), counts,
                                args.weight_N.index_select(0, order_N))
    return y_TD.float().index_add_(0, tok_sorted, o_ND).to(y_TD.dtype)


def _train_forward(args: ExpertArgs, grouped: bool, lib=None) -> Tensor:
    """The forward of a call whose backward will run: grouped or per-expert GEMMs as chosen (or the
    bfloat16 kernel ``lib``, from ``native.bf16_kernel``), keeping the sorted rows and the up
    projection for the backward (``ops.SavedForward``)."""
    (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED) = args.positional()[:8]
    y_TD = ops.shared_into_output(args)
    order_N, exp_sorted, counts = ops._sort_by_expert(exp_N, w_up_EHD.shape[0])
    n = len(order_N)
    if n == 0:
        return y_TD
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
    x_ND = x_TD.index_select(0, tok_sorted)
    if lib is not None:
        from . import native

        h = x_ND.new_empty(n, w_up_EHD.shape[1])
        o_ND = native.run_bf16_rows(lib, args, x_ND, counts, weight_N.index_select(0, order_N), h_out_NH=h)
        y_TD = y_TD.float().index_add_(0, tok_sorted, o_ND).to(y_TD.dtype)
        ops.stash_forward(y_TD, ops.SavedForward(order_N, exp_sorted, counts, tok_sorted, x_ND, h))
        return y_TD
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x_TD.device, dtype=torch.int32)
    gmm = torch._grouped_mm if grouped else _LoopGemm(counts)
    h = gmm(x_ND, w_up_EHD.transpose(1, 2), offs=offs)
    if b_up_EH is not None:
        h.add_(b_up_EH.index_select(0, exp_sorted))
    a = ops.apply_activation(h, *args.activation_args) * w_sorted  # out of place: h stays for the backward
    o = gmm(a, w_down_EDF.transpose(1, 2), offs=offs)
    if b_down_ED is not None:
        o.addcmul_(w_sorted, b_down_ED.index_select(0, exp_sorted))
    y_TD.index_add_(0, tok_sorted, o)
    ops.stash_forward(y_TD, ops.SavedForward(order_N, exp_sorted, counts, tok_sorted, x_ND, h))
    return y_TD


def _expert_rows(counts: list[int]):
    """(expert, slice of its sorted rows) for each expert that received rows."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c)
            start += c


#: name -> forward(args, packed) with ``args`` the expert op's arguments (``ops.ExpertArgs``).
STRATEGIES: dict[str, Callable[[ExpertArgs, object], Tensor]] = {
    "per_expert": _per_expert,
    "grouped_mm": _grouped,
    "expert_threads": _expert_threads,
    "padded_bmm": _padded_bmm,
    "decode": _decode,
    "native": _native,
    "native_1t": _native_one_thread,
    "native_bf16": _native_bf16,
}


#: what ``torch._grouped_mm`` multiplies (float64 is refused: "Expected mat_a to be Float32, BFloat16 or Float16")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_fits(x_TD: Tensor, w_up_EHD: Tensor) -> bool:
    """torch._grouped_mm runs here: it exists, takes this dtype, and every row stride is a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x_TD.device.type != "cpu" or x_TD.dtype not in GROUPED_MM_DTYPES \
            or w_up_EHD.dtype not in GROUPED_MM_DTYPES:
        return False
    per_16 = max(1, 16 // x_TD.element_size())
    E, H, D = w_up_EHD.shape
    return D % per_16 == 0 and H % per_16 == 0 and (H // 2 if H % 2 == 0 else H) % per_16 == 0


def candidates(x_TD: Tensor, w_up_EHD: Tensor, args: ExpertArgs | None = None) -> list[str]:
    """The strategies worth timing for this input (each one is exact wherever it runs); ``native``
    only with the call's ``args``, where its kernel reads them and builds here."""
    names = ["per_expert"]
    if grouped_mm_fits(x_TD, w_up_EHD):
        names.append("grouped_mm")
    if args is not None and torch.get_num_threads() > 1 and x_TD.device.type == "cpu" \
            and args.exp_N.numel() >= THREADS_MIN_ROWS * w_up_EHD.shape[0]:
        names.append("expert_threads")
    if args is None or not _padding_hopeless(args):
        names.append("padded_bmm")
    if args is not None and _bf16_kernel_for(args, candidate=True) is not None:
        names.append("native_bf16")
    if x_TD.shape[0] <= DECODE_MAX_TOKENS:
        names.append("decode")
        if args is not None:
            from . import native

            if native.supports(args) is None and native.kernel(args.act) is not None:
                names.append("native")
                if torch.get_num_threads() > 1:
                    names.append("native_1t")
    return names


def _padding_hopeless(args: ExpertArgs) -> bool:
    """Whether ``padded_bmm`` would do more than ``PADDED_MAX_WASTE`` times the GEMM work of the others
    on a call whose GEMMs take the time (see ``PADDED_MAX_WASTE``)."""
    E = args.w_up_EHD.shape[0]
    exp_N = args.exp_N
    if exp_N.numel() < THREADS_MIN_ROWS * E:
        return False
    kept = exp_N[(exp_N >= 0) & (exp_N < E)]
    counts = torch.bincount(kept, minlength=E).tolist()
    return max(counts) * len(_padded_experts(counts)) > PADDED_MAX_WASTE * max(1, kept.numel())


def run_strategy(name: str, args: ExpertArgs | tuple, packed=None) -> Tensor:
    """Run one named strategy on the expert op's arguments (an ``ExpertArgs`` or the positional tuple)."""
    args = ExpertArgs.of(args)
    if name == "grouped_mm" and not grouped_mm_fits(args.x_TD, args.w_up_EHD):
        name = "padded_bmm"  # no usable grouped GEMM here: the nearest strategy with the same result
    _ran(name)  # (a strategy that falls back itself says so again)
    return STRATEGIES[name](args, packed)


_PIN = threading.local()
_RAN = threading.local()


def last_ran() -> str | None:
    """The strategy (or training form) that last computed an expert op's forward on this thread, after any
    fallback (a ``native_bf16`` pin in float32 runs ``per_expert``, ``grouped_mm`` without usable grouped
    GEMMs ``padded_bmm``, ``native`` where its kernel cannot run ``decode``); None before the first call."""
    return getattr(_RAN, "name", None)


def _ran(name: str | None) -> None:
    _RAN.name = name


def current_pin() -> str | None:
    return getattr(_PIN, "name", None)


@contextlib.contextmanager
def pinned(name: str | None):
    """Within the block, the expert op runs strategy ``name`` (None: choose as usual)."""
    if name is not None and name not in STRATEGIES:
        from .errors import InputError

        raise InputError(f"unknown expert strategy {name!r}; choose one of {', '.join(STRATEGIES)} or 'auto'")
    prev = current_pin()
    _PIN.name = name
    try:
        yield
    finally:
        _PIN.name = prev


def heuristic(args: ExpertArgs) -> str:
    """The fixed rule used where tuning is off: grouped GEMMs for small float32 experts."""
    small = ops._small_experts(args.w_up_EHD, args.w_down_EDF)
    return "grouped_mm" if small and grouped_mm_fits(args.x_TD, args.w_up_EHD) else "per_expert"


def gemm_form(x: Tensor, w_up_EHD: Tensor) -> str:
    """The one GEMM form of the training forward and backward worth running: ``grouped_mm`` where it
    runs, else ``per_expert``.

    ``grouped_mm_fits`` holds only on a CPU, where ``torch._grouped_mm`` is torch's fallback: one
    ``mm_out`` per group, the very GEMMs (same slices, same library, same results bit for bit) that
    ``_LoopGemm`` issues one Python call at a time. So the per-expert forms cannot beat the grouped
    ones there (they only add the Python calls), and timing both would only cost tuning time."""
    return "grouped_mm" if grouped_mm_fits(x, w_up_EHD) else "per_expert"


def train_candidates(args: ExpertArgs) -> list[str]:
    """The forms of a training forward (``_train_forward``) worth timing for this input: one GEMM
    form (see ``gemm_form``) and the bfloat16 kernel where it runs."""
    names = [gemm_form(args.x_TD, args.w_up_EHD)]
    if _bf16_kernel_for(args, candidate=True) is not None:
        names.append("native_bf16")
    return names


def run_train_strategy(name: str, args: ExpertArgs) -> Tensor:
    """A training forward in form ``name``: grouped GEMMs for ``grouped_mm`` (where they run here), the
    bfloat16 kernel for ``native_bf16`` (where it runs here), one GEMM per expert otherwise."""
    if name == "native_bf16":
        lib = _bf16_kernel_for(args)
        if lib is not None:
            _ran(name)
            return _train_forward(args, grouped=False, lib=lib)
    grouped = name == "grouped_mm" and grouped_mm_fits(args.x_TD, args.w_up_EHD)
    _ran("grouped_mm" if grouped else "per_expert")
    return _train_forward(args, grouped=grouped)


def run(args: ExpertArgs | tuple, packed=None) -> Tensor:
    """The expert op's forward: the pinned strategy, else the tuner's choice, else the heuristic.

    A call whose backward will run chooses among the training forms (which keep what the backward
    needs) under its own tuner key: their speed ranks differently from the inference forms'."""
    args = ExpertArgs.of(args)
    name = current_pin()
    training = name != "decode" and ops.is_training_call(args.x_TD, args.w_up_EHD, args.w_down_EDF, args.b_up_EH,
                                                         args.b_down_ED, args.weight_N)
    if name is None:
        from . import tuning

        tuner = tuning.active_tuner()
        if tuner is None:
            name = heuristic(args)
        elif training:
            name = tuner.choose_train(args)
        else:
            name = tuner.choose(args, packed)
    if training:
        return run_train_strategy(name, args)
    return run_strategy(name, args, packed)


# ----------------------------------------------------------------------------------------------
# The backward's routed part: per-expert GEMMs (ops) or grouped GEMMs, chosen the same way.
# ``rows`` is an ``ops.RoutedRows``; ``grads`` holds gw_sorted [n] (written when ``want_out``) and
# gb_up/gb_down ([E, ...] or None, written); the strategy sets gw_up and gw_down.
# ----------------------------------------------------------------------------------------------


class _LoopGemm:
    """``torch._grouped_mm``'s two forms (2-D x 3-D: rows of group e times b[e]; 2-D x 2-D: the
    per-group products stacked [E, ...]) as one plain GEMM per group, written into slices."""

    def __init__(self, counts: list[int]):
        self.counts = counts

    def __call__(self, a: Tensor, b: Tensor, offs=None) -> Tensor:
        if b.dim() == 3:  # a [n, K] x b [E, K, N] -> [n, N]
            out = a.new_empty(a.shape[0], b.shape[2])
            for e, rows in _expert_rows(self.counts):
                torch.mm(a[rows], b[e], out=out[rows])
            return out
        # a [K, n] x b [n, N] -> [E, K, N]: the weight gradients, fresh every step (ops.empty_huge)
        out = ops.empty_huge((len(self.counts), a.shape[0], b.shape[1]), a.dtype, a.device)
        for e, rows in _expert_rows(self.counts):
            torch.mm(a[:, rows], b[rows], out=out[e])
        for e, c in enumerate(self.counts):
            if c == 0:
                out[e].zero_()
        return out


def _grouped_backward(rows: RoutedRows, grads: dict, gmm=None) -> Tensor:
    """The routed experts' gradients with every projection's input and weight gradient as one grouped
    GEMM (``gmm``: torch._grouped_mm, or one GEMM per expert) and the elementwise work done once over
    all rows. The up projection comes from the forward where it was kept; the down projection is
    not recomputed (see ``ops._mlp_grads``)."""
    x_ND, gy_ND, w_sorted, exp_sorted, counts = rows.x_ND, rows.gy_ND, rows.w_sorted, rows.exp_sorted, rows.counts
    w_up_EHD, w_down_EDF, b_up_EH, b_down_ED = rows.w_up_EHD, rows.w_down_EDF, rows.b_up_EH, rows.b_down_ED
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x_ND.device, dtype=torch.int32)
    gmm = gmm or torch._grouped_mm
    h = rows.h_ND
    if h is None:  # the forward did not keep it: recompute
        h = gmm(x_ND, w_up_EHD.transpose(1, 2), offs=offs)  # [n, H]
        if b_up_EH is not None:
            h = h + b_up_EH.index_select(0, exp_sorted)
    a, saved = ops._act_saved(h, *rows.activation_args)
    gyw = gmm(gy_ND, w_down_EDF, offs=offs)  # [n, F]
    if rows.want_out:
        gws = (gyw * a).sum(-1)
        if b_down_ED is not None:
            gws += (gy_ND * b_down_ED.index_select(0, exp_sorted)).sum(-1)
        grads["gw_sorted"].copy_(gws)
    # Weight gradients: 2-D x 2-D grouped GEMMs, grouped along the rows, one GEMM per expert into
    # an output on huge pages (torch._grouped_mm has no out=; on a CPU it runs these same GEMMs, see
    # gemm_form); the routing weight scales the F-wide activations, not the D-wide output gradients.
    wgrad = _LoopGemm(counts)
    grads["gw_down"] = wgrad(gy_ND.t(), (a * w_sorted).contiguous())
    if b_down_ED is not None:
        grads["gb_down"].zero_().index_add_(0, exp_sorted, gy_ND * w_sorted)
    gh = ops._act_backward(gyw.mul_(w_sorted), saved, *rows.activation_args).contiguous()
    grads["gw_up"] = wgrad(gh.t(), x_ND)
    if b_up_EH is not None:
        grads["gb_up"].zero_().index_add_(0, exp_sorted, gh)
    if 0 in counts:  # experts without rows: zero gradients, whatever the grouped GEMM left there
        ops._zero_untouched(grads, counts)
    return gmm(gh, w_up_EHD, offs=offs) if rows.want_x else None


def _per_expert_backward(rows: RoutedRows, grads: dict) -> Tensor:
    return _grouped_backward(rows, grads, gmm=_LoopGemm(rows.counts))


#: name -> backward(rows, grads) for the routed experts.
BACKWARD_STRATEGIES: dict[str, Callable[[RoutedRows, dict], Tensor]] = {
    "per_expert": _per_expert_backward,
    "grouped_mm": _grouped_backward,
}


def _backward_fits(rows: RoutedRows) -> bool:
    x_ND, w_up_EHD = rows.x_ND, rows.w_up_EHD
    # 2-D x 2-D grouped GEMMs also need the sorted row count aligned (it is a stride of go.t()).
    return grouped_mm_fits(x_ND, w_up_EHD) and x_ND.shape[0] % max(1, 16 // x_ND.element_size()) == 0


def backward_candidates(rows: RoutedRows) -> list[str]:
    """The backward forms worth timing: one (see ``gemm_form``), so the backward is not timed."""
    return ["grouped_mm" if _backward_fits(rows) else "per_expert"]


def run_backward_strategy(name: str, rows: RoutedRows, grads: dict) -> Tensor:
    if name == "grouped_mm" and not _backward_fits(rows):
        name = "per_expert"
    return BACKWARD_STRATEGIES[name](rows, grads)


def run_backward(rows: RoutedRows, grads: dict) -> Tensor:
    """The routed part of the op's backward: pinned grouped/per-expert, else tuned, else per-expert."""
    pin = current_pin()
    if pin is not None:
        name = "grouped_mm" if pin == "grouped_mm" else "per_expert"
    else:
        from . import tuning

        tuner = tuning.active_tuner()
        name = "per_expert" if tuner is None else tuner.choose_backward(rows, grads)
    return run_backward_strategy(name, rows, grads)
