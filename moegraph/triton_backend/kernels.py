"""Launchers of the rendered Triton kernels (no host synchronisation anywhere on the forward path).

Every grid is a function of tensor shapes only: the expert MLP launches over the worst-case number
of BLOCK_M-row blocks and blocks past the last expert exit at once. The kernels' source comes from
``codegen_templates/triton_*.py.j2`` rendered with a context decided here.

Legend: T tokens, D model dim, F expert hidden dim, E routed experts, K experts per token,
N routed assignments, SH shared chunks (shared hidden size S = SH * F), N_ext = N + SH * T.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..spec import SCORE_FUNCTIONS, score_expression
from . import configs
from .render import interpreting, render_to_module

__all__ = ["expert_mlp", "align", "route_topk", "score_to_triton", "router_supported"]

# Alignment tiling: assignments per count/scatter program, experts per scan program, chunk rows per
# scan step, blocks per offsets step.
ALIGN_CHUNK = 128
ALIGN_EB = 64
ALIGN_PB = 32
ALIGN_BB = 64
COMBINE_BLOCK_D = 1024


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def check_device(*tensors: Tensor | None) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (which has no bfloat16)."""
    interp = interpreting()
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda and not interp:
            raise InputError(
                f"the triton backend got a tensor on {t.device}; it runs on CUDA devices, or on CPU with "
                "TRITON_INTERPRET=1 set before moegraph's Triton kernels are first used. Compile with "
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


def _align_module(has_shared: bool) -> ModuleType:
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
    mod = _align_module(SH > 0)
    NB = max(_pow2(E_ext + 1), ALIGN_EB)
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


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Grouped expert MLP
# ----------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> float | None:
    return None if v is None else float(v)


def mlp_context(act: str, gated: bool, gate_clamp: float | None, up_clamp: float | None, has_bias: bool,
                has_shared: bool, has_shared_scale: bool, dtype: torch.dtype) -> dict[str, Any]:
    if act not in ("silu", "gelu", "gelu_tanh", "relu", "relu2"):
        raise InputError(f"expert activation {act!r} is not one of silu, gelu, gelu_tanh, relu, relu2")
    return {
        "act": act,
        "gated": bool(gated),
        "gate_clamp": _fmt(gate_clamp),
        "up_clamp": _fmt(up_clamp),
        "has_bias": bool(has_bias),
        "has_shared": bool(has_shared),
        "has_shared_scale": bool(has_shared_scale),
        # float32 layers match torch's float32 matmul (no TF32); 16-bit inputs accumulate in float32.
        "dot_args": ', input_precision="ieee"' if dtype == torch.float32 else "",
    }


def _mlp_module(ctx: dict[str, Any]) -> ModuleType:
    return render_to_module("triton_expert_mlp.py.j2", ctx)


def token_csr(tok_N: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Assignments grouped by token: order_N (assignment ids, stable by token) and start_T1 [T + 1]."""
    tok_sorted, order_N = torch.sort(tok_N, stable=True)
    start_T1 = torch.searchsorted(tok_sorted, torch.arange(T + 1, device=tok_N.device, dtype=tok_sorted.dtype))
    return order_N, start_T1


def expert_mlp(
    x_TD: Tensor,
    tok_N: Tensor,
    exp_N: Tensor,
    weight_N: Tensor,
    w_up_EHD: Tensor,
    w_down_EDF: Tensor,
    b_up_EH: Tensor | None,
    b_down_ED: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
    shared_w_up_HD: Tensor | None = None,
    shared_w_down_DF: Tensor | None = None,
    shared_scale_T: Tensor | None = None,
    config: configs.MoEConfig | None = None,
) -> Tensor:
    """The Triton implementation of ``moegraph::expert_mlp`` (same arguments and result).

    Shared experts whose hidden size is a multiple of F run as SH always-selected experts inside the
    same grouped GEMMs; others run as two dense GEMMs (torch) added to the output.
    """
    from ..ops import apply_activation

    check_device(x_TD, w_up_EHD, w_down_EDF)
    T, D = x_TD.shape
    E, H, _ = w_up_EHD.shape
    F = w_down_EDF.shape[2]
    N = tok_N.numel()
    dt = x_TD.dtype
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
            a = apply_activation(torch.nn.functional.linear(x_TD, shared_w_up_HD), activation, gated, gate_clamp,
                                 up_clamp)
            if shared_scale_T is not None:
                a = a * shared_scale_T.to(a.dtype).unsqueeze(-1)
            dense_shared = torch.nn.functional.linear(a, shared_w_down_DF).to(dt)
    N_ext = N + SH * T
    if T == 0 or N_ext == 0:
        y = x_TD.new_zeros(T, D)
        return y if dense_shared is None else y + dense_shared

    cfg = config or configs.get_config(E, F, T, N_ext / (E + SH), dt, _device_name(x_TD.device))
    cfg = configs.fit(cfg, D, F)
    sorted_R, block_expert_B, B = align(exp_N, T, E, SH, cfg.BLOCK_M)

    ctx = mlp_context(activation, gated, gate_clamp, up_clamp, b_up_EH is not None, SH > 0,
                      SH > 0 and shared_scale_T is not None, dt)
    mod = _mlp_module(ctx)
    x_TD = x_TD.contiguous()
    w_up_EHD = w_up_EHD.contiguous()
    w_down_EDF = w_down_EDF.contiguous()
    sw_up = shared_w_up_HD.contiguous() if SH else None
    sw_down = shared_w_down_DF.contiguous() if SH else None
    S = SH * F
    dev = x_TD.device

    # Step 1: h = act(x W_up^T) for every assignment, in one launch over all experts.
    h_NF = torch.empty(N_ext, F, dtype=dt, device=dev)
    gu = cfg.gate_up
    grid = (B * triton_cdiv(F, gu.BLOCK_N),)
    b_up = b_up_EH.contiguous() if b_up_EH is not None else None
    mod.gate_up_kernel[grid](
        x_TD, tok_N, w_up_EHD, sw_up, b_up, sorted_R, block_expert_B, h_NF,
        N, N_ext, T, D, F, S, E, B,
        x_TD.stride(0), x_TD.stride(1), w_up_EHD.stride(0), w_up_EHD.stride(1), w_up_EHD.stride(2),
        sw_up.stride(0) if SH else 0, sw_up.stride(1) if SH else 0,
        b_up.stride(0) if b_up is not None else 0, b_up.stride(1) if b_up is not None else 0,
        h_NF.stride(0), h_NF.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=gu.BLOCK_N, BLOCK_K=gu.BLOCK_K, GROUP_M=gu.GROUP_M,
        EVEN_K=D % gu.BLOCK_K == 0, num_warps=gu.num_warps, num_stages=gu.num_stages,
    )
    # Step 2: o = weight * (h W_down^T), again one launch.
    o_ND = torch.empty(N_ext, D, dtype=dt, device=dev)
    dn = cfg.down
    grid = (B * triton_cdiv(D, dn.BLOCK_N),)
    b_down = b_down_ED.contiguous() if b_down_ED is not None else None
    scale = shared_scale_T.contiguous() if (SH and shared_scale_T is not None) else None
    mod.down_kernel[grid](
        h_NF, w_down_EDF, sw_down, b_down, weight_N.contiguous(), scale, sorted_R, block_expert_B, o_ND,
        N, N_ext, T, D, F, E, B,
        h_NF.stride(0), h_NF.stride(1), w_down_EDF.stride(0), w_down_EDF.stride(1), w_down_EDF.stride(2),
        sw_down.stride(0) if SH else 0, sw_down.stride(1) if SH else 0,
        b_down.stride(0) if b_down is not None else 0, b_down.stride(1) if b_down is not None else 0,
        o_ND.stride(0), o_ND.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=dn.BLOCK_N, BLOCK_K=dn.BLOCK_K, GROUP_M=dn.GROUP_M,
        EVEN_K=F % dn.BLOCK_K == 0, num_warps=dn.num_warps, num_stages=dn.num_stages,
    )
    # Step 3: y[t] = sum of the token's outputs (fixed order: deterministic).
    order_N, start_T1 = token_csr(tok_N, T)
    y_TD = torch.empty(T, D, dtype=dt, device=dev)
    block_d = min(COMBINE_BLOCK_D, _pow2(D))
    mod.combine_kernel[(T, triton_cdiv(D, block_d))](
        o_ND, order_N, start_T1, exp_N.contiguous(), y_TD,
        N, T, D, E, SH,
        o_ND.stride(0), o_ND.stride(1), y_TD.stride(0), y_TD.stride(1),
        BLOCK_D=block_d,
    )
    return y_TD if dense_shared is None else y_TD + dense_shared


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------

_TRITON_CALLS = {
    "sigmoid": "tl.sigmoid({})",
    "softplus": "_softplus({})",
    "sqrt": "tl.sqrt({})",
    "exp": "tl.exp({})",
    "log": "tl.log({})",
    "log1p": "_log1p({})",
    "tanh": "_tanh({})",
    "relu": "tl.maximum({}, 0.0)",
    "abs": "tl.abs({})",
    "square": "(({0}) * ({0}))",
}


def score_to_triton(score: str) -> str:
    """Triton code for an elementwise score of ``x`` (a named score or a validated expression)."""
    tree = ast.parse(score_expression(score), mode="eval")

    def emit(node: ast.AST) -> str:
        if isinstance(node, ast.Expression):
            return emit(node.body)
        if isinstance(node, ast.Name):
            if node.id != "x":
                raise InputError(f"score {score!r}: unknown name {node.id!r}")
            return "x"
        if isinstance(node, ast.Constant):
            return repr(float(node.value))
        if isinstance(node, ast.UnaryOp):
            return f"({'-' if isinstance(node.op, ast.USub) else '+'}{emit(node.operand)})"
        if isinstance(node, ast.BinOp):
            a, b = emit(node.left), emit(node.right)
            if isinstance(node.op, ast.Pow):
                c = node.right
                if isinstance(c, ast.Constant) and float(c.value).is_integer() and 0 <= c.value <= 8:
                    return "(" + " * ".join([f"({a})"] * int(c.value)) + ")" if c.value else "(x * 0.0 + 1.0)"
                return f"tl.exp(({b}) * tl.log({a}))"
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
            return f"({a} {op} {b})"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _TRITON_CALLS:
            return _TRITON_CALLS[node.func.id].format(emit(node.args[0]))
        raise InputError(f"score {score!r}: {ast.dump(node)} has no Triton spelling")

    return emit(tree)


def router_supported(E: int, K: int, score: str) -> str | None:
    """Why the router kernel cannot take this policy (None when it can)."""
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


def router_context(E: int, K: int, score: str, topk_then_score: bool, has_bias: bool, normalize: bool,
                   scaling_factor: float, num_groups: int, topk_groups: int, group_score: str,
                   top_n: int) -> dict[str, Any]:
    groups = None
    if num_groups > 0:  # 0: no group limit
        groups = {"G": num_groups, "EG": E // num_groups, "GP": _pow2(num_groups), "topk_groups": topk_groups,
                  "group_score": group_score, "top_n": top_n}
    name = score if score in SCORE_FUNCTIONS or score == "softmax" else f"x -> {score}"
    summary = (("top-k logits then softmax" if topk_then_score else f"{name} scores")
               + (", expert bias for selection" if has_bias else "")
               + (f", {topk_groups} of {num_groups} groups by {group_score}" if groups else "")
               + (", normalised" if normalize else "")
               + (f", scaled by {scaling_factor}" if scaling_factor != 1.0 else ""))
    return {
        "E": E, "EP": max(16, _pow2(E)), "K": K, "KP": _pow2(K),
        "score": score,
        "softmax": score == "softmax",
        "score_code": "x" if score == "softmax" else score_to_triton(score),
        "topk_then_score": topk_then_score,
        "has_bias": has_bias,
        "normalize": normalize,
        "scaling_factor": float(scaling_factor),
        "groups": groups,
        "summary": summary,
    }


def route_topk(logits_TE: Tensor, expert_bias_E: Tensor | None, top_k: int, score: str, topk_then_score: bool,
               normalize: bool, scaling_factor: float, num_groups: int, topk_groups: int, group_score: str,
               top_n: int) -> tuple[Tensor, Tensor]:
    """Run the router kernel: ids [T, K] int64 (best first) and weights [T, K] in the logits' dtype."""
    check_device(logits_TE)
    T, E = logits_TE.shape
    ctx = router_context(E, top_k, score, topk_then_score, expert_bias_E is not None, normalize, scaling_factor,
                         num_groups, topk_groups, group_score, top_n)
    mod = render_to_module("triton_router.py.j2", ctx)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    weights = torch.empty(T, top_k, dtype=logits_TE.dtype, device=logits_TE.device)
    if T == 0:
        return ids, weights
    block_t = max(1, min(16, 4096 // ctx["EP"]))
    bias = expert_bias_E.contiguous() if expert_bias_E is not None else None
    mod.route_topk_kernel[(triton_cdiv(T, block_t),)](
        logits_TE, bias, ids, weights, T, logits_TE.stride(0), logits_TE.stride(1), BLOCK_T=block_t,
    )
    return ids, weights
