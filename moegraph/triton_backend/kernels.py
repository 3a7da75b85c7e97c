"""Launchers of the rendered Triton kernels (no host synchronisation anywhere on the forward path).

Every grid is a function of tensor shapes only: the expert MLP launches over the worst-case number
of BLOCK_M-row blocks and blocks past the last expert exit at once. The kernels' source comes from
``codegen_templates/triton_*.py.j2`` rendered with a context decided here.

Legend: T tokens, D model dim, F expert hidden dim, E routed experts, K experts per token,
N routed assignments, SH shared chunks (shared hidden size S = SH * F), N_ext = N + SH * T.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..codegen_safe import Code
from .. import semantics
from ..semantics.expr import FUNCTIONS, constant
from ..semantics.routing import TopKPolicy
from ..semantics.scores import SCORE_EXPR_FUNCTIONS, SCORE_FUNCTIONS, emit_score, score_expression, score_tree
from ..ops.args import ExpertArgs
from ..semantics.torch_forms import activate
from . import configs
from .render import interpreting, render_to_module

__all__ = ["expert_mlp", "prepare", "MLPLaunch", "align", "route_topk", "score_to_triton", "router_supported"]

# Alignment tiling: assignments per count/scatter program, experts per scan program, chunk rows per
# scan step, blocks per offsets step; above ALIGN_MAX_BINS expert bins the alignment runs in torch.
ALIGN_CHUNK = 128
ALIGN_EB = 64
ALIGN_PB = 32
ALIGN_BB = 64
ALIGN_MAX_BINS = 1024
COMBINE_BLOCK_D = 1024


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: what the expert and router kernels compute in (they accumulate in float32; Triton's interpreter has no bfloat16)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse a compute dtype the kernels do not take (float64 ran through float32 accumulators into garbage)."""
    if dtype not in TRITON_DTYPES:
        raise InputError(f"the triton backend computes in float32, float16 or bfloat16, not {dtype}; compile with "
                         f"backend='torch' for {dtype}")


def check_device(*tensors: Tensor | None) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (which has no bfloat16)."""
    interp = interpreting()
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda and not interp:
            raise InputError(
                f"the triton backend got a tensor on {t.device}; it runs on CUDA devices, or on CPU with "
                "TRITON_INTERPRET=1 set before triton is imported. Compile with "
                "backend='torch' on this machine"
            )
        if interp and t.dtype == torch.bfloat16:
            raise InputError(
                "Triton's interpreter (TRITON_INTERPRET=1) has no bfloat16; run the triton backend in "
                "float16/float32 on CPU, or on a GPU"
            )


@lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str | None:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return None


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _align_module_for(has_shared: bool, interpret: bool) -> ModuleType:
    """The alignment kernels' module, once per variant and Triton mode."""
    return render_to_module("triton_align.py.j2", {"has_shared": has_shared})


def max_blocks(N_ext: int, E_ext: int, block_m: int) -> int:
    """Upper bound of sum_e cdiv(count_e, BLOCK_M) over any split of N_ext rows into E_ext experts.

    Each non-empty expert adds at most BLOCK_M - 1 padding rows and at most min(E_ext, N_ext) are
    non-empty; each block holds at least one row.
    """
    return min(N_ext, (N_ext + min(E_ext, N_ext) * (block_m - 1)) // block_m)


def align(exp_N: Tensor, T: int, E: int, SH: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """Sort assignments by expert, padded per expert to ``block_m`` rows (moe_align_block_size).

    Args:
        exp_N: [N] expert of each routed assignment (ids outside [0, E) are dropped).
        T: tokens (shared assignment N + j*T + t sends token t to shared chunk j = expert E + j).
        E: routed experts; SH: shared chunks.
    Returns:
        sorted_R: [R] int32 assignment ids sorted by expert, each expert's run padded with N_ext;
        block_expert_B: [B] int32 expert of each block of ``block_m`` rows, -1 past the last one;
        B, the number of blocks launched over (R = B * block_m).
    """
    N = exp_N.numel()
    N_ext = N + SH * T
    E_ext = E + SH
    B = max_blocks(N_ext, E_ext, block_m)
    R = B * block_m
    dev = exp_N.device
    sorted_R = torch.empty(R, dtype=torch.int32, device=dev)
    block_expert_B = torch.empty(B, dtype=torch.int32, device=dev)
    if B == 0:
        return sorted_R, block_expert_B, 0
    NB = max(_pow2(E_ext + 1), ALIGN_EB)
    if NB > ALIGN_MAX_BINS:  # one expert histogram no longer fits a program's registers
        _align_torch(exp_N, T, E, SH, block_m, sorted_R, block_expert_B)
        return sorted_R, block_expert_B, B
    mod = _align_module_for(SH > 0, interpreting())
    P = triton_cdiv(N_ext, ALIGN_CHUNK)
    table = torch.empty(P, NB, dtype=torch.int32, device=dev)
    counts = torch.empty(NB, dtype=torch.int32, device=dev)
    offsets = torch.empty(NB, dtype=torch.int32, device=dev)
    exp_N = exp_N.contiguous()
    mod.align_count[(triton_cdiv(R, ALIGN_CHUNK),)](exp_N, table, sorted_R, N, N_ext, T, E, E_ext, R,
                                                   CHUNK=ALIGN_CHUNK, NB=NB)
    mod.align_scan[(NB // ALIGN_EB,)](table, counts, P, NB=NB, EB=ALIGN_EB, PB=ALIGN_PB)
    mod.align_offsets[(1,)](counts, offsets, block_expert_B, E_ext, B, BLOCK_M=block_m, NB=NB, BB=ALIGN_BB)
    mod.align_scatter[(P,)](exp_N, table, offsets, sorted_R, N, N_ext, T, E, E_ext, CHUNK=ALIGN_CHUNK, NB=NB)
    return sorted_R, block_expert_B, B


def _align_torch(exp_N: Tensor, T: int, E: int, SH: int, block_m: int, sorted_R: Tensor, block_expert_B: Tensor) -> None:
    """The same alignment with torch ops (for very many experts); also free of host synchronisation."""
    N = exp_N.numel()
    N_ext, E_ext, R, dev = N + SH * T, E + SH, sorted_R.numel(), exp_N.device
    key = torch.where((exp_N >= 0) & (exp_N < E), exp_N, E_ext)
    if SH:
        key = torch.cat([key, torch.arange(E, E_ext, device=dev).repeat_interleave(T)])
    key_sorted, order = torch.sort(key, stable=True)
    counts = torch.zeros(E_ext + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E_ext]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    e = key_sorted.clamp(max=E_ext - 1)
    rank = torch.arange(N_ext, device=dev) - (torch.cumsum(counts, 0) - counts)[e]
    # Dropped assignments write to a spare slot R that is cut off afterwards.
    pos = torch.where(key_sorted < E_ext, (ends - padded)[e] + rank, R)
    buf = torch.full((R + 1,), N_ext, dtype=torch.int32, device=dev).scatter_(0, pos, order.to(torch.int32))
    sorted_R.copy_(buf[:R])
    starts_B = torch.arange(block_expert_B.numel(), device=dev) * block_m
    expert_B = torch.searchsorted(ends, starts_B, right=True)
    block_expert_B.copy_(torch.where(starts_B < ends[-1], expert_B, -1))


# ----------------------------------------------------------------------------------------------
# Grouped expert MLP
# ----------------------------------------------------------------------------------------------

#: Triton spellings of the expression language's functions (semantics.expr.FUNCTIONS)
_TRITON_ACT_CALLS = {n: f.triton for n, f in FUNCTIONS.items()}


def _fmt(v: float | None) -> float | None:
    return None if v is None else float(v)


#: integer exponents up to this size are multiplied out; larger ones go through exp and log of |base|
_POW_MULTIPLY = 16


def _triton_pow(base: str, c: float | None, exponent: str) -> str:
    """Triton code for ``base ** exponent`` with torch's meaning; ``c`` is the exponent's value when it is a
    constant (after folding), else None.

    Triton has no pow: ``exp(c * log(base))`` is NaN for a negative base, which torch gives only for a
    non-integer exponent. An integer constant is therefore multiplied out (up to ``_POW_MULTIPLY`` factors)
    or taken as ``|base| ** n`` with the sign restored for odd n, and a negative one is the reciprocal.
    """
    if c is not None and c.is_integer():
        n = abs(int(c))
        if n == 0:
            return f"(tl.zeros_like({base}) + 1.0)"  # 1 for every base, as torch (inf and NaN too)
        if n <= _POW_MULTIPLY:
            power = "(" + " * ".join([base] * n) + ")"
        else:
            power = f"tl.exp({float(n)!r} * tl.log(tl.abs({base})))"
            if n % 2:
                power = f"tl.where({base} < 0, -{power}, {power})"
        return f"(1.0 / {power})" if c < 0 else power
    if c == 0.5:
        return f"tl.sqrt({base})"
    return f"tl.exp({exponent} * tl.log({base}))"  # NaN for a negative base, as torch for a non-integer exponent


def activation_source(act: semantics.Activation) -> tuple[list[Code], Code]:
    """The Triton body of an activation (assignment lines, returned expression), from its expression."""
    names = {v: v for v in act.variables}
    lines, (out,) = act.forward_program.source(names, lambda f, *args: _TRITON_ACT_CALLS[f].format(*args),
                                               _triton_pow)
    return [Code(line) for line in lines], Code(out)


def mlp_context(act: str | semantics.Activation, gated: bool, gate_clamp: float | None, up_clamp: float | None, has_bias: bool,
                has_shared: bool, has_shared_scale: bool, dtype: torch.dtype, fp8: bool = False) -> dict[str, Any]:
    try:
        entry = act if isinstance(act, semantics.Activation) else semantics.activation(act, gated)
    except ValueError as exc:
        raise InputError(f"expert activation: {exc}") from None
    lines, out = activation_source(entry)
    return {
        "act": entry.name,
        "act_expression": entry.expression,
        "act_args": Code(", ".join(entry.variables)),
        "act_lines": lines,
        "act_out": out,
        "gated": bool(gated),
        "gate_clamp": _fmt(gate_clamp),
        "up_clamp": _fmt(up_clamp),
        "has_bias": bool(has_bias),
        "has_shared": bool(has_shared),
        "has_shared_scale": bool(has_shared_scale),
        # float32 layers match torch's float32 matmul (no TF32); 16-bit inputs accumulate in float32.
        "ieee_fp32": dtype == torch.float32,
        "dot_args": Code(', input_precision="ieee"' if dtype == torch.float32 else ""),
        "fp8": bool(fp8),  # block-scaled FP8 operands (triton_backend/fp8.py launches this variant)
    }


@lru_cache(maxsize=256)
def _mlp_module_for(act: semantics.Activation, gated: bool, gate_clamp: float | None, up_clamp: float | None, has_bias: bool,
                    has_shared: bool, has_shared_scale: bool, dtype: torch.dtype, interpret: bool) -> ModuleType:
    """The kernel module for one expert MLP variant, looked up once per variant and Triton mode
    (every forward asks for it: keep the host path short)."""
    ctx = mlp_context(act, gated, gate_clamp, up_clamp, has_bias, has_shared, has_shared_scale, dtype)
    return render_to_module("triton_expert_mlp.py.j2", ctx)


def token_csr(tok_N: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Assignments grouped by token: order_N (assignment ids, stable by token) and start_T1 [T + 1]."""
    tok_sorted, order_N = torch.sort(tok_N, stable=True)
    start_T1 = torch.searchsorted(tok_sorted, torch.arange(T + 1, device=tok_N.device, dtype=tok_sorted.dtype))
    return order_N, start_T1


@dataclass
class MLPLaunch:
    """The tensors and sizes of one expert MLP call, with one method per kernel (the tuner times them).

    Every tensor is contiguous (the kernels compute offsets from the sizes, which keeps launches cheap).
    """

    mod: ModuleType
    args: ExpertArgs  # shared experts present only when folded in (SH > 0)
    SH: int

    @property
    def dims(self) -> tuple[int, int, int, int, int, int]:
        """T, D, F, E, N, N_ext."""
        T, D = self.args.x_TD.shape
        N = self.args.tok_N.numel()
        return T, D, self.args.w_down_EDF.shape[2], self.args.w_up_EHD.shape[0], N, N + self.SH * T

    def align(self, block_m: int) -> tuple[Tensor, Tensor, int]:
        T, _, _, E, _, _ = self.dims
        return align(self.args.exp_N, T, E, self.SH, block_m)

    def gate_up(self, aligned: tuple[Tensor, Tensor, int], block_m: int, gu: configs.GemmConfig) -> Tensor:
        """h[n] = act(x[tok[n]] W_up^T) for every assignment, one launch over all experts."""
        sorted_R, block_expert_B, B = aligned
        T, D, F, E, N, N_ext = self.dims
        a = self.args
        h_NF = a.x_TD.new_empty(N_ext, F)
        self.mod.gate_up_kernel[(B * triton_cdiv(F, gu.BLOCK_N),)](
            a.x_TD, a.tok_N, a.w_up_EHD, a.shared_w_up_HD, a.b_up_EH, sorted_R, block_expert_B, h_NF,
            N, N_ext, T, D, F, self.SH * F, E, B,
            BLOCK_M=block_m, BLOCK_N=gu.BLOCK_N, BLOCK_K=gu.BLOCK_K, GROUP_M=gu.GROUP_M,
            EVEN_K=D % gu.BLOCK_K == 0, num_warps=gu.num_warps, num_stages=gu.num_stages,
        )
        return h_NF

    def down(self, aligned: tuple[Tensor, Tensor, int], block_m: int, dn: configs.GemmConfig, h_NF: Tensor) -> Tensor:
        """o[n] = weight[n] * (h[n] W_down^T), one launch over all experts."""
        sorted_R, block_expert_B, B = aligned
        T, D, F, E, N, N_ext = self.dims
        a = self.args
        o_ND = a.x_TD.new_empty(N_ext, D)
        self.mod.down_kernel[(B * triton_cdiv(D, dn.BLOCK_N),)](
            h_NF, a.w_down_EDF, a.shared_w_down_DF, a.b_down_ED, a.weight_N, a.shared_scale_T, sorted_R,
            block_expert_B, o_ND,
            N, N_ext, T, D, F, self.SH * F, E, B,
            BLOCK_M=block_m, BLOCK_N=dn.BLOCK_N, BLOCK_K=dn.BLOCK_K, GROUP_M=dn.GROUP_M,
            EVEN_K=F % dn.BLOCK_K == 0, num_warps=dn.num_warps, num_stages=dn.num_stages,
        )
        return o_ND

    def combine(self, o_ND: Tensor) -> Tensor:
        """y[t] = sum of the token's outputs, in a fixed order (deterministic)."""
        T, D, _, E, N, _ = self.dims
        order_N, start_T1 = token_csr(self.args.tok_N, T)
        y_TD = self.args.x_TD.new_empty(T, D)
        block_d = min(COMBINE_BLOCK_D, _pow2(D))
        self.mod.combine_kernel[(T, triton_cdiv(D, block_d))](
            o_ND, order_N, start_T1, self.args.exp_N, y_TD, N, T, D, E, self.SH, BLOCK_D=block_d,
        )
        return y_TD

    def run(self, cfg: configs.MoEConfig) -> Tensor:
        aligned = self.align(cfg.BLOCK_M)
        h_NF = self.gate_up(aligned, cfg.BLOCK_M, cfg.gate_up)
        return self.combine(self.down(aligned, cfg.BLOCK_M, cfg.down, h_NF))


def expert_mlp(*args: Any, config: configs.MoEConfig | None = None) -> Tensor:
    """The Triton implementation of ``moegraph::expert_mlp`` (an ``ExpertArgs``, or the op's positional
    arguments; same result).

    Shared experts whose hidden size is a multiple of F run as SH always-selected experts inside the
    same grouped GEMMs; others run as two dense GEMMs (torch) added to the output.
    """
    launch, dense_shared = prepare(ExpertArgs.of(*args))
    T, D, F, E, _, N_ext = launch.dims
    if T == 0 or N_ext == 0:
        y = launch.args.x_TD.new_zeros(T, D)
    else:
        x_TD = launch.args.x_TD
        cfg = config or configs.get_config(E, F, T, N_ext / (E + launch.SH), x_TD.dtype, _device_name(x_TD.device))
        y = launch.run(configs.fit(cfg, D, F))
    return y if dense_shared is None else y + dense_shared


def prepare(*args: Any) -> tuple[MLPLaunch, Tensor | None]:
    """Check the arguments (an ``ExpertArgs`` or the op's positional ones), pick the kernel module for
    them, and run shared experts that cannot be folded."""
    (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated, gate_clamp, up_clamp,
     shared_w_up_HD, shared_w_down_DF, shared_scale_T) = ExpertArgs.of(*args).positional()
    check_device(x_TD, w_up_EHD, w_down_EDF)
    F = w_down_EDF.shape[2]
    dt = x_TD.dtype
    check_dtype(dt)
    if w_up_EHD.dtype != dt or w_down_EDF.dtype != dt:
        raise InputError(f"expert_mlp: activations are {dt} but expert weights are {w_up_EHD.dtype}; "
                         "cast one of them")
    dense_shared = None
    SH = 0
    if shared_w_up_HD is not None:
        S = shared_w_down_DF.shape[1]
        if S % F == 0 and shared_w_up_HD.dtype == dt:
            SH = S // F
        else:  # not a whole number of experts: one dense MLP, scaled per token
            a = activate(torch.nn.functional.linear(x_TD, shared_w_up_HD), activation, gated, gate_clamp, up_clamp)
            if shared_scale_T is not None:
                a = a * shared_scale_T.to(a.dtype).unsqueeze(-1)
            dense_shared = torch.nn.functional.linear(a, shared_w_down_DF).to(dt)
    try:
        entry = semantics.activation(activation, gated)
    except ValueError as exc:
        raise InputError(f"expert activation: {exc}") from None
    mod = _mlp_module_for(entry, gated, gate_clamp, up_clamp, b_up_EH is not None, SH > 0,
                          SH > 0 and shared_scale_T is not None, dt, interpreting())

    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    folded = (c(shared_w_up_HD), c(shared_w_down_DF), c(shared_scale_T)) if SH else (None, None, None)
    launch = MLPLaunch(mod, ExpertArgs(c(x_TD), c(tok_N), c(exp_N), c(weight_N), c(w_up_EHD), c(w_down_EDF), c(b_up_EH),
                                       c(b_down_ED), activation, gated, gate_clamp, up_clamp, *folded), SH)
    return launch, dense_shared


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------

_TRITON_CALLS = {n: FUNCTIONS[n].triton for n in SCORE_EXPR_FUNCTIONS}


def score_to_triton(score: str) -> str:
    """Triton code for an elementwise score of ``x`` (a named score or a validated expression), spelled from its
    parsed tree as the activations are (every part that reads no ``x`` is a number there already): the score
    functions' Triton forms, powers as ``_triton_pow`` spells them, a constant base's log taken here."""
    try:
        tree = score_tree(score_expression(score))
    except ValueError as exc:
        raise InputError(f"score {score!r}: {exc}") from None

    def power(node: ast.AST, emit) -> str | None:
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)):
            return None
        base, exponent = constant(node.left), f"({emit(node.right)})"
        if base is not None and base > 0:
            return f"tl.exp({exponent} * {math.log(base)!r})"
        return _triton_pow(f"({emit(node.left)})", constant(node.right), exponent)

    try:
        return emit_score(tree, "x", lambda name, arg: _TRITON_CALLS[name].format(arg), power)
    except (KeyError, ValueError) as exc:
        raise InputError(f"score {score!r}: {exc}; it has no Triton spelling") from None


@lru_cache(maxsize=256)
def router_supported(E: int, K: int, score: str) -> str | None:
    """Why the router kernel cannot take this policy (None when it can); asked on every forward, so cached."""
    if E > 1024:
        return f"{E} experts exceed the router kernel's 1024 (one token's scores live in registers)"
    if K > 64:
        return f"top_k {K} exceeds the router kernel's 64"
    if score != "softmax":
        try:
            score_to_triton(score)
        except InputError as exc:
            return str(exc)
    return None


def router_context(E: int, *policy: Any) -> dict[str, Any]:
    """The router template's context for ``E`` experts: ``(TopKPolicy, has_bias)``, or in order top_k,
    score, topk_then_score, has_bias, normalize, scaling_factor, num_groups, topk_groups, group_score,
    top_n."""
    if len(policy) == 2 and isinstance(policy[0], TopKPolicy):
        p, has_bias = policy
    else:
        K, score, tts, has_bias, normalize, scaling, G, M, gs, n = policy
        p = TopKPolicy(K, score, tts, normalize, scaling, G, M, gs, n)
    groups = None
    if p.num_groups > 0:  # 0: no group limit
        EP = max(16, _pow2(E))
        groups = {"G": p.num_groups, "EG": E // p.num_groups, "GP": _pow2(p.num_groups), "topk_groups": p.topk_groups,
                  "group_score": p.group_score, "top_n": p.top_n,
                  # one [tokens, G, E/G] view when E fills the padded width and G is a power of two
                  "reshape": E == EP and p.num_groups == _pow2(p.num_groups)}
    score = p.score
    name = score if score in SCORE_FUNCTIONS or score == "softmax" else f"x -> {score}"
    summary = (("top-k logits then softmax" if p.topk_then_score else f"{name} scores")
               + (", expert bias for selection" if has_bias else "")
               + (f", {p.topk_groups} of {p.num_groups} groups by {p.group_score}" if groups else "")
               + (", normalised" if p.divides_by_sum else "")
               + (f", scaled by {p.scaling_factor}" if p.scaling_factor != 1.0 else ""))
    return {
        "E": E, "EP": max(16, _pow2(E)), "K": p.top_k, "KP": _pow2(p.top_k),
        "score": score,
        "softmax": score == "softmax",
        "score_code": Code("x" if score == "softmax" else score_to_triton(score)),
        "topk_then_score": p.topk_then_score,
        "has_bias": bool(has_bias),
        "normalize": p.divides_by_sum,
        "scaling_factor": float(p.scaling_factor),
        "groups": groups,
        "summary": summary,
    }


@lru_cache(maxsize=256)
def _router_module_for(E: int, policy: TopKPolicy, has_bias: bool, interpret: bool) -> tuple[ModuleType, int]:
    """The router kernel module and its padded expert width, once per policy and Triton mode."""
    ctx = router_context(E, policy, has_bias)
    return render_to_module("triton_router.py.j2", ctx), ctx["EP"]


def route_topk(logits_TE: Tensor, expert_bias_E: Tensor | None, *policy: Any) -> tuple[Tensor, Tensor]:
    """Run the router kernel: ids [T, K] int64 (best first) and weights [T, K] in the logits' dtype.

    ``policy``: a ``TopKPolicy``, or its fields in order (``TopKPolicy.positional()``).
    """
    p = policy[0] if len(policy) == 1 and isinstance(policy[0], TopKPolicy) else TopKPolicy(*policy)
    check_device(logits_TE)
    check_dtype(logits_TE.dtype)
    T, E = logits_TE.shape
    mod, EP = _router_module_for(E, p, expert_bias_E is not None, interpreting())
    ids = torch.empty(T, p.top_k, dtype=torch.int64, device=logits_TE.device)
    weights = torch.empty(T, p.top_k, dtype=logits_TE.dtype, device=logits_TE.device)
    if T == 0:
        return ids, weights
    block_t = max(1, min(16, 4096 // EP))
    bias = expert_bias_E.contiguous() if expert_bias_E is not None else None
    mod.route_topk_kernel[(triton_cdiv(T, block_t),)](
        logits_TE, bias, ids, weights, T, logits_TE.stride(0), logits_TE.stride(1), BLOCK_T=block_t,
    )
    return ids, weights
