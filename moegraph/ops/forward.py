"""The expert op's forward paths: the differentiable reference (``_expert_mlp_impl``) and the
inference path with fewer copies (``_expert_mlp_fast``: per-expert GEMMs into reused buffers, or one
grouped GEMM per projection).

Legend: T tokens, D model dim, F expert hidden dim, H up-projection width, E experts, N assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .args import ExpertArgs
from .activation import _activate_, apply_activation, mlp_forward
from .threads import run_split
from .workspace import _linear, _PackedExperts, _workspace


def _sort_by_expert(exp_N: Tensor, E: int) -> tuple[Tensor, Tensor, list[int]]:
    """Assignments grouped by expert, stable within an expert; dropped ones (id outside [0, E)) left out.

    Returns order_N [n] (positions of the kept assignments, by expert), exp_sorted [n] (their experts)
    and counts (assignments per expert, a list of E ints: the one host sync of the op).
    """
    key_N = torch.where((exp_N >= 0) & (exp_N < E), exp_N, E)
    key_sorted_N, order_N = torch.sort(key_N, stable=True)
    counts = torch.bincount(key_sorted_N, minlength=E + 1)[:E].tolist()
    n = sum(counts)
    return order_N[:n], key_sorted_N[:n], counts


def _expert_mlp_impl(*args: Any) -> Tensor:
    """Differentiable reference implementation of the op (an ``ExpertArgs``, or its positional fields)."""
    (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated, gate_clamp, up_clamp,
     shared_w_up_HD, shared_w_down_DF, shared_scale_T) = ExpertArgs.of(*args).positional()
    T, D = x_TD.shape
    E = w_up_EHD.shape[0]
    out_dtype = x_TD.dtype
    # Step 1: the shared experts run on every token, straight into the output buffer.
    if shared_w_up_HD is not None:
        a = apply_activation(F.linear(x_TD, shared_w_up_HD), activation, gated, gate_clamp, up_clamp)
        if shared_scale_T is not None:
            a = a * shared_scale_T.to(a.dtype).unsqueeze(-1)
        y_TD = F.linear(a, shared_w_down_DF)
    else:
        y_TD = x_TD.new_zeros(T, D)
    if exp_N.numel() == 0:
        return y_TD
    # Step 2: sort assignments by expert; dropped ones (id outside [0, E)) are left out.
    order_N, _, counts = _sort_by_expert(exp_N, E)
    if len(order_N) == 0:
        return y_TD
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N)
    x_ND = x_TD.index_select(0, tok_sorted)
    # Step 3: one GEMM pair per expert that received rows.
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = x_ND[start : start + n]
        outs.append(
            mlp_forward(
                rows,
                w_up_EHD[e],
                w_down_EDF[e],
                None if b_up_EH is None else b_up_EH[e],
                None if b_down_ED is None else b_down_ED[e],
                activation,
                gated,
                gate_clamp,
                up_clamp,
            )
        )
        start += n
    o_ND = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    # Step 4: weight and combine per token.
    o_ND = o_ND * w_sorted.to(o_ND.dtype).unsqueeze(-1)
    return y_TD.index_add(0, tok_sorted, o_ND.to(out_dtype))



def _small_experts(w_up_EHD: Tensor, w_down_EDF: Tensor) -> bool:
    from .. import ops  # SMALL_EXPERT_WEIGHTS lives on the package, where callers (and tests) change it

    # torch._grouped_mm needs every row stride to be a multiple of 16 bytes (D and F of 4 floats).
    aligned = (w_up_EHD.shape[2] * w_up_EHD.element_size()) % 16 == 0 and \
        (w_down_EDF.shape[2] * w_down_EDF.element_size()) % 16 == 0
    return (w_up_EHD[0].numel() <= ops.SMALL_EXPERT_WEIGHTS and hasattr(torch, "_grouped_mm") and aligned
            and w_up_EHD.device.type == "cpu" and w_up_EHD.dtype == torch.float32)


def shared_into_output(args: ExpertArgs, packed: _PackedExperts | None = None) -> Tensor:
    """Step 1 of every inference strategy: the shared experts' output (or zeros) as the [T, D] buffer
    the routed rows are then added into (oneDNN-packed shared weights where ``packed`` has them)."""
    x_TD, s_up, s_down, s_scale = args.x_TD, args.shared_w_up_HD, args.shared_w_down_DF, args.shared_scale_T
    if s_up is None:
        return x_TD.new_zeros(x_TD.shape)
    hs = _linear(x_TD, s_up, packed.shared_up if packed else None)
    a = _activate_(hs, *args.activation_args)
    if s_scale is not None:
        a.mul_(s_scale.to(a.dtype).unsqueeze(-1))
    return _linear(a, s_down, packed.shared_down if packed else None)


def _expert_mlp_fast(args: ExpertArgs, packed: _PackedExperts | None = None, grouped: bool | None = None,
                     threads: int = 1) -> Tensor:
    """The inference path: same result as _expert_mlp_impl with fewer copies.

    ``grouped`` chooses one grouped GEMM per projection (True) or one GEMM pair per expert (False);
    None leaves it to the fixed rule ``_small_experts`` (``moegraph.strategies`` chooses otherwise).
    With ``threads`` > 1 the per-expert GEMMs run on that many worker threads, each taking whole
    experts on one intra-op thread (``_per_expert_split``).

    GEMMs write into preallocated buffers (``out=``), the bias, activation (in place) and routing
    weight run once over all rows, the routing weight scales the F-wide hidden rows instead of the
    D-wide outputs, and the shared experts write the output buffer that the routed rows are then
    added into.
    """
    (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated, gate_clamp,
     up_clamp) = args.positional()[:12]
    D = x_TD.shape[1]
    E = w_up_EHD.shape[0]
    y_TD = shared_into_output(args, packed)  # step 1
    if exp_N.numel() == 0:
        return y_TD
    # Step 2: sort assignments by expert; dropped ones (outside [0, E)) are left out.
    order_N, exp_sorted, counts = _sort_by_expert(exp_N, E)
    n_valid = len(order_N)
    if n_valid == 0:
        return y_TD
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
    ws = _workspace(x_TD.dtype, x_TD.device)
    grouped = _small_experts(w_up_EHD, w_down_EDF) if grouped is None else grouped
    x_ND = ws.get("x", n_valid, D)
    split = threads > 1 and not grouped
    if not split:  # (split: each worker thread gathers its own rows, see _per_expert_split)
        torch.index_select(x_TD, 0, tok_sorted, out=x_ND)
    if grouped:
        # Step 3 (small experts): per-call overhead dominates, so one grouped GEMM per projection.
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x_TD.device, dtype=torch.int32)
        h = torch._grouped_mm(x_ND, w_up_EHD.transpose(1, 2), offs=offs)
        if b_up_EH is not None:
            h.add_(b_up_EH.index_select(0, exp_sorted))
        a = _activate_(h, activation, gated, gate_clamp, up_clamp).mul_(w_sorted)
        o = torch._grouped_mm(a.contiguous(), w_down_EDF.transpose(1, 2), offs=offs)
        if b_down_ED is not None:
            o.addcmul_(w_sorted, b_down_ED.index_select(0, exp_sorted))
        return y_TD.index_add_(0, tok_sorted, o)
    # Step 3: one GEMM per expert and projection, written into all rows' buffers (one run of them,
    # or one per worker thread).
    rows = _Rows(x_ND, tok_sorted, exp_sorted, w_sorted, counts, ws.get("h", n_valid, w_up_EHD.shape[1]),
                 ws.get("a", n_valid, w_down_EDF.shape[2]) if gated else None, ws.get("o", n_valid, D))
    o = _per_expert_split(args, packed, rows, threads) if split else _per_expert_rows(args, packed, rows)
    # Step 4: combine per token.
    return y_TD.index_add_(0, tok_sorted, o)


@dataclass(frozen=True)
class _Rows:
    """A run of expert-sorted rows and the buffers of its per-expert GEMMs: x_ND [n, D] rows,
    tok_sorted [n] their tokens, exp_sorted [n] their experts, w_sorted [n, 1] their routing weights,
    counts (E ints: rows of each expert in this run), h_NH, a_NF (gated only, else None), o_ND: the
    up projection, activation and output buffers."""

    x_ND: Tensor
    tok_sorted: Tensor
    exp_sorted: Tensor
    w_sorted: Tensor
    counts: list[int]
    h_NH: Tensor
    a_NF: Tensor | None
    o_ND: Tensor

    def part(self, start: int, end: int, counts: list[int]) -> _Rows:
        """Rows start:end, whose experts' counts are ``counts``."""
        rows = slice(start, end)
        return _Rows(self.x_ND[rows], self.tok_sorted[rows], self.exp_sorted[rows], self.w_sorted[rows], counts,
                     self.h_NH[rows], None if self.a_NF is None else self.a_NF[rows], self.o_ND[rows])


def _per_expert_rows(args: ExpertArgs, packed: _PackedExperts | None, rows: _Rows) -> Tensor:
    """Step 3 of the per-expert path on ``rows``: their routed outputs (weighted), in ``rows.o_ND``.

    The bias, the activation and the routing weight run once over all rows (per-expert small ops cost
    more than the GEMMs gain at a few rows per expert).
    """
    h = _gemm_per_expert(rows.x_ND, args.w_up_EHD, packed.up if packed else None, rows.counts, rows.h_NH)
    if args.b_up_EH is not None:
        h.add_(args.b_up_EH.index_select(0, rows.exp_sorted))
    a = _activate_(h, *args.activation_args, out=rows.a_NF).mul_(rows.w_sorted)
    o = _gemm_per_expert(a, args.w_down_EDF, packed.down if packed else None, rows.counts, rows.o_ND)
    if args.b_down_ED is not None:
        o.addcmul_(rows.w_sorted, args.b_down_ED.index_select(0, rows.exp_sorted))
    return o


def _per_expert_split(args: ExpertArgs, packed: _PackedExperts | None, rows: _Rows, threads: int) -> Tensor:
    """Step 3 with the experts cut into ``threads`` runs of about equal rows, each run's GEMMs and
    elementwise steps on its own worker thread with one intra-op thread (``threads.run_split``).
    Every row goes through the same operations as in ``_per_expert_rows``; the runs write disjoint
    rows of the shared buffers. Each run also gathers its own rows into ``rows.x_ND``: a gather on
    the caller's intra-op threads just before would leave them spinning for work (OpenMP's wait
    policy) on the cores the workers start on."""
    n = rows.x_ND.shape[0]
    parts, start, e0, seen = [], 0, 0, 0
    for e, c in enumerate(rows.counts):
        seen += c
        # Close a run at the expert that takes it past its share of the rows (the last run takes the rest).
        if c and seen >= n * (len(parts) + 1) / threads and len(parts) < threads - 1:
            parts.append(rows.part(start, seen, [0] * e0 + rows.counts[e0:e + 1] + [0] * (len(rows.counts) - e - 1)))
            start, e0 = seen, e + 1
    if start < n:
        parts.append(rows.part(start, n, [0] * e0 + rows.counts[e0:]))

    def run(part: _Rows) -> Tensor:
        torch.index_select(args.x_TD, 0, part.tok_sorted, out=part.x_ND)
        return _per_expert_rows(args, packed, part)

    run_split(run, parts)
    return rows.o_ND


def _gemm_per_expert(a_NI: Tensor, w_EOI: Tensor, packed: list[Tensor] | None, counts: list[int],
                     out_NO: Tensor) -> Tensor:
    """Rows of expert e (sorted by expert, ``counts`` per expert) times w_EOI[e]^T, into out_NO [n, O].

    With oneDNN-packed weights (``packed``, one per expert) the GEMMs run there and their outputs are
    concatenated into ``out_NO`` in one copy; in float32 a single row runs MKL's GEMV on the plain
    weight instead (it wins at one row in float32, not in bfloat16).
    """
    gemv_wins = a_NI.dtype == torch.float32
    parts, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        if packed is None or (n == 1 and gemv_wins):
            if packed is None:
                torch.mm(a_NI[start:end], w_EOI[e].t(), out=out_NO[start:end])
            else:
                parts.append(torch.mm(a_NI[start:end], w_EOI[e].t()))
        else:
            parts.append(_linear(a_NI[start:end], w_EOI[e], packed[e]))
        start = end
    if parts:
        torch.cat(parts, out=out_NO)
    return out_NO

