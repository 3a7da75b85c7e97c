"""The expert op's backward: one opaque op (``moegraph::expert_mlp_backward``) that recomputes the
forward per expert and writes the derivatives out (the activation's from the semantics table), so
``torch.compile`` traces training through the layer without an eager autograd graph inside.

Legend: T tokens, D model dim, F expert hidden dim, H up-projection width, E experts, N assignments,
R rows of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..oplib import opaque_op
from .activation import _act_backward, _act_saved
from .args import RoutedRows
from .forward import _sort_by_expert


def _mlp_grads(x_RD, w_up_HD, w_down_DF, b_up_H, b_down_D, go_RD, activation, gated, gate_clamp, up_clamp,
               want_out: bool):
    """Gradients of one expert MLP given the gradient of its output ``go_RD``.

    Returns (gx_RD, gw_up_HD, gw_down_DF, gb_up_H, gb_down_D, out_RD or None): the forward is
    recomputed from the saved inputs (as the autograd-recompute backward did), the derivatives are
    written out so that the whole backward is one opaque op.
    """
    h = F.linear(x_RD, w_up_HD, b_up_H)
    a, saved = _act_saved(h, activation, gated, gate_clamp, up_clamp)
    out = F.linear(a, w_down_DF, b_down_D) if want_out else None
    gw_down = go_RD.t() @ a
    gb_down = go_RD.sum(0) if b_down_D is not None else None
    gh = _act_backward(go_RD @ w_down_DF, saved, activation, gated, gate_clamp, up_clamp)
    gw_up = gh.t() @ x_RD
    gb_up = gh.sum(0) if b_up_H is not None else None
    return gh @ w_up_HD, gw_up, gw_down, gb_up, gb_down, out


def _routed_grads_per_expert(rr: RoutedRows, grads: dict) -> Tensor | None:
    """The routed experts' gradients, one expert at a time (rows sorted by expert, ``counts`` per expert).

    Writes gw_up, gw_down, gb_up, gb_down in ``grads`` (zero-filled [E, ...] tensors) and returns
    gx_ND; the per-assignment weight gradient goes to grads["gw_sorted"] when ``want_out``.
    """
    x_ND, gy_ND, w_sorted, counts, want_out = rr.x_ND, rr.gy_ND, rr.w_sorted, rr.counts, rr.want_out
    w_up_EHD, w_down_EDF, b_up_EH, b_down_ED = rr.w_up_EHD, rr.w_down_EDF, rr.b_up_EH, rr.b_down_ED
    gx_ND = torch.empty_like(x_ND)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gxe, grads["gw_up"][e], grads["gw_down"][e], gbu, gbd, out = _mlp_grads(
            x_ND[rows], w_up_EHD[e], w_down_EDF[e], None if b_up_EH is None else b_up_EH[e],
            None if b_down_ED is None else b_down_ED[e], gy_ND[rows] * w_sorted[rows], *rr.activation_args,
            want_out=want_out)
        gx_ND[rows] = gxe
        if gbu is not None:
            grads["gb_up"][e] = gbu
        if gbd is not None:
            grads["gb_down"][e] = gbd
        if want_out:
            grads["gw_sorted"][rows] = (gy_ND[rows] * out).sum(-1)
        start += n
    return gx_ND


@opaque_op("moegraph::expert_mlp_backward")
def expert_mlp_backward(
    grad_TD: Tensor,
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
    shared_w_up_HD: Tensor | None,
    shared_w_down_DF: Tensor | None,
    shared_scale_T: Tensor | None,
    need: list[bool],
) -> list[Tensor]:
    """Gradients of ``expert_mlp`` for each of its 15 arguments (an empty tensor where not needed).

    One opaque op, so that ``torch.compile`` traces training through the MoE layer without running a
    recomputed autograd graph eagerly inside the backward.
    """
    E = w_up_EHD.shape[0]
    grad_TD = grad_TD.to(x_TD.dtype)
    gx = torch.zeros_like(x_TD)
    gw_up, gw_down = torch.zeros_like(w_up_EHD), torch.zeros_like(w_down_EDF)
    gb_up = torch.zeros_like(b_up_EH) if b_up_EH is not None else None
    gb_down = torch.zeros_like(b_down_ED) if b_down_ED is not None else None
    g_weight = torch.zeros_like(weight_N)
    g_sh_up = torch.zeros_like(shared_w_up_HD) if shared_w_up_HD is not None else None
    g_sh_down = torch.zeros_like(shared_w_down_DF) if shared_w_down_DF is not None else None
    g_scale = torch.zeros_like(shared_scale_T) if shared_scale_T is not None else None
    # Step 1: shared experts (output scaled per token by shared_scale_T when given).
    if shared_w_up_HD is not None:
        go = grad_TD if shared_scale_T is None else grad_TD * shared_scale_T.to(grad_TD.dtype).unsqueeze(-1)
        gxs, g_sh_up, g_sh_down, _, _, out = _mlp_grads(x_TD, shared_w_up_HD, shared_w_down_DF, None, None, go,
                                                        activation, gated, gate_clamp, up_clamp,
                                                        want_out=shared_scale_T is not None)
        gx += gxs
        if shared_scale_T is not None:
            g_scale = (grad_TD * out).sum(-1).to(shared_scale_T.dtype)
    # Step 2: routed experts, sorted by expert as in the forward; dropped assignments get no gradient.
    order_N, exp_sorted, counts = _sort_by_expert(exp_N, E)
    n_valid = len(order_N)
    if n_valid:
        tok_sorted = tok_N.index_select(0, order_N)
        w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
        x_ND = x_TD.index_select(0, tok_sorted)
        gy_ND = grad_TD.index_select(0, tok_sorted)
        grads = {"gw_up": gw_up, "gw_down": gw_down, "gb_up": gb_up, "gb_down": gb_down,
                 "gw_sorted": torch.empty(n_valid, dtype=x_TD.dtype, device=x_TD.device)}
        from .. import strategies  # per-expert loop or grouped GEMMs, chosen as the forward's strategy

        gx_ND = strategies.run_backward(
            RoutedRows(x_ND, gy_ND, w_sorted, exp_sorted, counts, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation,
                       gated, gate_clamp, up_clamp, need[3]), grads)
        gw_sorted = grads["gw_sorted"]
        gx.index_add_(0, tok_sorted, gx_ND)
        if need[3]:
            g_weight[order_N] = gw_sorted.to(weight_N.dtype)
    grads = [gx, None, None, g_weight, gw_up, gw_down, gb_up, gb_down, None, None, None, None, g_sh_up, g_sh_down,
             g_scale]
    return [g if (n and g is not None) else x_TD.new_empty(0) for g, n in zip(grads, need)]


@expert_mlp_backward.register_fake
def _(grad_TD, x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated,
      gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T, need):
    inputs = (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, None, None, None, None,
              shared_w_up_HD, shared_w_down_DF, shared_scale_T)
    return [torch.empty_like(t) if (n and isinstance(t, Tensor)) else x_TD.new_empty(0) for t, n in zip(inputs, need)]

